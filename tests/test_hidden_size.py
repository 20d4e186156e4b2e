"""--hidden: pruning the model width (token embeddings and the residual stream) through the
normalizations taken across it, on small token models written three ways (torch LayerNorm,
RMSNorm by hand, LayerNorm by hand with the variance of centred values), each exported by both
torch exporters with dynamic batch and sequence.

A dead width channel (zero in the embedding, in every layer writing the residual, in every
norm's scale) must go exactly: a mean over the width is put back to the original divisor, the
removed channels' share of a centred variance is added back, and a LayerNormalization op is
written out with the original statistics (or kept fused, approximate, when asked)."""
import warnings

import numpy as np
import onnx
import pytest
from conftest import max_rel_diff, run_model
from planting import prune_planted

from onnxprune import prune
from onnxprune.core.metrics import random_inputs

torch = pytest.importorskip("torch")

WIDTH, VOCAB, CLASSES = 32, 50, 10


class RMSNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class CentredLayerNorm(torch.nn.Module):
    """LayerNorm as Paddle and many hand-written models spell it: the variance of x - mean."""

    def __init__(self, dim):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.ones(dim)), torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + 1e-5) * self.weight + self.bias


NORMS = {"layernorm": torch.nn.LayerNorm, "rmsnorm": RMSNorm, "centred": CentredLayerNorm}


class Block(torch.nn.Module):
    def __init__(self, norm, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = NORMS[norm](WIDTH), NORMS[norm](WIDTH)
        self.qkv, self.out = torch.nn.Linear(WIDTH, 3 * WIDTH), torch.nn.Linear(WIDTH, WIDTH)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, 64), torch.nn.GELU(), torch.nn.Linear(64, WIDTH))

    def forward(self, x):
        # the attention's sizes are its own (as LLM code writes them), not read off the width
        B, S, _ = x.shape
        dim = WIDTH // self.heads
        q, k, v = (t.view(B, S, self.heads, dim).transpose(1, 2) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        a = ((q @ k.transpose(-2, -1)) * dim ** -0.5).softmax(-1)
        x = x + self.out((a @ v).transpose(1, 2).reshape(B, S, self.heads * dim))
        return x + self.mlp(self.norm2(x))


class TokenModel(torch.nn.Module):
    """Embedding, two pre-norm blocks, a final norm and a classifier over the tokens."""

    def __init__(self, norm):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.blocks = torch.nn.Sequential(Block(norm), Block(norm))
        self.norm, self.head = NORMS[norm](WIDTH), torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))))


def _export(net, path, exporter):
    ids = torch.randint(0, VOCAB, (2, 6))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(net, (ids,), str(path), dynamo=False, opset_version=17, input_names=["ids"],
                              output_names=["y"], dynamic_axes={"ids": {0: "batch", 1: "seq"}})
        else:
            dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
            torch.onnx.export(net, (ids,), str(path), dynamo=True, dynamic_shapes=dims, input_names=["ids"],
                              output_names=["y"])
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    cache = {}

    def get(norm, exporter):
        if (norm, exporter) not in cache:
            torch.manual_seed(0)
            net = TokenModel(norm).eval()
            with torch.no_grad():  # norms with non-trivial scales and shifts
                for module in net.modules():
                    for name in ("weight", "bias"):
                        if isinstance(module, tuple(NORMS.values())) and hasattr(module, name):
                            getattr(module, name).normal_(1.0 if name == "weight" else 0.0, 0.3)
            cache[norm, exporter] = _export(net, tmp_path_factory.mktemp("width") / f"{norm}_{exporter}.onnx",
                                            exporter)
        return cache[norm, exporter]

    return get


def _kinds(result):
    return [(d.group.kind, d.group.channels, len(d.removed)) for d in result.plan.decisions if len(d.removed)]


def _ops(model, op):
    return sum(node.op_type == op for node in model.graph.node)


def _differs(a, b, seed=1):
    feeds = random_inputs(a, {"ids": [2, 7]}, seed)
    return max_rel_diff(run_model(a, feeds), run_model(b, feeds))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_dead_width_goes_exactly(token_model, norm, exporter):
    result = prune_planted(token_model(norm, exporter), 0.25, hidden=True)
    assert _kinds(result) == [("hidden", WIDTH, 8)]
    note = next(n for n in result.report["notes"] if n.startswith("--hidden:"))
    assert "approximate" not in note
    assert result.report["params"]["after"] < result.report["params"]["before"]


def test_layernorm_is_written_out_exactly_or_kept_fused(token_model):
    from planting import plant_dead_channels

    planted, _ = plant_dead_channels(token_model("layernorm", "legacy"), 0.25, hidden=True)
    assert _ops(planted, "LayerNormalization") == 5
    exact = prune(planted, hidden=0.25, latency_runs=0)
    assert _ops(exact.model, "LayerNormalization") == 0 and _ops(exact.model, "Sqrt") == 5
    assert _differs(planted, exact.model) < 1e-4
    fused = prune(planted, hidden=0.25, hidden_layernorm="fused", latency_runs=0)
    assert _ops(fused.model, "LayerNormalization") == 5
    assert _kinds(fused) == [("hidden", WIDTH, 8)]
    # statistics over fewer channels: the function changes, and the run says so
    assert _differs(planted, fused.model) > 1e-3
    note = next(n for n in fused.report["notes"] if n.startswith("--hidden:"))
    assert "5 approximate" in note
    group = next(g for g in fused.report["groups"] if g["kind"] == "hidden")
    assert len(group["costs"]) == 5 and all("approximate" in c for c in group["costs"])


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_without_hidden_the_width_stays(token_model, norm):
    model = token_model(norm, "dynamo")
    result = prune(model, filters=0.25, latency_runs=0)
    assert "hidden" not in {d.group.kind for d in result.plan.decisions}
    assert _kinds(result) == [("neurons", 64, 16)] * 2  # the MLPs' hidden units only
    assert any(s["channels"] == WIDTH for s in result.report["skipped"])
    assert any("--hidden prunes it" in b for b in result.report["barriers"])  # the norms say how


def test_ratio_zero_is_the_same_function(token_model):
    model = token_model("layernorm", "dynamo")
    result = prune(model, hidden=0.0, latency_runs=0)
    assert not _kinds(result)
    assert _differs(model, result.model) == 0.0


def test_plan_file_reapplies_the_width(token_model):
    model = token_model("rmsnorm", "legacy")
    first = prune(model, hidden=0.25, latency_runs=0)
    plan = first.plan.to_json()
    assert plan["hidden"] is True
    again = prune(model, plan=plan, latency_runs=0)
    assert _kinds(again) == _kinds(first)
    assert _differs(first.model, again.model) == 0.0


def test_width_that_is_the_output_stays(tmp_path):
    """An encoder whose output is the hidden state: the width is its interface."""
    torch.manual_seed(0)
    net = TokenModel("layernorm").eval()
    net.head = torch.nn.Identity()
    model = _export(net, tmp_path / "encoder.onnx", "legacy")
    result = prune(model, hidden=0.25, latency_runs=0)
    assert not _kinds(result)
    reason = result.report["summary"]["nothing_removed"]
    assert reason.startswith("--hidden: the model width cannot be pruned") and "graph output" in reason


def test_width_with_a_macs_target_is_cut_as_given(token_model):
    model = token_model("rmsnorm", "dynamo")
    result = prune(model, target_macs=0.6, hidden=0.25, latency_runs=0)
    kinds = _kinds(result)
    assert ("hidden", WIDTH, 8) in kinds and len(kinds) > 1
    assert result.report["macs"]["after"] <= 0.62 * result.report["macs"]["before"]


def test_width_round_to(token_model):
    """--round-to applies to the width like any other group: 32 - 25% rounds to 24, a multiple of 8."""
    result = prune(token_model("rmsnorm", "legacy"), hidden=0.3, round_to=8, latency_runs=0)
    assert _kinds(result) == [("hidden", WIDTH, 8)]
    assert np.all(np.diff(result.plan.decisions[0].removed) > 0)
