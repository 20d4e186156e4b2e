"""Fused attention ops: ONNX Attention (opset 23) and com.microsoft MultiHeadAttention / Attention.

Inside the op, q and k are contracted over head_size, scores are taken per head, and
the context of q head i reads kv head i // g (g = q heads per kv head; g > 1 is
grouped-query attention). So channels can go two ways, matching how head reshapes
are read elsewhere (see flatten_reshape):

- heads mode (--heads): whole kv heads go, each with its g query heads;
- otherwise head_size goes, the same indices in every head (q/k share one head_size,
  v has its own).

Hidden axes of 3D inputs are laid out heads-outer ([B, S, heads * head_size]). The
head counts in attributes are rewritten, and so is the default scale 1/sqrt(head_size),
which would otherwise follow the pruned size. Past/present caches are graph interfaces:
channels reaching them stay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from onnxprune.core.layout import expand, tile
from onnxprune.core.rules import OpRule, Refuse, register


@dataclass
class Heads:
    """The structure inside one attention node, each a layout or None when untracked."""

    q_heads: tuple | None = None
    kv_heads: tuple | None = None
    qk_dim: tuple | None = None  # head_size shared by q and k
    v_dim: tuple | None = None


def _agree(ctx, layouts, what):
    """Unify the tracked layouts when all are tracked; else the tracked ones keep their size."""
    tracked = [lay for lay in layouts if lay is not None]
    if not tracked:
        return None
    if len(tracked) < len(layouts):
        for lay in tracked:
            ctx.fix(lay, f"{what} meets an input whose channels are not followed")
        return tracked[0]
    for other in tracked[1:]:
        ctx.unify(tracked[0], other)
    return tracked[0]


def _hidden_structure(ctx, q_heads, kv_heads, qk_size, v_size, inputs=None):
    """3D hidden axes laid out as heads x head_size, unified with the q/k/v `inputs` that
    come in (None: the projections happen inside the op).

    Returns (Heads, layouts of the q/k/v hidden axes, layout of the output's hidden axis).
    """
    g = q_heads // kv_heads
    heads = Heads()
    if ctx.heads_mode:
        kv = ctx.new_channels(kv_heads, heads=True)
        heads.kv_heads, heads.q_heads = kv, expand(kv, g)
        hidden = (expand(kv, g * qk_size), expand(kv, qk_size), expand(kv, v_size))
        out = expand(kv, g * v_size)
    else:
        heads.qk_dim, heads.v_dim = ctx.new_channels(qk_size, head_dim=True), ctx.new_channels(v_size, head_dim=True)
        hidden = (tile(heads.qk_dim, q_heads), tile(heads.qk_dim, kv_heads), tile(heads.v_dim, kv_heads))
        out = tile(heads.v_dim, q_heads)
    for tensor, structure in zip(inputs or (), hidden):
        incoming = ctx.layouts(tensor).get(2)
        if incoming is not None:
            ctx.unify(incoming, structure)
        else:
            ctx.fix(structure, f"input {tensor.name!r} keeps its hidden size")
    return heads, hidden, out


def _check_other_axes(ctx, index, allowed):
    for axis in ctx.input_layouts(index):
        if axis not in allowed:
            raise Refuse(f"channels on axis {axis} of input {index} (batch or sequence)")


def _per_head_bias(ctx, index, heads_layout, q_heads):
    """An additive mask/bias broadcast to [B, q_heads, S, T]: its heads axis shrinks with the heads."""
    tensor = ctx.input(index)
    if tensor is None:
        return
    shape = ctx.shape(tensor)
    if shape is None:
        if heads_layout is not None:
            ctx.fix(heads_layout, f"mask {tensor.name!r} has an unknown shape")
        return
    axis = len(shape) - 3
    if axis < 0 or shape[axis] == 1 or heads_layout is None:
        _check_other_axes(ctx, index, set())
        return
    if shape[axis] != q_heads:
        raise Refuse(f"mask {tensor.name!r} has {shape[axis]} entries on its heads axis")
    _check_other_axes(ctx, index, {axis})
    incoming = ctx.input_layouts(index).get(axis)
    if incoming is not None:
        ctx.unify(incoming, heads_layout)
    elif ctx.is_weight(index):
        ctx.attach(index, axis, heads_layout, "offset")
    else:
        ctx.fix(heads_layout, f"mask {tensor.name!r} is computed per head")


def _caches(ctx, heads: Heads, past: tuple, present: tuple):
    """Past inputs and present outputs, [B, kv_heads, seq, head_size]: graph interfaces."""
    node = ctx.node
    for index, dim in zip(past, (heads.qk_dim, heads.v_dim)):
        if ctx.input(index) is None:
            continue
        for lay in (heads.kv_heads, dim):
            if lay is not None:
                ctx.fix(lay, f"past cache {ctx.input(index).name!r} keeps its size")
        _check_other_axes(ctx, index, set())
    for index, dim in zip(present, (heads.qk_dim, heads.v_dim)):
        if index < len(node.outputs) and node.outputs[index].name:
            if heads.kv_heads is not None:
                ctx.set_layout(node.outputs[index], 1, heads.kv_heads)
            if dim is not None:
                ctx.set_layout(node.outputs[index], 3, dim)


def _rewrite_on_apply(ctx, heads: Heads, qk_size: int, attrs: dict):
    """Head-count attributes follow the heads; an implicit scale stays 1/sqrt(original head_size)."""
    node = ctx.node
    implicit_scale = ctx.attr("scale") is None and heads.qk_dim is not None

    def rewrite(ap):
        for name, layout in attrs.items():
            ap.set_attr(node, name, ap.new_size(layout))
        if implicit_scale and ap.new_size(heads.qk_dim) != qk_size:
            ap.set_attr(node, "scale", 1.0 / math.sqrt(qk_size))

    ctx.on_apply(rewrite)


@register
class OnnxAttentionRule(OpRule):
    """ONNX Attention (opset 23+): Q/K/V as [B, heads, S, head_size] or as 3D hidden with
    q_num_heads/kv_num_heads attributes."""

    ops = ("Attention",)

    def propagate(self, node, ctx):
        if not ctx.any_tracked():
            return
        q, k, v = ctx.input(0), ctx.input(1), ctx.input(2)
        sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
        if sq is None or sk is None or sv is None or len(sq) not in (3, 4) or len(sk) != len(sq):
            raise Refuse("Q/K/V of unknown or unsupported rank")
        if len(sq) == 4:
            q_heads, kv_heads, qk_size, v_size = sq[1], sk[1], sq[3], sv[3]
        else:
            q_heads, kv_heads = ctx.attr("q_num_heads"), ctx.attr("kv_num_heads")
            if not q_heads or not kv_heads or None in (sq[2], sk[2], sv[2]):
                raise Refuse("3D Q/K/V need q_num_heads, kv_num_heads and static hidden sizes")
            qk_size, v_size = sq[2] // q_heads, sv[2] // kv_heads
        if None in (q_heads, kv_heads, qk_size, v_size) or q_heads % kv_heads:
            raise Refuse(f"{q_heads} query heads do not group over {kv_heads} kv heads")
        g = q_heads // kv_heads
        y = node.outputs[0]
        if len(sq) == 4:
            for index in range(3):
                _check_other_axes(ctx, index, {1, 3})
            lq, lk, lv = (ctx.input_layouts(i) for i in range(3))
            heads = Heads(qk_dim=_agree(ctx, [lq.get(3), lk.get(3)], "head_size"), v_dim=lv.get(3))
            heads.kv_heads = _agree(ctx, [lk.get(1), lv.get(1)], "kv heads")
            if heads.kv_heads is not None and lq.get(1) is not None:
                ctx.unify(lq.get(1), expand(heads.kv_heads, g))
                heads.q_heads = lq.get(1)
            elif heads.kv_heads is not None or lq.get(1) is not None:
                _agree(ctx, [heads.kv_heads, lq.get(1)], "query heads")
            if heads.q_heads is not None:
                ctx.set_layout(y, 1, heads.q_heads)
            if heads.v_dim is not None:
                ctx.set_layout(y, 3, heads.v_dim)
        else:
            for index in range(3):
                _check_other_axes(ctx, index, {2})
            heads, _, out = _hidden_structure(ctx, q_heads, kv_heads, qk_size, v_size, (q, k, v))
            ctx.set_layout(y, 2, out)
        if heads.qk_dim is not None:
            ctx.consume(heads.qk_dim)  # contracted inside the op
        _per_head_bias(ctx, 3, heads.q_heads, q_heads)
        _caches(ctx, heads, past=(4, 5), present=(1, 2))
        if len(node.outputs) > 3 and node.outputs[3].name and heads.q_heads is not None:
            ctx.set_layout(node.outputs[3], 1, heads.q_heads)  # the qk matmul output
        attrs = {}
        if heads.q_heads is not None:
            attrs = {"q_num_heads": heads.q_heads, "kv_num_heads": heads.kv_heads}
        _rewrite_on_apply(ctx, heads, qk_size, {k: v for k, v in attrs.items() if k in node.attrs})


def _microsoft_output(ctx, heads: Heads, out, qk_size: int, num_heads: int, bias_index: int) -> None:
    """What the two com.microsoft ops share after their inputs: the per-head attention bias,
    the [B, S, v_hidden] output, the contracted head_size and the num_heads/scale rewrite."""
    _per_head_bias(ctx, bias_index, heads.q_heads, num_heads)
    ctx.set_layout(ctx.node.outputs[0], 2, out)
    if heads.qk_dim is not None:
        ctx.consume(heads.qk_dim)
    _rewrite_on_apply(ctx, heads, qk_size, {"num_heads": heads.q_heads} if heads.q_heads is not None else {})


def _num_heads(ctx):
    heads = ctx.attr("num_heads")
    if not heads:
        raise Refuse("no num_heads attribute")
    return int(heads)


@register
class MultiHeadAttentionRule(OpRule):
    """com.microsoft MultiHeadAttention with separate 3D query, key and value (not packed)."""

    ops = ("MultiHeadAttention",)
    domain = "com.microsoft"

    @staticmethod
    def output_shape(node, graph):
        """onnx has no shape function for contrib ops: [B, S, v_hidden] for 3D query and value."""
        sq = graph.shape(node.inputs[0])
        sv = graph.shape(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if sq is None or sv is None or len(sq) != 3 or len(sv) != 3:
            return None
        return [sq[0], sq[1], sv[2]]

    def propagate(self, node, ctx):
        if not ctx.any_tracked():
            return
        q, k, v = ctx.input(0), ctx.input(1), ctx.input(2)
        shapes = [ctx.shape(t) if t is not None else None for t in (q, k, v)]
        if any(s is None or len(s) != 3 or s[2] is None for s in shapes):
            raise Refuse("only separate 3D query, key and value are followed (packed or BNSH layouts are not)")
        num_heads = _num_heads(ctx)
        qk_size, v_size = shapes[0][2] // num_heads, shapes[2][2] // num_heads
        for index in (0, 1, 2):
            _check_other_axes(ctx, index, {2})
        heads, hidden, out = _hidden_structure(ctx, num_heads, num_heads, qk_size, v_size, (q, k, v))
        _check_other_axes(ctx, 3, {0})
        bias = ctx.input(3)
        if bias is not None:
            if not ctx.is_weight(3):
                raise Refuse("bias is computed at run time")
            ctx.attach(3, 0, hidden[0] + hidden[1] + hidden[2], "bias")
        _check_other_axes(ctx, 4, set())
        _caches(ctx, heads, past=(6, 7), present=(1, 2))
        _microsoft_output(ctx, heads, out, qk_size, num_heads, bias_index=5)


@register
class MicrosoftAttentionRule(OpRule):
    """com.microsoft Attention: one input, a packed [in, q+k+v] weight and bias, num_heads heads."""

    ops = ("Attention",)
    domain = "com.microsoft"

    @staticmethod
    def output_shape(node, graph):
        shape, w_shape = graph.shape(node.inputs[0]), graph.shape(node.inputs[1])
        if shape is None or len(shape) != 3 or w_shape is None or len(w_shape) != 2 or w_shape[1] is None:
            return None
        sizes = node.attrs.get("qkv_hidden_sizes")
        return [shape[0], shape[1], int(sizes[2]) if sizes else w_shape[1] // 3]

    def propagate(self, node, ctx):
        x = ctx.input(0)
        shape, w_shape = ctx.shape(x), ctx.shape(ctx.input(1))
        if shape is None or len(shape) != 3 or w_shape is None or len(w_shape) != 2:
            raise Refuse("input must be [B, S, hidden] with a 2D weight")
        if not ctx.is_weight(1) or (ctx.input(2) is not None and not ctx.is_weight(2)):
            raise Refuse("weights are computed at run time")
        num_heads = _num_heads(ctx)
        sizes = [int(s) for s in (ctx.attr("qkv_hidden_sizes") or [w_shape[1] // 3] * 3)]
        if sum(sizes) != w_shape[1] or any(s % num_heads for s in sizes) or sizes[0] != sizes[1]:
            raise Refuse(f"q/k/v hidden sizes {sizes} do not split into {num_heads} heads")
        if ctx.input(4) is not None or (len(node.outputs) > 1 and node.outputs[1].name):
            raise Refuse("past/present state is followed only in MultiHeadAttention")
        _check_other_axes(ctx, 0, {2})
        incoming = ctx.input_layouts(0).get(2)
        if incoming is not None:
            ctx.attach(1, 0, incoming, "weight_in")
        qk_size, v_size = sizes[0] // num_heads, sizes[2] // num_heads
        if ctx.attr("do_rotary") and not ctx.heads_mode:
            raise Refuse("rotary embedding needs the whole head size")
        heads, hidden, out = _hidden_structure(ctx, num_heads, num_heads, qk_size, v_size)
        packed = hidden[0] + hidden[1] + hidden[2]
        ctx.attach(1, 1, packed, "weight_out")
        ctx.attach(2, 0, packed, "bias")
        _check_other_axes(ctx, 3, set())
        _microsoft_output(ctx, heads, out, qk_size, num_heads, bias_index=5)
        if ctx.attr("qkv_hidden_sizes") is not None:
            ctx.on_apply(lambda ap: ap.set_attr(node, "qkv_hidden_sizes", [ap.new_size(h) for h in hidden]))
