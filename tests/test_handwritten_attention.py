"""Attention as people write it by hand (and timm does): separate q/k/v/o Linear layers,
`B, S, D = x.shape`, `view(B, S, h, dh).transpose(1, 2)`, `(a @ v).transpose(1, 2).reshape(B, S, D)`,
exported by both torch exporters with dynamic batch and sequence.

The final reshape reads D from the block's input, a dim whose channels stay: pruning heads
must write the new width there. `--neurons` means MLP hidden units, not the dims inside
heads (`--head-dim`). Planted dead heads, neurons, head dims and adjacent identity blocks
must all go exactly."""
import warnings

import numpy as np
import pytest
from conftest import max_rel_diff, run_model
from planting import plant_identity_blocks, prune_planted

from onnxprune import prune
from onnxprune.core.metrics import random_inputs

torch = pytest.importorskip("torch")


class Attention(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, S, D = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        a = ((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, S, D))


class Block(torch.nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.norm1, self.attn, self.norm2 = torch.nn.LayerNorm(dim), Attention(dim), torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.GELU(), torch.nn.Linear(64, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Encoder(torch.nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.blocks = torch.nn.Sequential(*[Block() for _ in range(layers)])
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(self.blocks(x))


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def encoder(request, tmp_path_factory):
    import onnx

    torch.manual_seed(0)
    net = Encoder().eval()
    path = tmp_path_factory.mktemp("encoder") / f"{request.param}.onnx"
    x = torch.randn(2, 5, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if request.param == "legacy":
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"},
                                                                 "y": {0: "batch", 1: "seq"}})
        else:
            dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
            torch.onnx.export(net, (x,), str(path), dynamo=True, dynamic_shapes=dims)
    return onnx.load(str(path))


def _removed_by_kind(result):
    found = {}
    for d in result.plan.decisions:
        if len(d.removed):
            found.setdefault(d.group.kind, []).append((d.group.channels, len(d.removed)))
    return found


def test_dead_heads_go_in_every_layer(encoder):
    result = prune_planted(encoder, 0.25, heads=True)
    assert _removed_by_kind(result) == {"heads": [(4, 1)] * 4}  # each layer its own heads


def test_neurons_are_mlp_hidden_units_only(encoder):
    result = prune_planted(encoder, 0.25)  # --filters 0.25: neurons default to it
    assert _removed_by_kind(result) == {"neurons": [(64, 16)] * 4}
    assert any("--head-dim" in note for note in result.report["notes"])


def test_dead_head_dims_go_with_head_dim(encoder):
    result = prune_planted(encoder, 0.25, head_dim=True)
    removed = _removed_by_kind(result)
    assert list(removed) == ["head_dim"] and len(removed["head_dim"]) == 8  # q/k and v/o of each layer
    assert all(channels == 8 and gone == 2 for channels, gone in removed["head_dim"])


def test_adjacent_identity_blocks_go_together(encoder):
    planted, keys = plant_identity_blocks(encoder, 2, first=2)  # layer 2's attention and MLP
    result = prune(planted, layers=2, latency_runs=0)
    assert result.report["layers"]["removed"] == keys
    assert result.verification.ort == "passed"
    feeds = random_inputs(planted, {"x": [2, 7, 32]}, 3)
    assert max_rel_diff(run_model(planted, feeds), run_model(result.model, feeds)) <= 1e-5


def test_heads_keep_the_dynamic_dims(encoder):
    result = prune(encoder, filters=0.0, heads=0.5, latency_runs=0)
    assert _removed_by_kind(result) == {"heads": [(4, 2)] * 4}
    for batch, seq in ((1, 3), (3, 9)):
        out = run_model(result.model, {"x": np.ones((batch, seq, 32), np.float32)})
        assert out[0].shape == (batch, seq, 32)


def test_round_to_counts_what_the_hardware_sees(encoder):
    # 4 heads of 8 dims: any head count is a multiple of 8 wide, so rounding to 8 keeps the cut
    result = prune(encoder, filters=0.0, heads=0.25, round_to=8, latency_runs=0)
    assert _removed_by_kind(result) == {"heads": [(4, 1)] * 4}
    # rounding to 16 needs an even head count: 3 of 4 is as near to 2 as to 4, and the tie goes
    # to removing at least what was asked; the report says 8 heads went where 4 were asked
    result = prune(encoder, filters=0.0, heads=0.25, round_to=16, latency_runs=0)
    assert _removed_by_kind(result) == {"heads": [(4, 2)] * 4}
    assert result.report["rounding"] == {"round_to": 16, "channels": 16, "asked": 4, "removed": 8,
                                         "removed_ratio": 0.5, "groups_kept_whole": 0}
    assert any("removed 8 channel(s) against 4 asked" in note for note in result.report["notes"])
    # rounding to 32 needs a multiple of 4 heads: nothing below 4 is left, so every layer stays whole
    result = prune(encoder, filters=0.0, heads=0.25, round_to=32, latency_runs=0)
    assert _removed_by_kind(result) == {}
    assert any("--round-to 32 kept 4 group(s) whole" in note for note in result.report["notes"])


class SdpaAttention(Attention):
    """torch's fused attention: the legacy exporter computes its default scale at run time,
    1/sqrt(sqrt(head_dim)) on q and on k, from Shape(q)[-1]."""

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = (p(x).view(B, S, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(a.transpose(1, 2).reshape(B, S, D))


def test_run_time_attention_scale_keeps_the_original_head_dim(tmp_path):
    import onnx

    torch.manual_seed(0)
    net = Encoder(layers=2).eval()
    for block in net.blocks:
        old = block.attn
        block.attn = SdpaAttention()
        block.attn.load_state_dict(old.state_dict())
    path = tmp_path / "sdpa.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 5, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    model = onnx.load(str(path))
    assert any(n.op_type == "Sqrt" for n in model.graph.node)  # the scale is computed in the graph
    result = prune_planted(model, 0.25, head_dim=True)
    assert [len(gone) for kind, gone in _removed_by_kind(result).items()] == [4]  # q/k and v/o, both layers


def test_heads_ratio_with_a_macs_target_is_cut_as_given(encoder):
    # one head of four per layer, whatever the allocation would choose; the MLPs make up the rest
    result = prune(encoder, target_macs=0.75, heads=0.25, latency_runs=0)
    removed = _removed_by_kind(result)
    assert removed["heads"] == [(4, 1)] * 4
    assert removed.get("neurons")  # the heads alone do not reach the target
    macs = result.report["macs"]
    assert macs["after"] <= 0.75 * macs["before"]
    assert any("heads cut by 0.25 as given" in note for note in result.report["notes"])
    # the width is the encoder's output here, so a hidden ratio cannot be cut: the note says so
    # rather than claiming a cut
    widths = prune(encoder, target_macs=0.75, heads=0.25, hidden=0.25, latency_runs=0)
    assert "hidden" not in _removed_by_kind(widths)
    assert any("hidden 0.25 given, but no hidden group is prunable here" in n for n in widths.report["notes"])


def test_nothing_removed_names_the_ratio_that_rounds_to_zero(encoder):
    # --heads 0.2 of 4 heads is no head; the MLP groups (64 wide) have no ratio and are not the reason
    result = prune(encoder, filters=0.0, heads=0.2, latency_runs=0)
    assert _removed_by_kind(result) == {}
    assert result.report["summary"]["nothing_removed"] == (
        "--heads 0.2 removes floor(0.2 x 4) = 0 heads even from the largest heads group")
