"""Fused attention ops: ONNX Attention (opset 23, incl. grouped-query), com.microsoft
MultiHeadAttention and Attention. Dead heads / head_size channels must prune exactly, with
head counts, the implicit scale, per-head masks and packed biases rewritten."""
import numpy as np
import pytest
from onnx import numpy_helper
from planting import prune_planted
from textmodel import text_model

from onnxprune.core.dependency import analyze_model

S, QH, KVH, D = 5, 4, 2, 8  # sequence, query heads, kv heads, head_size
E = QH * D


def _attr(model, op, name):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next((a for a in node.attribute if a.name == name), None)


def _init(model, name):
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name.split("__")[0] == name)


def _pruned(result):
    return [(d.group.kind, d.group.channels, len(d.removed)) for d in result.plan.decisions if len(d.removed)]


GQA_3D = f"""
g (float[1,{S},{E}] x) => (float[1,{S},{E}] y) {{
  q = MatMul(x, Wq)
  k = MatMul(x, Wk)
  v = MatMul(x, Wv)
  c = Attention <q_num_heads={QH}, kv_num_heads={KVH}> (q, k, v, mask)
  o = MatMul(c, Wo)
  y = Add(o, x)
}}"""
GQA_WEIGHTS = {"Wq": (E, E), "Wk": (E, KVH * D), "Wv": (E, KVH * D), "Wo": (E, E),
               "mask": (1, QH, S, S)}  # an additive bias per query head


def _gqa():
    return text_model(GQA_3D, GQA_WEIGHTS, opset=23, ir_version=10)


def test_grouped_query_heads_go_with_their_kv_head():
    result = prune_planted(_gqa(), 0.5, heads=True)
    assert _pruned(result) == [("heads", KVH, 1)]
    assert _attr(result.model, "Attention", "q_num_heads").i == QH // 2
    assert _attr(result.model, "Attention", "kv_num_heads").i == KVH // 2
    assert _init(result.model, "mask").shape == (1, QH // 2, S, S)
    assert _init(result.model, "Wq").shape == (E, E // 2) and _init(result.model, "Wk").shape == (E, D)


def test_head_size_pruning_keeps_the_implicit_scale():
    # Without the explicit scale the op would use 1/sqrt(new head_size) and the planted
    # model would no longer match.
    result = prune_planted(_gqa(), 0.5, head_dim=True)
    assert sorted(_pruned(result)) == [("head_dim", D, D // 2)] * 2
    assert _attr(result.model, "Attention", "scale").f == pytest.approx(1 / np.sqrt(D))


FOUR_D = f"""
g (float[1,{QH},{S},{D}] q, float[1,{S},{E}] x, float[1,{QH},2,{D}] past) => (float[1,{S},{E}] y) {{
  k0 = MatMul(x, Wk)
  k1 = Reshape(k0, split)
  k = Transpose <perm=[0,2,1,3]> (k1)
  c = Attention (q, k, k, past, past)
  c1 = Transpose <perm=[0,2,1,3]> (c)
  y = Reshape(c1, merge)
}}"""


def test_past_cache_keeps_kv_heads():
    model = text_model(FOUR_D, {"Wk": (E, E), "split": np.array([1, S, QH, D], np.int64),
                                "merge": np.array([1, S, E], np.int64)}, opset=23, ir_version=10)
    analysis = analyze_model(model, heads=True)
    [group] = [g for g in analysis.groups if g.kind == "heads"]
    assert not group.prunable and any("past cache" in r for r in group.fixed_reasons)


MHA = f"""
g (float[1,{S},{E}] x) => (float[1,{S},{E}] y) {{
  q = MatMul(x, Wq)
  k = MatMul(x, Wk)
  v = MatMul(x, Wv)
  c = com.microsoft.MultiHeadAttention <num_heads={QH}> (q, k, v, bias)
  o = MatMul(c, Wo)
  y = Add(o, x)
}}"""


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "head_size"])
def test_microsoft_multihead_attention_slices_its_packed_bias(heads):
    model = text_model(MHA, {"Wq": (E, E), "Wk": (E, E), "Wv": (E, E), "Wo": (E, E), "bias": (3 * E,)},
                       domains={"com.microsoft": 1})
    result = prune_planted(model, 0.5, heads=heads, head_dim=not heads)
    assert _init(result.model, "bias").shape == (3 * E // 2,)
    if heads:
        assert _attr(result.model, "MultiHeadAttention", "num_heads").i == QH // 2
    else:
        assert _attr(result.model, "MultiHeadAttention", "scale").f == pytest.approx(1 / np.sqrt(D))


MS_ATTENTION = f"""
g (float[1,{S},{E}] x) => (float[1,{S},{E}] y) {{
  c = com.microsoft.Attention <num_heads={QH}{{sizes}}> (x, W, B)
  o = MatMul(c, Wo)
  y = Add(o, x)
}}"""


@pytest.mark.parametrize("heads", [True, False], ids=["heads", "head_size"])
@pytest.mark.parametrize("v_size", [D, 2 * D], ids=["equal", "wider_v"])
def test_microsoft_attention_prunes_its_packed_weight(heads, v_size):
    sizes = f", qkv_hidden_sizes=[{E},{E},{QH * v_size}]" if v_size != D else ""
    packed = 2 * E + QH * v_size
    model = text_model(MS_ATTENTION.replace("{sizes}", sizes),
                       {"W": (E, packed), "B": (packed,), "Wo": (QH * v_size, E)}, domains={"com.microsoft": 1})
    result = prune_planted(model, 0.5, heads=heads, head_dim=not heads)
    assert _init(result.model, "W").shape == (E, packed // 2)
    if v_size != D:
        assert list(_attr(result.model, "Attention", "qkv_hidden_sizes").ints) == [E // 2, E // 2, QH * v_size // 2]
