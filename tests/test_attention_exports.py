"""torch's scaled_dot_product_attention as exporters emit it: the ONNX Attention op at
opset 23 (dynamo) and the decomposed MatMul/Softmax graph below it, with grouped-query
attention (kv heads repeated by Unsqueeze/Expand/Reshape) and causal masking. Dead kv
heads (with their query heads) and dead head_size channels must prune exactly."""
import warnings

import pytest
from planting import prune_planted

torch = pytest.importorskip("torch")
F = torch.nn.functional


class SdpaBlock(torch.nn.Module):
    """q/k/v projections, SDPA with `kv_heads` < `heads` (GQA), output projection, residual."""

    def __init__(self, hidden=32, heads=4, kv_heads=2, causal=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal = heads, kv_heads, hidden // heads, causal
        self.q = torch.nn.Linear(hidden, hidden)
        self.k = torch.nn.Linear(hidden, kv_heads * self.head_dim)
        self.v = torch.nn.Linear(hidden, kv_heads * self.head_dim)
        self.o = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.kv_heads != self.heads)
        return x + self.o(y.transpose(1, 2).reshape(b, s, -1))


def _export(module, opset, tmp_path):
    import onnx

    path = tmp_path / "sdpa.onnx"
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(1, 6, 32),), str(path), dynamo=True, opset_version=opset)
    return onnx.load(str(path))


CASES = [(23, 2, False), (23, 4, True), (18, 2, False)]
IDS = ["attention-op-gqa", "attention-op-causal", "decomposed-gqa"]


@pytest.mark.parametrize("opset,kv_heads,causal", CASES, ids=IDS)
def test_dead_kv_heads_go_with_their_query_heads(tmp_path, opset, kv_heads, causal):
    torch.manual_seed(0)
    model = _export(SdpaBlock(kv_heads=kv_heads, causal=causal), opset, tmp_path)
    assert ("Attention" in {n.op_type for n in model.graph.node}) == (opset >= 23)
    result = prune_planted(model, 0.5, heads=True)
    assert [(d.group.kind, d.group.channels, len(d.removed)) for d in result.plan.decisions if len(d.removed)] == \
        [("heads", kv_heads, kv_heads // 2)]


@pytest.mark.parametrize("opset,kv_heads,causal", CASES, ids=IDS)
def test_dead_head_size_channels(tmp_path, opset, kv_heads, causal):
    torch.manual_seed(0)
    result = prune_planted(_export(SdpaBlock(kv_heads=kv_heads, causal=causal), opset, tmp_path), 0.5, head_dim=True)
    # q/k share one head_size, v has its own
    assert sorted(d.group.channels for d in result.plan.decisions if len(d.removed)) == [8, 8]
