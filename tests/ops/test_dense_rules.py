"""Gemm / MatMul, Flatten and Reshape into fully connected layers, NHWC layouts."""
import numpy as np
from planting import prune_planted
from textmodel import text_model


def test_gemm_chain_with_transposed_weights():
    m = text_model("""
    g (float[2,6] x) => (float[2,3] y) {
      a = Gemm <transB=1> (x, W1, B1)
      r = Relu(a)
      y = Gemm (r, W2, B2)
    }""", {"W1": (10, 6), "B1": (10,), "W2": (10, 3), "B2": (3,)})
    result = prune_planted(m, 0.3)
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(10, 3)]


def test_matmul_on_last_axis_of_rank3():
    m = text_model("""
    g (float[1,5,6] x) => (float[1,5,4] y) {
      a = MatMul(x, W1)
      b = Add(a, B1)
      r = Relu(b)
      y = MatMul(r, W2)
    }""", {"W1": (6, 12), "B1": (12,), "W2": (12, 4)})
    prune_planted(m, 0.5)


def test_flatten_into_gemm_maps_channel_to_block():
    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,5] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      f = Flatten(a)
      y = Gemm <transB=1> (f, W2)
    }""", {"W1": (6, 3, 1, 1), "W2": (5, 96)})
    result = prune_planted(m, 0.5)
    gemm_w = next(i for i in result.model.graph.initializer if i.name.startswith("W2"))
    assert list(gemm_w.dims) == [5, 48]


def test_reshape_flatten_with_literal_target_is_rewritten():
    m = text_model("""
    g (float[2,3,4,4] x) => (float[2,5] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      f = Reshape(a, shape)
      y = MatMul(f, W2)
    }""", {"W1": (6, 3, 1, 1), "W2": (96, 5), "shape": np.array([2, 96], dtype=np.int64)})
    result = prune_planted(m, 0.5)
    target = next(i for i in result.model.graph.initializer if i.name.startswith("shape"))
    assert list(np.frombuffer(target.raw_data, dtype=np.int64)) == [2, 48]


def test_nhwc_transpose_conv_and_channels_last_flatten():
    m = text_model("""
    g (float[1,4,4,3] x) => (float[1,5] y) {
      t = Transpose <perm=[0,3,1,2]> (x)
      a = Conv <kernel_shape=[1,1]> (t, W1)
      r = Relu(a)
      n = Transpose <perm=[0,2,3,1]> (r)
      m = MatMul(n, W2)
      f = Flatten(m)
      y = Gemm (f, W3)
    }""", {"W1": (6, 3, 1, 1), "W2": (6, 8), "W3": (128, 5)})
    result = prune_planted(m, 0.5)
    assert sorted(d.group.channels for d in result.plan.decisions) == [6, 8]


def test_activation_scaled_by_a_constant_is_not_mistaken_for_a_weight():
    # GELU as exported by legacy torch ends in Mul(x, 0.5); with batch 1 the tensor once
    # looked like a weight computed from constants and its channels were silently dropped.
    m = text_model("""
    g (float[1,5,6] x) => (float[1,5,4] y) {
      a = MatMul(x, W1)
      e = Erf(a)
      h = Mul(e, half)
      y = MatMul(h, W2)
    }""", {"W1": (6, 12), "half": np.array(0.5, np.float32), "W2": (12, 4)})
    result = prune_planted(m, 0.5)
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(12, 6)]
    assert result.report["rolled_back"] == []


def test_channels_contracted_with_a_fixed_axis_stay_and_the_rest_prunes():
    # multi-query attention in small: a's 6 channels meet z's rows, which keep their size, so
    # they stay; d's 5 channels pass through the product to the output projection and prune.
    m = text_model("""
    g (float[1,4,8] x, float[1,6,8] z) => (float[1,4,3] y) {
      a = MatMul(x, Wa)
      d = MatMul(z, Wd)
      s = MatMul(a, d)
      y = MatMul(s, Wo)
    }""", {"Wa": (8, 6), "Wd": (8, 5), "Wo": (5, 3)})
    result = prune_planted(m, 0.4)
    assert [d.group.channels for d in result.plan.decisions] == [5]
    assert any("contracted with an axis that keeps its size" in s["reason"] for s in result.report["skipped"])
