"""The layers whose weights can be made sparse, each seen as a matrix [outputs, reduction].

Conv weights [O, C/g, k...] become [O, k... x C/g] (input channels innermost, as TensorRT's
sparse convolutions group them); MatMul weights [K, N] and Gemm's B become [N, K]. A weight
must be a float constant (an initializer or a Constant node) read by that one layer, or an
integer constant dequantized on its way there (QDQ: DequantizeLinear with constant scale and
zero point, per tensor or per axis). A quantized weight is read dequantized and written back
quantized with its scales kept: a zero is the zero point, exactly zero after dequantizing;
values a method changed (SparseGPT's update) are rounded to the grid and clipped to its range.
A weight that several nodes share, that arrives through other ops, or a batched MatMul weight
is skipped with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16)


@dataclass
class SparseLayer:
    node: onnx.NodeProto
    weight: str  # the tensor holding the weight (an initializer, or a Constant node's output)
    shape: tuple
    layout: str  # "conv", "kn" (MatMul, Gemm) or "nk" (Gemm with transB)
    data_input: str  # the activation the weight multiplies
    data_axis: int  # its axis of input channels (reduction), for activation statistics
    groups: int = 1

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(outputs, reduction) of the weight seen as a matrix."""
        size = int(np.prod(self.shape))
        outputs = self._outputs()
        return outputs, size // outputs

    @property
    def channels(self) -> int:
        """Length of the innermost run of the reduction axis (input channels per group, or K)."""
        return int(self.shape[1]) if self.layout in ("conv", "nk") else int(self.shape[0])

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        if self.layout == "conv":
            return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)
        return w.T if self.layout == "kn" else w

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        if self.layout == "conv":
            out, channels, *kernel = self.shape
            return np.moveaxis(matrix.reshape(out, *kernel, channels), -1, 1)
        return matrix.T if self.layout == "kn" else matrix

    def column_scale(self, per_channel: np.ndarray) -> np.ndarray:
        """A per-input-channel statistic (e.g. rms) spread over the matrix [outputs, reduction]."""
        if self.layout != "conv":
            return np.broadcast_to(per_channel[None, :], (self._outputs(), per_channel.size))
        out, channels, *kernel = self.shape
        spatial = int(np.prod(kernel)) if kernel else 1
        per_group = per_channel.reshape(self.groups, channels)  # input channels of each group
        rows = np.repeat(per_group, out // self.groups, axis=0)  # [O, C/g]: what each output reads
        return np.tile(rows, (1, spatial))

    def _outputs(self) -> int:
        return int(self.shape[1]) if self.layout == "kn" else int(self.shape[0])


@dataclass
class Skipped:
    name: str
    op: str
    reason: str


@dataclass
class Quantization:
    """How a stored integer weight dequantizes: (q - zero_point) * scale along `axis`."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    def _along(self, value: np.ndarray, ndim: int) -> np.ndarray:
        if value.ndim == 0:
            return value
        shape = [1] * ndim
        shape[self.axis % ndim] = value.size
        return value.reshape(shape)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        zero = self._along(self.zero_point.astype(np.float64), q.ndim)
        scale = self._along(self.scale, q.ndim)
        return ((q.astype(np.float64) - zero) * scale).astype(self.scale.dtype)

    def quantize(self, value: np.ndarray, dtype) -> tuple[np.ndarray, int]:
        """The grid values of `value` (zeros exactly at the zero point), and how many were clipped."""
        info = np.iinfo(dtype)
        zero = self._along(self.zero_point.astype(np.float64), value.ndim)
        scale = self._along(self.scale.astype(np.float64), value.ndim)
        grid = np.round(value.astype(np.float64) / scale) + zero
        clipped = int(((grid < info.min) | (grid > info.max)).sum())
        grid = np.where(value == 0, np.broadcast_to(zero, value.shape), np.clip(grid, info.min, info.max))
        return grid.astype(dtype), clipped


class WeightStore:
    """Read and write a model's constant tensors by name (initializers and Constant nodes);
    quantized weights (registered by sparse_layers) are read and written as their float values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.producers = {out: n for n in graph.node for out in n.output}
        self.quantized: dict[str, Quantization] = {}
        self.clipped: dict[str, int] = {}  # weights that left the quantization range, by tensor
        self.readers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        for out in graph.output:
            self.readers[out.name] = self.readers.get(out.name, 0) + 1

    def tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.initializers:
            return self.initializers[name]
        node = self.constants.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    return attr.t
        return None

    def read(self, name: str) -> np.ndarray:
        value = numpy_helper.to_array(self.tensor(name))
        return self.quantized[name].dequantize(value) if name in self.quantized else value

    def write(self, name: str, value: np.ndarray) -> None:
        tensor = self.tensor(name)
        dtype = numpy_helper.to_array(tensor).dtype
        if name in self.quantized:
            value, clipped = self.quantized[name].quantize(value, dtype)
            if clipped:
                self.clipped[name] = clipped
        tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype), tensor.name))

    def quantized_weight(self, name: str) -> tuple[str, Quantization] | str | None:
        """(stored tensor, its quantization) when `name` is a DequantizeLinear of constants read
        by nothing else; a reason when it is a DequantizeLinear that cannot be handled; else None."""
        node = self.producers.get(name)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        q, scale = node.input[0], self.tensor(node.input[1])
        zero = self.tensor(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        stored = self.tensor(q)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if stored is None or scale is None or (len(node.input) > 2 and node.input[2] and zero is None):
            return "its DequantizeLinear reads computed values"
        if attrs.get("block_size"):
            return "blocked quantization"
        if stored.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                                    onnx.TensorProto.UINT16):
            return f"weight {q!r} is stored as {onnx.TensorProto.DataType.Name(stored.data_type)}"
        if self.readers.get(q, 0) > 1 or self.readers.get(name, 0) > 1:
            return f"quantized weight {q!r} is shared with other nodes"
        scale_value = numpy_helper.to_array(scale)
        zero_value = numpy_helper.to_array(zero) if zero is not None else np.zeros_like(scale_value, np.int64)
        return q, Quantization(scale_value, zero_value, int(attrs.get("axis", 1)))


def sparse_layers(model: onnx.ModelProto, store: WeightStore) -> tuple[list[SparseLayer], list[Skipped]]:
    """Every Conv, MatMul and Gemm with a constant weight, or the reason it is left dense."""
    layers, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        if len(node.input) < 2 or not node.input[1]:
            continue
        weight = node.input[1]
        tensor = store.tensor(weight)
        quantized = store.quantized_weight(weight) if tensor is None else None
        if isinstance(quantized, str):
            skipped.append(Skipped(name, node.op_type, f"quantized weight: {quantized}"))
            continue
        if quantized is not None:  # QDQ: the layer's weight is the stored integer tensor
            weight, quantization = quantized
            tensor = store.tensor(weight)
            store.quantized[weight] = quantization
        if tensor is None:
            if store.tensor(node.input[0]) is None:  # an activation times an activation: no weight at all
                continue
            skipped.append(Skipped(name, node.op_type, f"weight {weight!r} is computed (casts or other ops on the "
                                                       "way), not a constant"))
            continue
        if tensor.data_type not in FLOAT_TYPES and weight not in store.quantized:
            skipped.append(Skipped(name, node.op_type, f"weight {weight!r} is not a float tensor"))
            continue
        if store.readers.get(weight, 0) > 1:
            skipped.append(Skipped(name, node.op_type, f"weight {weight!r} is shared with other nodes"))
            continue
        shape = tuple(int(d) for d in tensor.dims)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            if len(shape) < 3:
                skipped.append(Skipped(name, node.op_type, f"weight of rank {len(shape)}"))
                continue
            layers.append(SparseLayer(node, weight, shape, "conv", node.input[0], 1, int(attrs.get("group", 1))))
        elif len(shape) != 2:
            skipped.append(Skipped(name, node.op_type, f"a batched weight of shape {list(shape)}"))
        elif node.op_type == "MatMul":
            layers.append(SparseLayer(node, weight, shape, "kn", node.input[0], -1))
        else:
            layout = "nk" if attrs.get("transB", 0) else "kn"
            layers.append(SparseLayer(node, weight, shape, layout, node.input[0], 0 if attrs.get("transA", 0) else 1))
    return layers, skipped
