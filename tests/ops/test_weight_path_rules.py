"""Weights reached through casts, transposes and quantization; shared initializers."""
import numpy as np
import onnx
from planting import prune_planted
from textmodel import text_model

RNG = np.random.default_rng(7)


def int8(shape):
    return RNG.integers(-100, 100, size=shape).astype(np.int8)


def positive(shape):
    return (RNG.random(shape) * 0.02 + 0.005).astype(np.float32)


def _stored(model, prefix):
    return next(i for i in model.graph.initializer if i.name.startswith(prefix))


def test_qdq_conv_slices_int8_weights_with_per_channel_scales():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      w1 = DequantizeLinear <axis=0> (Q1, S1, Z1)
      a = Conv <kernel_shape=[1,1]> (x, w1, B1)
      r = Relu(a)
      q = QuantizeLinear(r, act_s, act_z)
      d = DequantizeLinear(q, act_s, act_z)
      w2 = DequantizeLinear <axis=0> (Q2, S2, Z2)
      y = Conv <kernel_shape=[1,1]> (d, w2)
    }""", {"Q1": int8((8, 3, 1, 1)), "S1": positive((8,)), "Z1": np.zeros(8, np.int8), "B1": (8,),
           "act_s": np.array(0.05, np.float32), "act_z": np.array(3, np.int8),
           "Q2": int8((4, 8, 1, 1)), "S2": positive((4,)), "Z2": np.zeros(4, np.int8)}, opset=13, ir_version=7)
    result = prune_planted(m, 0.5)
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(8, 4)]
    q1, s1, q2 = (_stored(result.model, p) for p in ("Q1", "S1", "Q2"))
    assert q1.data_type == onnx.TensorProto.INT8 and list(q1.dims) == [4, 3, 1, 1]
    assert list(s1.dims) == [4] and list(q2.dims) == [4, 4, 1, 1]


def test_weight_only_int8_matmul_through_cast_and_scale():
    m = text_model("""
    g (float[2,6] x) => (float[2,3] y) {
      c1 = Cast <to=1> (Q1)
      w1 = Mul(c1, S1)
      a = MatMul(x, w1)
      r = Relu(a)
      c2 = Cast <to=1> (Q2)
      w2 = Mul(c2, S2)
      y = MatMul(r, w2)
    }""", {"Q1": int8((6, 10)), "S1": positive((10,)), "Q2": int8((10, 3)), "S2": positive((3,))})
    result = prune_planted(m, 0.3)
    assert list(_stored(result.model, "Q1").dims) == [6, 7] and list(_stored(result.model, "S1").dims) == [7]
    assert _stored(result.model, "Q1").data_type == onnx.TensorProto.INT8


def test_pre_transposed_and_fp16_weights():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,6,6,5] y) {
      h = Cast <to=1> (W1h)
      a = Conv <kernel_shape=[1,1]> (x, h)
      t = Transpose <perm=[0,2,3,1]> (a)
      wt = Transpose <perm=[1,0]> (W2t)
      y = MatMul(t, wt)
    }""", {"W1h": RNG.standard_normal((8, 3, 1, 1)).astype(np.float16), "W2t": (5, 8)})
    result = prune_planted(m, 0.5)
    assert list(_stored(result.model, "W2t").dims) == [5, 4]
    assert _stored(result.model, "W1h").data_type == onnx.TensorProto.FLOAT16


def test_initializer_shared_by_layers_of_different_groups_is_copied():
    # Legacy exporters deduplicate equal tensors: two convs read one initializer.
    m = text_model("""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {
      a = Conv <kernel_shape=[1,1]> (x, W)
      b = Conv <kernel_shape=[1,1]> (x, W)
      ra = Relu(a)
      rb = Sigmoid(b)
      y = Conv <kernel_shape=[1,1]> (ra, Wy)
      z = Conv <kernel_shape=[1,1]> (rb, Wz)
    }""", {"W": (8, 4, 1, 1), "Wy": (4, 8, 1, 1), "Wz": (4, 8, 1, 1)})
    result = prune_planted(m, 0.5)
    assert len(result.plan.decisions) == 2
