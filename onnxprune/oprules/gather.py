"""Gather along an axis that carries no channels (picking q/k/v out of a fused tensor, tokens)."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import norm_axis


@register
class GatherRule(OpRule):
    ops = ("Gather",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if ctx.input_layouts(1):
            raise Refuse("indices carry channels")
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        index_rank = ctx.rank(ctx.input(1))
        if rank is None or index_rank is None:
            raise Refuse("unknown rank")
        axis = norm_axis(ctx.attr("axis", 0), rank)
        if axis in layouts:
            raise Refuse("gathers along the channel axis")
        for t, layout in layouts.items():
            ctx.set_layout(node.outputs[0], t if t < axis else t - 1 + index_rank, layout)
