"""--layers: whole residual blocks go; planted identity blocks must go exactly, outputs unchanged."""
import numpy as np
import pytest
from conftest import max_rel_diff, run_model
from planting import plant_identity_blocks
from textmodel import text_model

from onnxprune import OnnxPruneError, prune
from onnxprune import blocks as blk
from onnxprune.core.graph import Graph
from onnxprune.core.metrics import random_inputs
from onnxprune.core.shapes import complete_shapes, concrete_input_shapes


def _same_function(a, b, seed=5):
    shapes, _ = concrete_input_shapes(a)
    feeds = random_inputs(a, shapes, seed)
    return max_rel_diff(run_model(a, feeds), run_model(b, feeds))


def test_planted_identity_blocks_in_a_resnet_are_removed_exactly(export_fixture):
    planted, keys = plant_identity_blocks(export_fixture("resnet"), 1)
    result = prune(planted, layers=1, latency_runs=0)
    assert result.report["layers"]["removed"] == keys
    assert result.report["params"]["after"] < result.report["params"]["before"]
    assert _same_function(planted, result.model) <= 1e-5


PRE_LN = """
g (float[1,6,16] x) => (float[1,6,16] y) {
  n1 = LayerNormalization <axis=-1> (x, g1, b1)
  h1 = MatMul(n1, U1)
  r1 = Relu(h1)
  f1 = MatMul(r1, D1)
  x1 = Add(x, f1)
  n2 = LayerNormalization <axis=-1> (x1, g2, b2)
  h2 = MatMul(n2, U2)
  r2 = Relu(h2)
  o2 = MatMul(r2, D2)
  f2 = Add(o2, c2)
  x2 = Add(x1, f2)
  n3 = LayerNormalization <axis=-1> (x2, g3, b3)
  h3 = MatMul(n3, U3)
  r3 = Relu(h3)
  f3 = MatMul(r3, D3)
  y = Add(x2, f3)
}"""
PRE_LN_WEIGHTS = {**{f"g{i}": (16,) for i in (1, 2, 3)}, **{f"b{i}": (16,) for i in (1, 2, 3)},
                  **{f"U{i}": (16, 32) for i in (1, 2, 3)}, **{f"D{i}": (32, 16) for i in (1, 2, 3)}, "c2": (16,)}


@pytest.mark.parametrize("importance", ["magnitude", "influence"])
def test_planted_identity_sublayer_of_a_pre_ln_transformer(importance):
    model = text_model(PRE_LN, PRE_LN_WEIGHTS)
    planted, keys = plant_identity_blocks(model, 1)
    assert len(blk.find_blocks(Graph(complete_shapes(planted)))) == 2  # the last Add is the graph output
    result = prune(planted, layers=1, layer_importance=importance, latency_runs=0)
    assert result.report["layers"]["removed"] == keys
    assert _same_function(planted, result.model) <= 1e-5
    assert sum(1 for n in result.model.graph.node if n.op_type == "MatMul") == 4


def test_named_blocks_and_bad_names():
    model = text_model(PRE_LN, PRE_LN_WEIGHTS)
    keys = [b.key for b in blk.find_blocks(Graph(complete_shapes(model)))]
    result = prune(model, drop_layers=(keys[0],), latency_runs=0)
    assert result.report["layers"]["removed"] == [keys[0]]
    with pytest.raises(OnnxPruneError, match="not a removable residual block"):
        prune(model, drop_layers=("nope",), latency_runs=0)
    with pytest.raises(OnnxPruneError, match="removable residual blocks"):
        prune(model, layers=5, latency_runs=0)


def test_block_influence_is_measured_on_calibration_data_when_given():
    model = text_model(PRE_LN, PRE_LN_WEIGHTS)
    planted, keys = plant_identity_blocks(model, 1)
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 6, 16)).astype(np.float32)} for i in range(3)]
    result = prune(planted, layers=1, layer_importance="influence", calib=feeds, latency_runs=0)
    assert result.report["layers"]["removed"] == keys
    assert "3 calibration samples" in result.report["layers"]["criterion"]


def test_a_block_whose_removal_breaks_the_model_is_kept(monkeypatch):
    import onnx_graphsurgeon as gs

    model = text_model(PRE_LN, PRE_LN_WEIGHTS)
    keys = [b.key for b in blk.find_blocks(Graph(complete_shapes(model)))]
    original_remove = blk.remove

    def breaking_remove(graph, chosen):  # removing the first block leaves a node reading nothing
        original_remove(graph, chosen)
        if any(b.key == keys[0] for b in chosen):
            dangling = gs.Variable("never_produced", dtype=np.float32)
            graph.gs.nodes.append(gs.Node("Relu", inputs=[dangling], outputs=[graph.gs.outputs[0]]))

    monkeypatch.setattr(blk, "remove", breaking_remove)
    result = prune(model, drop_layers=keys, latency_runs=0)
    assert result.report["layers"]["removed"] == keys[1:]
    assert [r["block"] for r in result.report["layers"]["rolled_back"]] == keys[:1]
    assert result.verification.ort == "passed"
    assert any("1 block(s) kept" in n for n in result.report["notes"])


POOL_MIXER = """
g (float[1,8,6,6] x) => (float[1,8,6,6] y) {
  p = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1], strides=[1,1], count_include_pad=0> (x)
  d = Sub(p, x)
  s = Mul(ls1, d)
  x1 = Add(x, s)
  c = Conv <kernel_shape=[1,1]> (x1, W)
  r = Relu(c)
  c2 = Conv <kernel_shape=[1,1]> (r, W2)
  s2 = Mul(c2, ls2)
  x2 = Add(x1, s2)
  y = Relu(x2)
}"""


def test_a_branch_without_weights_is_not_judged_by_magnitude():
    # PoolFormer/EfficientFormer token mixers (pool(x) - x, times a layer scale) have no weighted
    # layer: magnitude cannot say they add little, so the planted block (its layer scale zeroed)
    # is the one that goes, with the other's score reported as None
    rng = np.random.default_rng(0)
    weights = {"ls1": rng.standard_normal((8, 1, 1)).astype(np.float32), "W": (16, 8, 1, 1), "W2": (8, 16, 1, 1),
               "ls2": np.zeros((8, 1, 1), np.float32)}
    model = text_model(POOL_MIXER, weights)
    result = prune(model, layers=1, latency_runs=0)
    assert result.report["layers"]["removed"] == ["x2"] or result.report["layers"]["removed"][0].endswith("x2")
    assert None in result.report["layers"]["scores"].values()
    assert _same_function(model, result.model) <= 1e-5
