"""Reductions: fine over other axes, a constraint over the channels themselves."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import axes_operand, norm_axis


@register
class ReduceRule(OpRule):
    ops = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        axes = axes_operand(ctx)
        if not axes:
            if int(ctx.attr("noop_with_empty_axes", 0)):
                axes = []
            else:
                axes = list(range(rank))
        reduce_over(ctx, layouts, {norm_axis(a, rank) for a in axes}, rank,
                    bool(int(ctx.attr("keepdims", 1))))


@register
class ArgReduceRule(OpRule):
    ops = ("ArgMax", "ArgMin")

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        axis = norm_axis(ctx.attr("axis", 0), rank)
        reduce_over(ctx, layouts, {axis}, rank, bool(int(ctx.attr("keepdims", 1))))


def reduce_over(ctx, layouts, axes, rank, keepdims):
    if axes & set(layouts):
        raise Refuse("reduces over the channels")
    out = ctx.node.outputs[0]
    for axis, layout in layouts.items():
        new_axis = axis if keepdims else axis - sum(1 for a in axes if a < axis)
        ctx.set_layout(out, new_axis, layout)
