"""Flatten and Reshape: channel axes that merge with neighbours get an index mapping.

When an output axis is exactly the merge of input axes [s, e) containing the
channel axis t, channel c occupies, for every outer index o over axes [s, t), the
positions (o * C + c) * inner + j with inner = prod(dims (t, e)): the layout is
tiled by the outer size and expanded by the inner one. C -> C*H*W (Flatten before
Gemm) and H*W*C (NHWC flatten) are both of that form. An input axis that is split
over several output axes (attention heads) is refused here.
"""
import numpy as np

from onnxprune.layout import expand, tile
from onnxprune.rules import OpRule, Refuse, register

from ._common import norm_axis


def _suffix_products(dims):
    """out[k] = prod(dims[k:]); None where an unknown dim is involved."""
    out = [1]
    for d in reversed(dims):
        out.append(None if d is None or out[-1] is None else out[-1] * d)
    return out[::-1]


def map_merged_axes(ctx, layouts, in_shape, out_shape, out_tensor):
    """Set the output layouts; return {input axis: (output axis, output layout)}.

    Products are taken from the right, so an unknown batch dim in front does not matter.
    """
    if in_shape is None or out_shape is None:
        raise Refuse("unknown rank")
    rin, rout = _suffix_products(in_shape), _suffix_products(out_shape)
    placed = {}
    for t, layout in layouts.items():
        hi, lo = rin[t], rin[t + 1]
        if hi is None:
            raise Refuse("needs static shapes after the channel axis (fix dynamic dims with --input-shape)")
        o = next((k for k in range(len(out_shape))
                  if rout[k] is not None and rout[k + 1] is not None
                  and rout[k] >= hi and rout[k + 1] <= lo and out_shape[k] != 1), None)
        starts = [s for s in range(t + 1) if o is not None and rin[s] == rout[o]]
        ends = [e for e in range(t + 1, len(in_shape) + 1) if o is not None and rin[e] == rout[o + 1]]
        if o is None or not starts or not ends:
            raise Refuse(f"channel axis {t} is split across output axes")
        s, e = max(starts), min(ends)
        if any(o == other for other, _ in placed.values()):
            raise Refuse("two channel axes merge into one")
        outer, inner = rin[s] // hi, lo // rin[e]
        merged = tile(expand(layout, inner), outer)
        ctx.set_layout(out_tensor, o, merged)
        placed[t] = (o, merged)
    return placed


@register
class FlattenRule(OpRule):
    ops = ("Flatten",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        shape = ctx.shape(ctx.input(0))
        if shape is None:
            raise Refuse("input of unknown rank")
        axis = norm_axis(ctx.attr("axis", 1), len(shape)) if len(shape) else 0
        out_shape = (_product(shape[:axis]), _product(shape[axis:]))
        map_merged_axes(ctx, layouts, shape, out_shape, node.outputs[0])


@register
class ReshapeRule(OpRule):
    ops = ("Reshape",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        target = ctx.const(ctx.input(1))
        if target is None:
            raise Refuse("reshape target is computed at run time")
        target = [int(v) for v in np.asarray(target).reshape(-1)]
        in_shape = ctx.shape(ctx.input(0))
        out_shape = ctx.shape(node.outputs[0])
        if out_shape is None or None in out_shape:
            out_shape = _resolve_target(target, in_shape, int(ctx.attr("allowzero", 0))) or out_shape
        placed = map_merged_axes(ctx, layouts, in_shape, out_shape, node.outputs[0])
        literal = {}  # target entries that spell out a channel count
        for t, (o, merged) in placed.items():
            if target[o] == -1:
                continue
            if target[o] == 0 and not int(ctx.attr("allowzero", 0)):
                if o != t or in_shape[t] != out_shape[o]:
                    raise Refuse("copies a dimension that changes")
                continue
            if target[o] != ctx.size(merged):
                raise Refuse(f"target entry {target[o]} does not match {ctx.size(merged)} channels")
            literal[o] = merged
        if not literal:
            return

        def rewrite(ap):
            new = list(target)
            for o, merged in literal.items():
                new[o] = ap.new_size(merged)
            if new != target:
                ap.set_const_input(node, 1, np.array(new, dtype=np.int64))

        ctx.on_apply(rewrite)


def _product(dims):
    return None if None in dims else int(np.prod(dims, dtype=np.int64))


def _resolve_target(target, in_shape, allowzero):
    if in_shape is None or None in in_shape:
        return None
    shape = [in_shape[i] if (v == 0 and not allowzero) else v for i, v in enumerate(target)]
    if shape.count(-1) == 1:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known == 0 or total % known:
            return None
        shape[shape.index(-1)] = total // known
    return tuple(shape)
