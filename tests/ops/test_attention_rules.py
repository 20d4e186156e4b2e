"""Attention: whole heads through q/k/v projections, head reshapes, score and context MatMuls."""
import numpy as np
from planting import prune_planted
from textmodel import text_model

I64 = np.int64
H, D, S, E = 4, 8, 5, 32  # heads, head_dim, sequence, hidden = H * D

ATTENTION = f"""
g (float[1,{S},{E}] x) => (float[1,{S},{E}] y) {{
  q0 = MatMul(x, Wq)
  q1 = Add(q0, Bq)
  k0 = MatMul(x, Wk)
  k1 = Add(k0, Bk)
  v0 = MatMul(x, Wv)
  v1 = Add(v0, Bv)
  q2 = Reshape(q1, split)
  k2 = Reshape(k1, split)
  v2 = Reshape(v1, split)
  q = Transpose <perm=[0,2,1,3]> (q2)
  k = Transpose <perm=[0,2,3,1]> (k2)
  v = Transpose <perm=[0,2,1,3]> (v2)
  s0 = MatMul(q, k)
  s1 = Mul(s0, scale)
  s2 = Add(s1, mask)
  p = Softmax <axis=-1> (s2)
  c0 = MatMul(p, v)
  c1 = Transpose <perm=[0,2,1,3]> (c0)
  c2 = Reshape(c1, merge)
  o = MatMul(c2, Wo)
  y = Add(o, x)
}}"""

WEIGHTS = {"Wq": (E, E), "Bq": (E,), "Wk": (E, E), "Bk": (E,), "Wv": (E, E), "Bv": (E,), "Wo": (E, E),
           "split": np.array([1, S, H, D], I64), "merge": np.array([1, S, E], I64),
           "scale": np.array(1 / np.sqrt(D), np.float32), "mask": np.zeros((1, 1, 1, S), np.float32)}


def test_dead_heads_are_removed_with_their_reshape_constants():
    result = prune_planted(text_model(ATTENTION, WEIGHTS), 0.5, heads=True)
    assert [(d.group.kind, d.group.channels, len(d.removed)) for d in result.plan.decisions if len(d.removed)] == \
        [("heads", H, H // 2)]
    init = {i.name.split("__")[0]: i for i in result.model.graph.initializer}
    assert list(np.frombuffer(init["split"].raw_data, I64)) == [1, S, H // 2, D]
    assert list(np.frombuffer(init["merge"].raw_data, I64)) == [1, S, E // 2]
    assert list(init["Wq"].dims) == [E, E // 2] and list(init["Wo"].dims) == [E // 2, E]


def test_without_heads_the_same_reshape_prunes_head_dim_in_every_head():
    result = prune_planted(text_model(ATTENTION, WEIGHTS), 0.5, head_dim=True)
    # q and k share head_dim through the scores; v has its own through the context
    assert [(d.group.kind, d.group.channels) for d in result.plan.decisions] == [("head_dim", D)] * 2


def test_heads_plan_round_trips_through_json():
    from onnxprune import prune

    model = text_model(ATTENTION, WEIGHTS)
    first = prune(model, heads=0.5, latency_runs=0)
    again = prune(model, plan=first.plan.to_json(), latency_runs=0)
    assert first.plan.to_json()["heads"] is True
    assert [list(d.removed) for d in again.plan.decisions] == [list(d.removed) for d in first.plan.decisions]
    assert again.model.SerializeToString() == first.model.SerializeToString()


def test_neurons_ratio_applies_to_dense_groups_only():
    from onnxprune import prune

    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,5] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      r = Relu(a)
      p = GlobalAveragePool(r)
      f = Flatten(p)
      h = Gemm <transB=1> (f, W2, B2)
      s = Relu(h)
      y = Gemm <transB=1> (s, W3)
    }""", {"W1": (8, 3, 1, 1), "W2": (16, 8), "B2": (16,), "W3": (5, 16)})
    result = prune(m, neurons=0.5, latency_runs=0)
    removed = {d.group.kind: len(d.removed) for d in result.plan.decisions}
    assert removed == {"filters": 0, "neurons": 8}
    both = prune(m, filters=0.25, neurons=0.5, latency_runs=0)
    assert {d.group.kind: len(d.removed) for d in both.plan.decisions} == {"filters": 2, "neurons": 8}


FUSED = f"""
g (float[1,{S},{E}] x) => (float[1,{S},{E}] y) {{
  a = MatMul(x, Wqkv)
  b = Add(a, Bqkv)
  r = Reshape(b, split3)
  t = Transpose <perm=[2,0,3,1,4]> (r)
  q = Gather <axis=0> (t, i0)
  k0 = Gather <axis=0> (t, i1)
  v = Gather <axis=0> (t, i2)
  k = Transpose <perm=[0,1,3,2]> (k0)
  s0 = MatMul(q, k)
  p = Softmax <axis=-1> (s0)
  c0 = MatMul(p, v)
  c1 = Transpose <perm=[0,2,1,3]> (c0)
  c2 = Reshape(c1, merge)
  y = MatMul(c2, Wo)
}}"""


def test_fused_qkv_projection_loses_whole_heads_in_q_k_and_v():
    # PP-OCR SVTR / GPT-style: one projection reshaped to [B, S, 3, H, D].
    m = text_model(FUSED, {"Wqkv": (E, 3 * E), "Bqkv": (3 * E,), "split3": np.array([1, S, 3, H, D], I64),
                           "i0": np.array(0, I64), "i1": np.array(1, I64), "i2": np.array(2, I64),
                           "merge": np.array([1, S, E], I64), "Wo": (E, E)})
    result = prune_planted(m, 0.5, heads=True)
    assert [(d.group.kind, d.group.channels, len(d.removed)) for d in result.plan.decisions if len(d.removed)] == \
        [("heads", H, H // 2)]
    init = {i.name.split("__")[0]: i for i in result.model.graph.initializer}
    assert list(init["Wqkv"].dims) == [E, 3 * E // 2]
