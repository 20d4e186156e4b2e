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
        if not layouts and ctx.hidden_mode:
            embedding(node, ctx)
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


def embedding(node, ctx):
    """In hidden mode, rows picked out of a constant [tokens, width] table: the width is the
    model's hidden size, and the table's columns are its producer."""
    shape = ctx.shape(ctx.input(0))
    index_rank = ctx.rank(ctx.input(1))
    if (shape is None or len(shape) != 2 or index_rank is None or norm_axis(ctx.attr("axis", 0), 2) != 0
            or not ctx.is_weight(0) or not isinstance(shape[1], int) or shape[1] < 2):
        return
    layout = ctx.new_channels(shape[1], hidden=True)
    ctx.attach(0, 1, layout, "weight_out")
    ctx.set_layout(node.outputs[0], index_rank, layout)
