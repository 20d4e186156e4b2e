"""Weights that reach a layer through a few ops: quantized (QDQ), weight-only int8, cast.

A layer's weight input is not always a constant. Exporters and quantizers write

    int8 W -> DequantizeLinear(scale, zero_point) -> Conv          (QDQ)
    int8 W -> Cast -> Mul(scale) -> MatMul                         (weight-only int8)
    fp16 W -> Cast -> Conv,   W -> Transpose -> MatMul             (casts, pre-transposed)

`trace` follows such a path back from (layer, input, axis) to the constants that hold
the values, and says along which axis of each the channels lie, so slicing happens on
the stored tensors (int8 stays int8, per-channel scales and zero points shrink with
their channels). Each op's step is one entry in `_STEPS`.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .rules import Refuse

MAX_DEPTH = 8


def trace(graph, node: gs.Node, index: int, axis: int, depth: int = 0) -> list[tuple]:
    """[(node, input index, axis, kind)] of constants feeding node.inputs[index] along `axis`.

    kind is "data" for the tensor that carries the weight values themselves, otherwise the
    role of a side parameter ("quant_scale", "quant_zero_point", "scale", "offset").
    Raises Refuse when the path holds an op it cannot follow or a tensor shared elsewhere.
    """
    tensor = node.inputs[index]
    producer = graph.producer(tensor)
    if isinstance(tensor, gs.Constant) or (producer is not None and producer.op in ("Constant", "ConstantOfShape")):
        return [(node, index, axis, "data")]
    if producer is None:
        raise Refuse(f"input {index} ({tensor.name!r}) is not a constant")
    step = _STEPS.get(producer.op)
    if step is None or depth >= MAX_DEPTH:
        if graph.is_const(tensor):  # e.g. Unsqueeze of a constant: folded when sliced
            return [(node, index, axis, "data")]
        raise Refuse(f"input {index} ({tensor.name!r}) is computed by {producer.op}, not a constant")
    if len(tensor.outputs) != 1:
        raise Refuse(f"weight {tensor.name!r} computed by {producer.op} is shared with other nodes")
    return step(graph, producer, axis, depth + 1)


def _same_axis(graph, node, axis, depth):
    return trace(graph, node, 0, axis, depth)


def _transpose(graph, node, axis, depth):
    perm = node.attrs.get("perm")
    if perm is None:
        rank = graph.rank(node.inputs[0])
        perm = list(reversed(range(rank)))
    return trace(graph, node, 0, int(perm[axis]), depth)


def _dequantize(graph, node, axis, depth):
    found = trace(graph, node, 0, axis, depth)
    if "block_size" in node.attrs and int(node.attrs["block_size"]):
        raise Refuse("blocked quantization is not supported")
    scale_shape = graph.shape(node.inputs[1])
    if scale_shape is None:
        raise Refuse("quantization scale of unknown shape")
    if len(scale_shape) == 0 or scale_shape == (1,):
        return found  # per-tensor: nothing to slice besides the data
    rank = graph.rank(node.inputs[0])
    q_axis = int(node.attrs.get("axis", 1))
    q_axis = q_axis + rank if q_axis < 0 else q_axis
    if q_axis != axis:
        return found  # per-channel along another axis: scales keep their length
    found.append((node, 1, 0, "quant_scale"))
    if len(node.inputs) > 2 and node.inputs[2].name:
        found.append((node, 2, 0, "quant_zero_point"))
    return found


def _broadcast(role):
    """Elementwise op with per-channel constants: the full-size operand carries the weight."""

    def step(graph, node, axis, depth):
        shapes = [graph.shape(t) for t in node.inputs]
        if any(s is None or None in s for s in shapes):
            raise Refuse(f"{node.op} on the weight path has operands of unknown shape")
        out_rank = max(len(s) for s in shapes)
        sizes = [_elements(s) for s in shapes]
        data = [i for i, n in enumerate(sizes) if n == max(sizes)]
        if len(data) != 1 or len(node.inputs) != 2:
            raise Refuse(f"{node.op} on the weight path does not have exactly one weight operand")
        found = []
        for i, shape in enumerate(shapes):
            k = axis - (out_rank - len(shape))
            if i == data[0]:
                if k < 0:
                    raise Refuse(f"{node.op} on the weight path broadcasts the weight itself")
                found += trace(graph, node, i, k, depth)
            elif k < 0 or shape[k] == 1:
                continue
            elif graph.is_const(node.inputs[i]):
                found.append((node, i, k, role))
            else:
                raise Refuse(f"{node.op} on the weight path combines the weight with an activation")
        return found

    return step


def _expand(graph, node, axis, depth):
    """A constant broadcast to the activations' shape (a class token expanded over the batch):
    the channels lie on the constant's own axis, which the target shape must leave alone (1)."""
    from .shape_exprs import Lit, entries

    in_shape, target = graph.shape(node.inputs[0]), entries(graph, node.inputs[1])
    if in_shape is None or target is None:
        raise Refuse("Expand on the weight path with a shape that cannot be read")
    k = axis - (len(target) - len(in_shape))
    entry = target[axis] if 0 <= axis < len(target) else None
    if k < 0 or in_shape[k] in (None, 1) or not (isinstance(entry, Lit) and entry.value == 1):
        raise Refuse("Expand on the weight path sets the channel axis's size")
    return trace(graph, node, 0, k, depth)


def _elements(shape):
    n = 1
    for d in shape:
        n *= d
    return n


_STEPS = {
    "Identity": _same_axis,
    "Cast": _same_axis,
    "Transpose": _transpose,
    "DequantizeLinear": _dequantize,
    "Expand": _expand,
    "Mul": _broadcast("scale"),
    "Div": _broadcast("divisor"),
    "Add": _broadcast("offset"),
    "Sub": _broadcast("offset"),
}
