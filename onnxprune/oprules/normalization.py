"""Normalizations: per-channel ones slice their parameters; ones across channels are constraints."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import norm_axis, passthrough, used


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
        for axis in x:
            if axis >= first:
                raise Refuse("normalizes across the channels (LayerNorm over the hidden size)")
        passthrough(ctx, outputs=(0, 1, 2))


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
