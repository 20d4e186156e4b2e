"""Transpose moves channel axes (NHWC <-> NCHW)."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import int_list


@register
class TransposeRule(OpRule):
    ops = ("Transpose",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        perm = int_list(ctx.attr("perm"))
        if perm is None:
            rank = ctx.rank(ctx.input(0))
            if rank is None:
                raise Refuse("input of unknown rank")
            perm = list(reversed(range(rank)))
        if sorted(perm) != list(range(len(perm))):
            raise Refuse(f"perm {perm} is not a permutation")
        for axis, layout in layouts.items():
            ctx.set_layout(node.outputs[0], perm.index(axis), layout)
