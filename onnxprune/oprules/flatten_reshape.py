"""Flatten and Reshape: channel axes that merge with neighbours get an index mapping.

When an output axis covers the channel axis t together with neighbouring elements,
channel c occupies, for every outer index o, the positions (o * C + c) * inner + j,
where inner is how many output elements each channel step spans and outer how many
channel periods the axis holds: the layout is tiled by the outer size and expanded by
the inner one. C -> C*H*W (Flatten before
Gemm) and H*W*C (NHWC flatten) are both of that form.

When the channel axis is split over several output axes (C -> g x C/g in a channel
shuffle, hidden -> heads x head_dim), the channels are made to repeat with period
C/g: every group keeps the same inner indices, the innermost output axis carries them,
and the outer axes keep their sizes (as for grouped convolutions).
"""
import numpy as np

from onnxprune.core.layout import expand, tile
from onnxprune.core.rules import OpRule, Refuse, register
from onnxprune.core.shape_exprs import (
    Dim,
    Lit,
    deps,
    entries,
    reshape_output,
    static_value,
    symbolic_shape,
)

from ._common import norm_axis


class _Product:
    """A product of dims: an int times named symbolic dims (dims shape inference knows only by
    name, such as batch and sequence). Two products are equal, or one divides the other, when
    that holds for any values of the symbols."""

    __slots__ = ("coef", "symbols")

    def __init__(self, coef: int, symbols: tuple = ()) -> None:
        self.coef, self.symbols = int(coef), tuple(sorted(symbols))

    def times(self, dim) -> "_Product":
        if isinstance(dim, str):
            return _Product(self.coef, self.symbols + (dim,))
        return _Product(self.coef * int(dim), self.symbols)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Product) and (self.coef, self.symbols) == (other.coef, other.symbols)

    def __hash__(self) -> int:
        return hash((self.coef, self.symbols))

    def over(self, other: "_Product") -> "_Product | None":
        """self / other when that is a product of dims, else None."""
        if other.coef == 0 or self.coef % other.coef:
            return None
        rest = list(self.symbols)
        for symbol in other.symbols:
            if symbol not in rest:
                return None
            rest.remove(symbol)
        return _Product(self.coef // other.coef, tuple(rest))

    def value(self) -> int | None:
        return None if self.symbols else self.coef


def _suffix_products(dims):
    """out[k] = prod(dims[k:]) as _Product; None where an unknown dim (None) is involved.
    A dim is an int, a symbol name (str) or None."""
    out = [_Product(1)]
    for d in reversed(dims):
        out.append(None if d is None or out[-1] is None else out[-1].times(d))
    return out[::-1]


def _divides(a, b) -> bool:
    return a is not None and b is not None and b.over(a) is not None


def map_merged_axes(ctx, layouts, in_shape, out_shape, out_tensor):
    """Set the output layouts; return {input axis: (output axis, output layout)}.

    Products are taken from the right, so an unknown batch dim in front does not matter;
    dims known only by a symbolic name (str) take part as symbols.
    """
    if in_shape is None or out_shape is None:
        raise Refuse("unknown rank")
    rin, rout = _suffix_products(in_shape), _suffix_products(out_shape)
    placed = {}
    for t, layout in layouts.items():
        hi, lo = rin[t], rin[t + 1]
        if hi is None:
            raise Refuse("needs static shapes after the channel axis (fix dynamic dims with --input-shape)")
        split = _split_axes(rin, rout, t, out_shape)
        if split is not None:
            o_first, o_last = split
            real = [k for k in range(o_first, o_last + 1) if out_shape[k] != 1]
            # heads mode: [.., H, D] or [.., 3, H, D] (fused q/k/v): heads are the axis before
            # head_dim, anything in front repeats them; otherwise the innermost axis carries.
            o = real[-2] if ctx.heads_mode else real[-1]
            if any(o == other for other, _ in placed.values()):
                raise Refuse("two channel axes merge into one")
            inner = _Product(1)
            for k in range(o + 1, o_last + 1):
                inner = inner.times(out_shape[k])
            count = out_shape[o]
            repeats = hi.over(lo)
            repeats = repeats.over(_Product(count)) if repeats is not None and isinstance(count, int) else None
            outer = repeats.over(inner) if repeats is not None else None
            if outer is None or outer.value() is None or inner.value() is None:
                raise Refuse("channel axis splits into axes of unknown size")
            carrier = ctx.new_channels(count, heads=ctx.heads_mode, head_dim=not ctx.heads_mode)
            ctx.unify(layout, tile(expand(carrier, inner.value()), outer.value()))
            ctx.set_layout(out_tensor, o, carrier)
            placed[t] = (o, carrier)
            continue
        # The output axis holding the channel axis: its element stride divides the channel
        # axis's inner block, and its extent is a whole number of channel periods.
        o = next((k for k in range(len(out_shape))
                  if out_shape[k] != 1 and _divides(hi, rout[k]) and _divides(rout[k + 1], lo)), None)
        if o is None:
            raise Refuse(f"channel axis {t} is split across output axes")
        if any(o == other for other, _ in placed.values()):
            raise Refuse("two channel axes merge into one")
        outer, inner = rout[o].over(hi).value(), lo.over(rout[o + 1]).value()
        if outer is None or inner is None:
            raise Refuse("channel axis merges with axes of unknown size")
        merged = tile(expand(layout, inner), outer)
        ctx.set_layout(out_tensor, o, merged)
        placed[t] = (o, merged)
    return placed


def _split_axes(rin, rout, t, out_shape):
    """(outermost, innermost) output axes when input axis t splits exactly into several axes."""
    if rin[t] is None or rin[t + 1] is None:
        return None
    first = [k for k in range(len(out_shape)) if rout[k] == rin[t] and out_shape[k] != 1]
    last = [k for k in range(len(out_shape)) if rout[k + 1] == rin[t + 1] and out_shape[k] != 1]
    if not first or not last:
        return None
    o_first, o_last = min(first), max(last)
    if o_last <= o_first or any(rout[k] is None for k in range(o_first, o_last + 2)):
        return None
    if sum(1 for k in range(o_first, o_last + 1) if out_shape[k] != 1) < 2:
        return None
    return o_first, o_last


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
    """Constant targets, and targets computed at run time from Shape chains (see shape_exprs).

    Per output axis that carries channels, the target entry must be -1, a 0 that copies the
    same axis, a literal (rewritten in the constant it came from), or the run-time size of a
    tensor axis with the same channels. Entries elsewhere must not read a pruned dim.
    """

    ops = ("Reshape",)

    @staticmethod
    def output_shape(node, graph):
        """The output shape from a target that onnx's data propagation could not read."""
        if len(node.inputs) < 2:
            return None
        target = entries(graph, node.inputs[1])
        if target is None:
            return None
        return reshape_output(graph, target, node.inputs[0], graph.shape(node.inputs[0]),
                              int(node.attrs.get("allowzero", 0)))

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        target = entries(ctx.graph, ctx.input(1), node, 1)
        if target is None:
            raise Refuse("reshape target is computed at run time by ops onnxprune cannot follow")
        allowzero = int(ctx.attr("allowzero", 0))
        # dims known only by name (batch, sequence) take part as symbols
        in_shape = symbolic_shape(ctx.input(0), ctx.shape(ctx.input(0)))
        out_shape = ctx.shape(node.outputs[0])
        if out_shape is None or None in out_shape:
            out_shape = reshape_output(ctx.graph, target, ctx.input(0), ctx.shape(ctx.input(0)), allowzero,
                                       symbols=in_shape) or out_shape
        placed = map_merged_axes(ctx, layouts, in_shape, out_shape, node.outputs[0])
        channel_axes = {o: (t, merged) for t, (o, merged) in placed.items()}
        for o, entry in enumerate(target):
            if o in channel_axes:
                t, merged = channel_axes[o]
                self._channel_entry(ctx, entry, t, o, merged, in_shape, out_shape, allowzero)
            else:
                for dim in deps(entry):
                    if dim.axis in ctx.layouts(dim.tensor):
                        raise Refuse(f"target entry {o} reads a dim that pruning changes")

    @staticmethod
    def _channel_entry(ctx, entry, t, o, merged, in_shape, out_shape, allowzero):
        if isinstance(entry, Lit):
            if entry.value == -1:
                return
            if entry.value == 0 and not allowzero:
                if o != t or in_shape[t] != out_shape[o]:
                    raise Refuse("copies a dimension that changes")
                return
            if entry.value != ctx.size(merged):
                raise Refuse(f"target entry {entry.value} does not match {ctx.size(merged)} channels")
            if entry.source is None:
                raise Refuse("channel count in the target cannot be rewritten (computed from constants or shared with other nodes)")
            ctx.rewrite_literal(entry.source, merged, entry.shared)
            return
        if isinstance(entry, Dim):
            source = ctx.layouts(entry.tensor).get(entry.axis)
            if source is not None and ctx.size(source) == ctx.size(merged):
                ctx.unify(source, merged)
                return
            if source is None and entry.slot is not None and static_value(ctx.graph, entry) == ctx.size(merged):
                # `B, S, D = x.shape ... reshape(B, S, D)`: D reads a tensor whose channels stay, but
                # the model is valid only while it equals the channel count, so the plan writes that
                ctx.rewrite_literal(entry.slot, merged, entry.shared)
                return
            raise Refuse("target reads a fixed dim where the channels go")
        raise Refuse("target computes the channel count at run time")


def _product(dims):
    return None if None in dims else int(np.prod(dims, dtype=np.int64))
