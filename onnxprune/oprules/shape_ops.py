"""Shape bookkeeping ops: Squeeze/Unsqueeze renumber axes; Shape/Size read sizes at run time."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import axes_operand, norm_axis


@register
class SqueezeRule(OpRule):
    ops = ("Squeeze",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        shape = ctx.shape(ctx.input(0))
        if shape is None:
            raise Refuse("input of unknown rank")
        axes = axes_operand(ctx)
        if axes is None:
            if None in shape:
                raise Refuse("squeezes unknown axes")
            axes = [i for i, d in enumerate(shape) if d == 1]
        axes = {norm_axis(a, len(shape)) for a in axes}
        if axes & set(layouts):
            raise Refuse("squeezes a channel axis")
        for axis, layout in layouts.items():
            ctx.set_layout(node.outputs[0], axis - sum(1 for a in axes if a < axis), layout)


@register
class UnsqueezeRule(OpRule):
    ops = ("Unsqueeze",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        axes = axes_operand(ctx)
        if rank is None or axes is None:
            raise Refuse("unknown rank or axes")
        out_rank = rank + len(axes)
        inserted = sorted(norm_axis(a, out_rank) for a in axes)
        kept = [k for k in range(out_rank) if k not in inserted]
        for axis, layout in layouts.items():
            ctx.set_layout(node.outputs[0], kept[axis], layout)


@register
class ShapeRule(OpRule):
    """Shape and Size read the (new) sizes at run time, so they follow pruning by themselves.

    Their outputs carry no channels; whatever is built from them is checked where it
    meets a tracked tensor again (a Reshape target computed at run time is refused).
    """

    ops = ("Shape", "Size")

    def propagate(self, node, ctx):
        return None
