"""What must not be pruned: ops across channels, unknown ops, outputs, subgraphs."""
import numpy as np
import onnx
from onnx import helper
from planting import prune_planted
from textmodel import skipped_reasons, text_model

CONV = {"Wa": (8, 3, 1, 1), "W2": (4, 8, 1, 1)}


def _only_skipped(result, text):
    assert result.plan.decisions == [] or all(len(d.removed) == 0 for d in result.plan.decisions)
    assert any(text in r for r in skipped_reasons(result)), skipped_reasons(result)


def test_softmax_over_channels_is_a_barrier():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      s = Softmax <axis=1> (a)
      y = Conv <kernel_shape=[1,1]> (s, W2)
    }""", CONV)
    _only_skipped(prune_planted(m, 0.5), "normalizes across the channels")


def test_layernorm_over_hidden_size_is_a_barrier():
    m = text_model("""
    g (float[1,5,6] x) => (float[1,5,4] y) {
      a = MatMul(x, Wa)
      n = LayerNormalization <axis=-1> (a, gamma, beta)
      y = MatMul(n, W2)
    }""", {"Wa": (6, 8), "gamma": (8,), "beta": (8,), "W2": (8, 4)})
    _only_skipped(prune_planted(m, 0.5), "LayerNorm over the hidden size")


def test_reduce_over_channels_is_a_barrier():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,1,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      y = ReduceMean <keepdims=1> (a, axes)
    }""", {"Wa": (8, 3, 1, 1), "axes": np.array([1], np.int64)}, opset=18)
    _only_skipped(prune_planted(m, 0.5), "reduces over the channels")


def test_op_without_rule_is_a_barrier_and_the_rest_is_pruned():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      d = DepthToSpace <blocksize=1> (a)
      b = Conv <kernel_shape=[1,1]> (d, Wb)
      r = Relu(b)
      y = Conv <kernel_shape=[1,1]> (r, W2)
    }""", {"Wa": (8, 3, 1, 1), "Wb": (8, 8, 1, 1), "W2": (4, 8, 1, 1)})
    result = prune_planted(m, 0.5)
    assert any("DepthToSpace" in r and "no op rule" in r for r in skipped_reasons(result))
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(8, 4)]


def test_reshape_that_mixes_channels_with_spatial_dims_is_refused():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,4,12,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      r = Reshape(a, shape)
      y = Conv <kernel_shape=[1,1,1]> (r, W2)
    }""", {"Wa": (8, 3, 1, 1), "shape": np.array([1, 1, 4, 12, 6], np.int64), "W2": (4, 1, 1, 1, 1)})
    _only_skipped(prune_planted(m, 0.5), "split across output axes")


def test_graph_output_keeps_its_channels():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,8,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      y = Relu(a)
    }""", {"Wa": (8, 3, 1, 1)})
    _only_skipped(prune_planted(m, 0.5), "graph output")


def test_tensor_read_inside_an_if_branch_is_fixed():
    m = text_model("""
    g (float[1,3,6,6] x, bool c) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      y = Conv <kernel_shape=[1,1]> (a, W2)
    }""", CONV)
    then_branch = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", 1, None)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", 1, None)])
    m.graph.node.append(helper.make_node("If", ["c"], ["branch"], then_branch=then_branch, else_branch=else_branch))
    m.graph.output.append(helper.make_tensor_value_info("branch", 1, None))
    _only_skipped(prune_planted(m, 0.5), "read inside a subgraph")


def test_custom_domain_op_is_a_barrier_and_onnxruntime_absence_is_reported():
    from onnx import parser

    from onnxprune import prune

    m = parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      c = com.example.Mystery(a)
      b = Conv <kernel_shape=[1,1]> (c, Wb)
      r = Relu(b)
      y = Conv <kernel_shape=[1,1]> (r, W2)
    }""")
    rng = np.random.default_rng(0)
    for name, shape in (("Wa", (8, 3, 1, 1)), ("Wb", (8, 8, 1, 1)), ("W2", (4, 8, 1, 1))):
        m.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    result = prune(m, filters=0.5, latency_runs=0)
    assert any("Mystery" in r and "no op rule" in r for r in skipped_reasons(result))
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(8, 4)]
    assert any("cannot run the input model" in n for n in result.report["notes"])
    assert result.verification.checker == "passed"
