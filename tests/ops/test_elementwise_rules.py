"""Activations, broadcasting binaries (residuals, decomposed BN, PRelu), normalization."""
import numpy as np
from planting import prune_planted
from textmodel import skipped_reasons, text_model

CONV_IN = {"W1": (8, 3, 1, 1), "W2": (4, 8, 1, 1)}


def test_residual_add_couples_both_branches():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      b = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (a, Wb)
      c = Relu(b)
      s = Add(a, c)
      y = Conv <kernel_shape=[1,1]> (s, W2)
    }""", {**CONV_IN, "Wb": (8, 8, 3, 3)})
    result = prune_planted(m, 0.5)
    assert len(result.plan.decisions) == 1  # a, b and the sum are one group


def test_batchnorm_and_activation_zoo():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      b = BatchNormalization(a, s, bb, mu, var)
      c = HardSwish(b)
      d = LeakyRelu(c)
      e = Clip(d, lo, hi)
      f = HardSigmoid(e)
      h = Mul(f, e)
      i = Sigmoid(h)
      j = Tanh(i)
      k = Erf(j)
      l = Softplus(k)
      n = Mish(l)
      y = Conv <kernel_shape=[1,1]> (n, W2)
    }""", {**CONV_IN, "s": (8,), "bb": (8,), "mu": (8,), "var": ("positive", (8,)),
           "lo": np.array(-1.0, np.float32), "hi": np.array(6.0, np.float32)}, opset=18)
    prune_planted(m, 0.5)


def test_decomposed_batchnorm_constants_and_prelu_slopes_are_sliced():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      b = Sub(a, mean)
      c = Mul(b, scale)
      d = Add(c, shift)
      e = Div(d, den)
      p = PRelu(e, slope)
      y = Conv <kernel_shape=[1,1]> (p, W2)
    }""", {**CONV_IN, "mean": (1, 8, 1, 1), "scale": (8, 1, 1), "shift": (1, 8, 1, 1),
           "den": ("positive", (8, 1, 1)), "slope": (8, 1, 1)})
    result = prune_planted(m, 0.5)
    roles = sorted({m.role for d in result.plan.decisions for m in d.group.members})
    assert roles == ["divisor", "offset", "scale", "slope", "weight_in", "weight_out"]


def test_se_block_gates_channels_through_pool_and_mul():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      p = GlobalAveragePool(a)
      s1 = Conv <kernel_shape=[1,1]> (p, Ws1, Bs1)
      r = Relu(s1)
      s2 = Conv <kernel_shape=[1,1]> (r, Ws2, Bs2)
      h = HardSigmoid(s2)
      m = Mul(a, h)
      y = Conv <kernel_shape=[1,1]> (m, W2)
    }""", {**CONV_IN, "Ws1": (4, 8, 1, 1), "Bs1": (4,), "Ws2": (8, 4, 1, 1), "Bs2": (8,)})
    result = prune_planted(m, 0.5)
    assert sorted(d.group.channels for d in result.plan.decisions) == [4, 8]


def test_add_with_a_graph_input_fixes_the_group():
    m = text_model("""
    g (float[1,3,6,6] x, float[1,8,6,6] z) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Add(a, z)
      y = Conv <kernel_shape=[1,1]> (s, W2)
    }""", CONV_IN)
    result = prune_planted(m, 0.5)
    assert result.plan.decisions == []
    assert any("whose channels are fixed" in r for r in skipped_reasons(result))


def test_instance_norm_slices_scale_and_bias():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      b = InstanceNormalization(a, s, bb)
      y = Conv <kernel_shape=[1,1]> (b, W2)
    }""", {**CONV_IN, "s": (8,), "bb": (8,)})
    prune_planted(m, 0.5)
