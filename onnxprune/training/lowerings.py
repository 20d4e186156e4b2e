"""Ops that onnxruntime-training (1.19) has no gradient for, written in ops that it has.

generate_artifacts fails on the first node whose op has no gradient builder ("The gradient
builder has not been registered: HardSwish"). The training copy of the graph gets each such
node replaced by an equivalent made of differentiable primitives (Relu, Mul, Add, Exp, Log,
Tanh, ReduceMean, ArgMax + GatherElements, ...); the model the user gets back keeps the
original node, since only the trained weights are written back.

Adding an op is one function here, registered with @lowering("Op"), plus an entry in
tests/training/test_lowerings.py, which checks the lowered form against the original op in
onnxruntime and its gradient against a finite difference. Clips are spelled with Relu
(clip(v, 0, 1) = relu(v) - relu(v - 1)) so the lowered forms need nothing newer than opset 6.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from .builder import Builder

# op type -> function(node, builder, info) that appends the replacement nodes to the builder;
# they must produce the node's outputs under the same names.
LOWERINGS: dict[str, Callable] = {}


class TensorInfo:
    """Element types and ranks of the graph's tensors, as shape inference left them."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        self.dims: dict[str, list] = {}
        graph = model.graph
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            if vi.type.HasField("tensor_type"):
                tensor = vi.type.tensor_type
                if tensor.elem_type:
                    self.types[vi.name] = tensor.elem_type
                if tensor.HasField("shape"):
                    self.ranks[vi.name] = len(tensor.shape.dim)
                    self.dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.ranks[init.name] = len(init.dims)
            self.dims[init.name] = list(init.dims)

    def rank(self, name: str, node: onnx.NodeProto) -> int:
        if name not in self.ranks:
            raise LoweringError(node, f"the rank of {name!r} is unknown")
        return self.ranks[name]


class LoweringError(Exception):
    def __init__(self, node: onnx.NodeProto, why: str) -> None:
        super().__init__(f"node {node.name or node.output[0]!r} ({node.op_type}): {why}")


def lowering(op_type: str):
    def register(function):
        LOWERINGS[op_type] = function
        return function
    return register


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _unit_clip(b: Builder, v: str, output: str | None = None) -> str:
    """clip(v, 0, 1) as relu(v) - relu(v - 1)."""
    outputs = [output] if output else 1
    return b.node("Sub", [b.relu(v), b.relu(b.node("Sub", [v, b.scalar(1.0)]))], outputs)


def _softplus(b: Builder, x: str, output: str | None = None) -> str:
    """log(1 + e^x) = relu(x) + log(1 + e^-|x|), which cannot overflow."""
    absolute = b.node("Add", [b.relu(x), b.relu(b.neg(x))])
    tail = b.node("Log", [b.node("Add", [b.scalar(1.0), b.node("Exp", [b.neg(absolute)])])])
    outputs = [output] if output else 1
    return b.node("Add", [b.relu(x), tail], outputs)


@lowering("HardSigmoid")
def hard_sigmoid(node, b: Builder, info: TensorInfo) -> None:
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    v = b.node("Add", [b.node("Mul", [node.input[0], b.scalar(alpha)]), b.scalar(beta)])
    _unit_clip(b, v, node.output[0])


@lowering("HardSwish")
def hard_swish(node, b: Builder, info: TensorInfo) -> None:
    x = node.input[0]
    v = b.node("Add", [b.node("Mul", [x, b.scalar(1.0 / 6.0)]), b.scalar(0.5)])
    b.node("Mul", [x, _unit_clip(b, v)], [node.output[0]])


@lowering("Softplus")
def softplus(node, b: Builder, info: TensorInfo) -> None:
    _softplus(b, node.input[0], node.output[0])


@lowering("Mish")
def mish(node, b: Builder, info: TensorInfo) -> None:
    x = node.input[0]
    b.node("Mul", [x, b.node("Tanh", [_softplus(b, x)])], [node.output[0]])


@lowering("Elu")
def elu(node, b: Builder, info: TensorInfo) -> None:
    # x for x > 0, alpha (e^x - 1) below: relu(x) + alpha (e^-relu(-x) - 1)
    x, alpha = node.input[0], _attr(node, "alpha", 1.0)
    negative = b.node("Sub", [b.node("Exp", [b.neg(b.relu(b.neg(x)))]), b.scalar(1.0)])
    b.node("Add", [b.relu(x), b.node("Mul", [negative, b.scalar(alpha)])], [node.output[0]])


@lowering("PRelu")
def prelu(node, b: Builder, info: TensorInfo) -> None:
    # relu(x) - slope relu(-x); the slope broadcasts to x as PRelu's does
    x, slope = node.input[0], node.input[1]
    b.node("Sub", [b.relu(x), b.node("Mul", [slope, b.relu(b.neg(x))])], [node.output[0]])


@lowering("Sum")
def sum_(node, b: Builder, info: TensorInfo) -> None:
    _add_all(b, list(node.input), node.output[0])


@lowering("Mean")
def mean(node, b: Builder, info: TensorInfo) -> None:
    total = _add_all(b, list(node.input))
    b.node("Mul", [total, b.scalar(1.0 / len(node.input))], [node.output[0]])


def _add_all(b: Builder, inputs: list[str], output: str | None = None) -> str:
    if len(inputs) == 1:
        return b.node("Identity", inputs, [output] if output else 1)
    total = inputs[0]
    for index, term in enumerate(inputs[1:], start=2):
        last = index == len(inputs)
        total = b.node("Add", [total, term], [output] if last and output else 1)
    return total


@lowering("CastLike")
def cast_like(node, b: Builder, info: TensorInfo) -> None:
    target = info.types.get(node.input[1])
    if not target:
        raise LoweringError(node, f"the element type of {node.input[1]!r} is unknown")
    b.node("Cast", [node.input[0]], [node.output[0]], to=target)


@lowering("InstanceNormalization")
def instance_norm(node, b: Builder, info: TensorInfo) -> None:
    x, scale, bias = node.input[:3]
    rank, eps = info.rank(x, node), _attr(node, "epsilon", 1e-5)
    axes = list(range(2, rank))
    centred = b.node("Sub", [x, b.reduce("ReduceMean", x, axes, keepdims=True)])
    variance = b.reduce("ReduceMean", b.node("Mul", [centred, centred]), axes, keepdims=True)
    normed = b.node("Div", [centred, b.node("Sqrt", [b.node("Add", [variance, b.scalar(eps)])])])
    per_channel = [-1] + [1] * (rank - 2)
    scaled = b.node("Mul", [normed, b.reshape(scale, per_channel)])
    b.node("Add", [scaled, b.reshape(bias, per_channel)], [node.output[0]])


def _max_along(b: Builder, x: str, axis: int) -> str:
    """max over one axis, kept as size 1: the element ArgMax picks, so the gradient goes to it."""
    index = b.node("ArgMax", [x], axis=axis, keepdims=1)
    return b.node("GatherElements", [x, index], axis=axis)


@lowering("ReduceMax")
def reduce_max(node, b: Builder, info: TensorInfo) -> None:
    x = node.input[0]
    rank = info.rank(x, node)
    keepdims = bool(_attr(node, "keepdims", 1))
    axes = _attr(node, "axes", None)
    if len(node.input) > 1 and node.input[1]:
        found = [i for i in b.model.graph.initializer if i.name == node.input[1]]
        if not found:
            raise LoweringError(node, "its axes are computed in the graph")
        axes = onnx.numpy_helper.to_array(found[0]).tolist()
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            b.node("Identity", [x], [node.output[0]])
            return
        axes = list(range(rank))
    axes = sorted(a % rank for a in axes)
    value = x
    for axis in axes:
        value = _max_along(b, value, axis)
    if keepdims:
        b.node("Identity", [value], [node.output[0]])
    else:
        b.squeeze(value, axes, node.output[0])


@lowering("GlobalMaxPool")
def global_max_pool(node, b: Builder, info: TensorInfo) -> None:
    x = node.input[0]
    rank = info.rank(x, node)
    flat = b.reshape(x, [0, 0, -1])  # [N, C, H*W...]
    pooled = _max_along(b, flat, 2)
    b.reshape(pooled, [0, 0] + [1] * (rank - 2), node.output[0])


def _constant_values(model: onnx.ModelProto, name: str):
    for init in model.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    return None


@lowering("Resize")
def resize_nearest(node, b: Builder, info: TensorInfo) -> None:
    """Nearest-neighbour upsampling by whole factors (FPN and YOLO necks): each value repeated
    s times along its axis, as Unsqueeze + Expand + Reshape. onnxruntime-training has a gradient
    builder for Resize but no CPU kernel for it."""
    mode = _attr(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    coords = _attr(node, "coordinate_transformation_mode", b"half_pixel")
    coords = coords.decode() if isinstance(coords, bytes) else coords
    nearest = _attr(node, "nearest_mode", b"round_prefer_floor")
    nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
    x = node.input[0]
    dims = info.dims.get(x)
    if dims is None or any(d is None for d in dims[1:]):
        raise LoweringError(node, "upsampling needs the input's dims after the batch axis")
    if mode != "nearest" or coords not in ("asymmetric", "half_pixel", "pytorch_half_pixel") \
            or nearest not in ("floor", "round_prefer_floor"):
        raise LoweringError(node, f"only nearest upsampling by whole factors is lowered (mode {mode}, "
                                  f"{coords}, {nearest})")
    scales = _constant_values(b.model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    sizes = _constant_values(b.model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    if scales is not None and scales.size:
        factors = [float(f) for f in scales]
    elif sizes is not None and sizes.size:
        factors = [1.0] + [float(out) / d for out, d in zip(sizes.tolist()[1:], dims[1:])]
    else:
        raise LoweringError(node, "its scales or sizes are computed in the graph")
    if len(factors) != len(dims) or factors[0] != 1.0 or any(f < 1 or f != int(f) for f in factors):
        raise LoweringError(node, f"scales {factors} are not whole upsampling factors after the batch axis")
    factors = [int(f) for f in factors]
    rank = len(dims)
    expanded_axes = [2 * axis for axis in range(1, rank)]  # a new axis after each non-batch one
    value = x
    if b.opset >= 13:
        value = b.node("Unsqueeze", [x, b.constant(expanded_axes, np.int64, "axes")])
    else:
        value = b.node("Unsqueeze", [x], axes=expanded_axes)
    target = [1] + [v for f in factors[1:] for v in (1, f)]
    value = b.node("Expand", [value, b.constant(target, np.int64, "shape")])
    b.reshape(value, [0] + [d * f for d, f in zip(dims[1:], factors[1:])], node.output[0])


def lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int], dict[str, LoweringError]]:
    """Replace, in place, every node with a registered lowering; returns the model, how many
    nodes of each op were lowered, and the nodes (by first output) whose form could not be
    lowered: they stay, which matters only if the gradient has to pass through them."""
    info = TensorInfo(model)
    b = Builder(model, prefix="onnxprune_lowered")
    kept, counts, failed = [], {}, {}
    for node in model.graph.node:
        function = LOWERINGS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if function is None:
            kept.append(node)
            continue
        start = len(b.nodes)
        try:
            function(node, b, info)
        except LoweringError as exc:
            del b.nodes[start:]
            kept.append(node)
            failed[node.output[0]] = exc
            continue
        kept.extend(b.nodes[start:])
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if counts:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        model.graph.initializer.extend(b.initializers)
    return model, counts, failed


def lowered_constants(model: onnx.ModelProto) -> set[str]:
    """Names of the constants lowerings added (never trainable)."""
    return {i.name for i in model.graph.initializer if i.name.startswith("onnxprune_lowered/")}


__all__ = ["LOWERINGS", "LoweringError", "TensorInfo", "lower", "lowered_constants", "lowering"]
