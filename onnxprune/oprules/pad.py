"""Pad: fine as long as the channel axes are not padded."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import int_list, passthrough, run_time_list


@register
class PadRule(OpRule):
    ops = ("Pad",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        if "pads" in node.attrs:
            pads = int_list(node.attrs["pads"])
        else:
            pads = int_list(ctx.const(ctx.input(1)))
            if pads is None:  # computed at run time (window padding from H and W): known where it matters?
                pads = run_time_list(ctx, ctx.input(1))
                if pads is None:
                    raise Refuse("pads are not a constant")
        axes_in = ctx.input(3)
        if axes_in is not None:
            axes = int_list(ctx.const(axes_in))
            if axes is None:
                raise Refuse("pad axes are not a constant")
        else:
            axes = list(range(rank if rank is not None else len(pads) // 2))
        n = len(axes)
        for j, axis in enumerate(axes):
            axis = axis + rank if axis < 0 and rank is not None else axis
            if axis in layouts and (pads[j] is None or pads[j + n] is None):
                raise Refuse("pads the channel axis by an amount computed at run time")
            if axis in layouts and (pads[j] != 0 or pads[j + n] != 0):
                raise Refuse("pads the channel axis")
        passthrough(ctx)
