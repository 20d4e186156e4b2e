"""Graph shapes that tf2onnx/Keras and Paddle exporters write."""
import numpy as np
from planting import prune_planted
from textmodel import text_model

I64 = np.int64


def test_tf2onnx_nhwc_block_with_decomposed_bn_pad_and_casts():
    m = text_model("""
    g (float[1,8,8,3] x) => (float[1,6,6,4] y) {
      t = Transpose <perm=[0,3,1,2]> (x)
      a = Conv <kernel_shape=[1,1]> (t, W1, B1)
      n = Transpose <perm=[0,2,3,1]> (a)
      s = Mul(n, gamma)
      b = Add(s, beta)
      r = Relu(b)
      c1 = Cast <to=10> (r)
      c2 = Cast <to=1> (c1)
      p = Pad(c2, pads)
      u = Transpose <perm=[0,3,1,2]> (p)
      v = Conv <kernel_shape=[3,3]> (u, W2)
      m = Max(v, floor)
      y = Transpose <perm=[0,2,3,1]> (m)
    }""", {"W1": (8, 3, 1, 1), "B1": (8,), "gamma": (1, 1, 1, 8), "beta": (8,),
           "pads": np.array([0, 0, 0, 0, 0, 0, 0, 0], I64), "W2": (4, 8, 3, 3),
           "floor": np.array(0.0, np.float32)}, opset=13, ir_version=7)
    result = prune_planted(m, 0.5)
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(8, 4)]


def test_paddle_style_weights_in_constant_nodes():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      w1 = Constant <value = float[6,3,1,1] {1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18}> ()
      a = Conv <kernel_shape=[1,1]> (x, w1)
      r = Relu(a)
      y = Conv <kernel_shape=[1,1]> (r, W2)
    }""", {"W2": (4, 6, 1, 1)}, opset=11, ir_version=6)
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [6]
