"""Shape bookkeeping ops: Squeeze/Unsqueeze renumber axes; Shape/Size read sizes at run time."""
import numpy as np
from onnx import TensorProto

from onnxprune.core.rules import OpRule, Refuse, register
from onnxprune.core.shape_exprs import deps, entries, static_value

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
    A channel count that becomes a value (cast to float: the 1/sqrt(head_dim) attention
    scale of legacy exports) is frozen at the original count, since the function to keep
    is the original one; where that value cannot be computed the channels stay.
    """

    ops = ("Shape", "Size")

    def propagate(self, node, ctx):
        tracked = ctx.input_layouts(0)
        if not tracked:
            return
        source = node.inputs[0]
        for cast in _value_casts(node.outputs[0]):
            read = entries(ctx.graph, cast.inputs[0])
            if read is None:
                raise Refuse(f"its sizes become a value at {cast.op} {cast.name!r}, which cannot be followed")
            moved = [d for e in read for d in deps(e) if d.tensor is source and d.axis in tracked]
            if not moved:
                continue
            values = [static_value(ctx.graph, e) for e in read]
            if any(v is None for v in values):
                raise Refuse(f"the channel count becomes a value at {cast.op} {cast.name!r} "
                             "through arithmetic or dynamic dims")
            ctx.on_apply(_freezer(cast, values))


# Integer tensor types (onnx.TensorProto): a Cast to one of these keeps a shape a shape.
_INT_TYPES = frozenset({TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16, TensorProto.INT32,
                        TensorProto.INT64, TensorProto.UINT32, TensorProto.UINT64})
# Ops that carry shape values on as shape values (a Cast to an integer type too).
_SHAPE_ARITHMETIC = frozenset({"Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Identity",
                               "Add", "Sub", "Mul", "Div", "Mod", "Reshape", "Cast"})


def _value_casts(tensor):
    """Casts to a non-integer type reached from `tensor` through shape arithmetic."""
    found, seen, todo = [], set(), [tensor]
    while todo:
        current = todo.pop()
        for user in current.outputs:
            if id(user) in seen or user.op not in _SHAPE_ARITHMETIC:
                continue
            if user.op in _DATA_FIRST and user.inputs[0] is not current:
                continue  # the shape is a parameter here (a Reshape target, Slice bounds): not a value
            seen.add(id(user))
            if user.op == "Cast" and int(user.attrs.get("to", TensorProto.INT64)) not in _INT_TYPES:
                found.append(user)
            else:
                todo.extend(user.outputs)
    return found


# Ops whose first input is the data; a shape in a later input only parameterises them.
_DATA_FIRST = frozenset({"Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape"})


def _freezer(cast, values):
    dtype = getattr(cast.inputs[0], "dtype", None) or np.int64
    shape = getattr(cast.inputs[0], "shape", None)

    def freeze(applier):
        value = np.asarray(values, dtype=dtype)
        if shape is not None and all(isinstance(d, int) for d in shape):
            value = value.reshape(shape)
        applier.set_const_input(cast, 0, value)
    return freeze
