"""Expand broadcasts to a shape constant: a channel entry in it is rewritten."""
import numpy as np

from onnxprune.rules import OpRule, Refuse, register

from ._common import int_list


@register
class ExpandRule(OpRule):
    ops = ("Expand",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        target = int_list(ctx.const(ctx.input(1)))
        rank = ctx.rank(ctx.input(0))
        if target is None or rank is None:
            raise Refuse("target shape is not a constant")
        out_rank = max(rank, len(target))
        literal = {}  # target index -> layout, where the target spells out the channel count
        for axis, layout in layouts.items():
            k = axis + out_rank - rank
            ctx.set_layout(node.outputs[0], k, layout)
            j = k - (out_rank - len(target))
            if j >= 0 and target[j] != 1:
                literal[j] = layout
        if not literal:
            return

        def rewrite(ap):
            new = list(target)
            for j, layout in literal.items():
                new[j] = ap.new_size(layout)
            if new != target:
                ap.set_const_input(node, 1, np.array(new, dtype=np.int64))

        ctx.on_apply(rewrite)
