"""Concat: the output axis is the inputs' layouts one after another."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import norm_axis


@register
class ConcatRule(OpRule):
    ops = ("Concat",)

    def propagate(self, node, ctx):
        if not ctx.any_tracked():
            return
        inputs = [t for t in node.inputs if t is not None and t.name != ""]
        shapes = [ctx.shape(t) for t in inputs]
        if any(s is None for s in shapes):
            raise Refuse("an input has unknown rank")
        rank = len(shapes[0])
        axis = norm_axis(ctx.attr("axis"), rank)
        out = node.outputs[0]
        # Axes other than the concat axis must agree across inputs.
        for k in range(rank):
            if k == axis:
                continue
            tracked = [ctx.layouts(t)[k] for t in inputs if k in ctx.layouts(t)]
            if not tracked:
                continue
            for other in tracked[1:]:
                ctx.unify(tracked[0], other)
            missing = [t for t in inputs if k not in ctx.layouts(t)]
            if missing and ctx.hidden_mode:
                missing = [t for t in missing if not _sliced_with(ctx, t, k, tracked[0])]
            if missing:
                fixed = missing[0]
                interface = " (a graph input: an interface, such as a kv cache)" \
                    if not fixed.inputs and not ctx.graph.is_const(fixed) else ""
                ctx.fix(tracked[0], f"concatenated with {fixed.name!r}, whose channels are fixed{interface}")
            ctx.set_layout(out, k, tracked[0])
        if not any(axis in ctx.layouts(t) for t in inputs):
            return
        joined = []
        for t, shape in zip(inputs, shapes):
            layout = ctx.layouts(t).get(axis)
            if layout is None:
                if shape[axis] is None:
                    raise Refuse(f"input {t.name!r} has an unknown size on the concat axis")
                if shape[axis] == 0:
                    continue
                layout = ctx.new_channels(shape[axis])
                ctx.fix(layout, f"input {t.name!r} has fixed channels")
            joined.extend(layout)
        ctx.set_layout(out, axis, tuple(joined))


def _sliced_with(ctx, tensor, axis, layout) -> bool:
    """In hidden mode, a constant joined on along the model width (a class token, perhaps
    expanded over the batch) is sliced with it."""
    index = next(i for i, t in enumerate(ctx.node.inputs) if t is tensor)
    try:
        ctx.attach(index, axis, layout, "offset")
    except Refuse:
        return False
    return True
