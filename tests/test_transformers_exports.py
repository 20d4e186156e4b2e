"""transformers-library BERT, GPT-2 and ViT (small configs, random weights, no hub access),
exported by torch: dead head_dims/neurons and dead whole heads must prune exactly."""
import warnings

import pytest
from planting import prune_planted

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


class _LastHidden(torch.nn.Module):
    """Keyword-only call with caches off, so both exporters see a plain tensor function."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        kwargs = dict(zip(self.names, args))
        if "pixel_values" not in kwargs:
            kwargs["use_cache"] = False
        return self.model(**kwargs).last_hidden_state


def _build(name):
    torch.manual_seed(0)
    t = transformers
    if name == "bert":
        config = t.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              vocab_size=100, max_position_embeddings=32)
        return t.BertModel(config), (torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.long)), \
            ["input_ids", "attention_mask"]
    if name == "gpt2":
        config = t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32)
        return t.GPT2Model(config), (torch.randint(0, 100, (1, 8)),), ["input_ids"]
    config = t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         image_size=32, patch_size=8)
    return t.ViTModel(config), (torch.randn(1, 3, 32, 32),), ["pixel_values"]


def _export(name, dynamo, tmp_path):
    import onnx

    model, inputs, names = _build(name)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_LastHidden(model.eval(), names).eval(), inputs, str(path), input_names=names,
                          output_names=["last_hidden_state"], opset_version=18 if dynamo else 17, dynamo=dynamo)
    return onnx.load(str(path))


# GPT-2 does not export with the legacy exporter under transformers 5.x and torch 2.13
# (aten::diff). BERT's legacy export builds its expand shapes with Where(Equal(...)), which
# onnx's shape inference cannot read; the batch dim is recovered by folding them.
CASES = [("bert", False), ("bert", True), ("gpt2", True), ("vit", False), ("vit", True)]


@pytest.mark.parametrize("name,dynamo", CASES, ids=[f"{n}-{'dynamo' if d else 'legacy'}" for n, d in CASES])
def test_whole_heads(tmp_path, name, dynamo):
    result = prune_planted(_export(name, dynamo, tmp_path), 0.5, heads=True)
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions if d.group.kind == "heads"] == [(4, 2)] * 2


@pytest.mark.parametrize("name,dynamo", CASES, ids=[f"{n}-{'dynamo' if d else 'legacy'}" for n, d in CASES])
def test_neurons(tmp_path, name, dynamo):
    result = prune_planted(_export(name, dynamo, tmp_path), 0.25)
    kinds = [d.group.kind for d in result.plan.decisions if len(d.removed)]
    assert kinds.count("neurons") >= 2


@pytest.mark.parametrize("name,dynamo", CASES, ids=[f"{n}-{'dynamo' if d else 'legacy'}" for n, d in CASES])
def test_identity_layers(tmp_path, name, dynamo):
    """A sublayer whose output projection is zero adds nothing: --layers 1 must find and drop it exactly."""
    from planting import plant_identity_blocks
    from test_layers import _same_function

    from onnxprune import prune

    planted, keys = plant_identity_blocks(_export(name, dynamo, tmp_path), 1)
    result = prune(planted, layers=1, latency_runs=0)
    assert result.report["layers"]["removed"] == keys
    assert result.report["params"]["after"] < result.report["params"]["before"]
    assert _same_function(planted, result.model) <= 1e-4
