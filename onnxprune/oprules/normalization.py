"""Normalizations: per-channel ones slice their parameters; ones across channels are constraints."""
import numpy as np

from onnxprune.core.rules import OpRule, Refuse, register

from ._common import norm_axis, passthrough, used
from .reduce import float_dtype


@register
class BatchNormRule(OpRule):
    ops = ("BatchNormalization",)
    ROLES = ("bn_scale", "bn_bias", "bn_mean", "bn_var")

    def propagate(self, node, ctx):
        if any(used(t) for t in node.outputs[1:]):
            raise Refuse("training-mode outputs are used")
        x = ctx.input_layouts(0)
        if 1 in x:
            for i, role in enumerate(self.ROLES, start=1):
                ctx.attach(i, 0, x[1], role)
        passthrough(ctx)


@register
class InstanceNormRule(OpRule):
    ops = ("InstanceNormalization",)

    def propagate(self, node, ctx):
        x = ctx.input_layouts(0)
        for axis in x:
            if axis >= 2:
                raise Refuse("channels on a normalized (spatial) axis")
        if 1 in x:
            ctx.attach(1, 0, x[1], "bn_scale")
            ctx.attach(2, 0, x[1], "bn_bias")
        passthrough(ctx)


@register
class LayerNormRule(OpRule):
    """Statistics are taken over axes >= axis: channels there cannot shrink (hidden size)."""

    ops = ("LayerNormalization",)

    def propagate(self, node, ctx):
        x = ctx.input_layouts(0)
        if not x:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        first = norm_axis(ctx.attr("axis", -1), rank)
        across = [axis for axis in x if axis >= first]
        if not across:
            passthrough(ctx, outputs=(0, 1, 2))
            return
        if not ctx.hidden_mode:
            raise Refuse("normalizes across the channels (LayerNorm over the hidden size; --hidden prunes it)")
        if first != rank - 1:
            raise Refuse("normalizes over several axes, channels among them")
        if any(used(t) for t in node.outputs[1:]):
            raise Refuse("its mean / inverse std-dev outputs are used")
        layout = x[first]
        ctx.attach(1, 0, layout, "scale")
        ctx.attach(2, 0, layout, "offset")
        passthrough(ctx, outputs=(0,))
        exact = ctx.hidden_mode != "fused" and float_dtype(node.inputs[0].dtype) == np.float32
        if not exact:
            # no fixed correction undoes statistics over fewer channels: the removed channels'
            # share of the variance depends on the mean, which depends on the input
            why = "" if ctx.hidden_mode == "fused" else " (a float16/bfloat16 input is not written out exactly)"
            ctx.across_channels(layout, "kept as LayerNormalization, mean and variance over the kept channels "
                                        f"only: approximate, even where the removed channels are zero{why}",
                                exact=False)
            return
        ctx.across_channels(layout, "written out as 14 elementwise/reduce ops that take the statistics over the "
                                    "original width: exact where the removed channels are zero, slower than the "
                                    "fused op (--hidden-layernorm fused keeps the one op, inexactly)", exact=True)
        size = ctx.size(layout)
        eps = float(ctx.attr("epsilon", 1e-5))
        ctx.on_apply(lambda applier: _write_out_layernorm(applier, node, layout, size, eps))


@register
class GroupNormRule(OpRule):
    ops = ("GroupNormalization",)

    def propagate(self, node, ctx):
        if 1 in ctx.input_layouts(0):
            raise Refuse("statistics are shared within channel groups")
        for axis in ctx.input_layouts(0):
            if axis >= 2:
                raise Refuse("channels on a normalized axis")
        passthrough(ctx)


@register
class SoftmaxRule(OpRule):
    ops = ("Softmax", "LogSoftmax", "Hardmax")

    def propagate(self, node, ctx):
        x = ctx.input_layouts(0)
        if not x:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        default = -1 if ctx.opset >= 13 else 1
        axis = norm_axis(ctx.attr("axis", default), rank)
        # Before opset 13 the op flattens every axis from `axis` on into one.
        touched = {axis} if ctx.opset >= 13 else set(range(axis, rank))
        if touched & set(x):
            raise Refuse("normalizes across the channels")
        passthrough(ctx)


def _write_out_layernorm(applier, node, layout, size: int, eps: float) -> None:
    """LayerNorm over the kept channels with the statistics of the original width, the removed
    channels counted as zeros: with r = kept/original and means over the kept channels,
    mean = r * mean'(x), var = r * mean'((x - mean)^2) + (1 - r) * mean^2."""
    kept = applier.new_size(layout)
    if kept == size:
        return
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    out = node.outputs[0]
    node.outputs.clear()  # the fused node goes; cleanup drops it
    f32 = np.float32
    r = np.array(kept / size, dtype=f32)
    base = node.name or "LayerNormalization"

    def op(name, *inputs, output=None):
        return applier.add_node(name, list(inputs), f32, base=f"{base}_{name.lower()}", output=output,
                                attrs=reduce_attrs if name == "ReduceMean" else None)

    if applier.graph.opset("") >= 18:
        reduce_attrs, axes = {"keepdims": 1}, [np.array([-1], dtype=np.int64)]
    else:
        reduce_attrs, axes = {"keepdims": 1, "axes": [-1]}, []
    mean = op("Mul", op("ReduceMean", x, *axes), r)
    centred = op("Sub", x, mean)
    spread = op("Mul", op("ReduceMean", op("Mul", centred, centred), *axes), r)
    var = op("Add", spread, op("Mul", op("Mul", mean, mean), np.array(1 - kept / size, dtype=f32)))
    normed = op("Div", centred, op("Sqrt", op("Add", var, np.array(eps, dtype=f32))))
    if bias is None:
        op("Mul", normed, scale, output=out)
    else:
        op("Add", op("Mul", normed, scale), bias, output=out)
