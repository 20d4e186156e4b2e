"""The graph the engine works on: onnx-graphsurgeon's IR plus the lookups pruning needs.

onnx-graphsurgeon keeps node inputs/outputs and tensor producers/consumers in sync,
which is what slicing and rewiring need. This module adds: reading constant values
wherever exporters put them (initializers, Constant nodes, ConstantOfShape of a
constant shape, through Identity/Cast), static shapes, and copy-on-write updates of
constant inputs so a tensor shared by several nodes is never changed under another.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .disk_weights import DiskValues, attach_to_graph, on_disk

# graphsurgeon logs to stdout; onnxprune reports what matters itself, in one line on stderr.
G_LOGGER.severity = G_LOGGER.CRITICAL + 10

_UNCACHED_BYTES = 2**24  # with weights on disk, values computed from them above this are not cached
_GENERATE_MIN_ELEMENTS = 32  # below this a ConstantOfShape node costs more bytes than the data
_EVALUABLE = {"DequantizeLinear": None, "Mul": np.multiply, "Div": np.divide, "Add": np.add,
              "Sub": np.subtract, "Cast": None, "Identity": None, "Transpose": None}
_FOLDABLE = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Transpose"}


def _int_divide(a, b):
    return (np.trunc(a / b)).astype(np.result_type(a, b))  # ONNX integer Div truncates


# Integer arithmetic exporters wrap around shape constants (torch's legacy `expand(-1, ...)`
# writes Where(Equal(shape, -1), ones, shape)). Folded only on small integer/bool values,
# so float weights keep going through weight_paths.
_SHAPE_ARITHMETIC = {"Equal": np.equal, "Where": np.where, "Mul": np.multiply, "Add": np.add,
                     "Sub": np.subtract, "Div": _int_divide, "Not": np.logical_not, "Less": np.less,
                     "Greater": np.greater, "Max": np.maximum, "Min": np.minimum, "Neg": np.negative,
                     "Abs": np.abs}
_SHAPE_ARITHMETIC_MAX_ELEMENTS = 1024
# Assembling small integer constants (the legacy exporter builds Pad's pads with Concat, a
# reversing Slice and a Transpose); folded on small integer values only, like the above.
_SHAPE_ASSEMBLY = {"Concat", "Slice", "Gather"}


class Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.gs = gs.import_onnx(model)
        self._weights_on_disk = attach_to_graph(self.gs)
        self._names = itertools.count()
        self._cow_cache: dict[tuple, gs.Tensor] = {}
        self._const_cache: dict[str, np.ndarray | None] = {}

    # -- export ----------------------------------------------------------------------
    def to_model(self) -> onnx.ModelProto:
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(self.gs, do_type_check=False)
        del model.graph.value_info[:]  # stale after pruning; shape inference redoes it on request
        model.ir_version = self.model.ir_version
        del model.opset_import[:]
        model.opset_import.extend(self.model.opset_import)
        del model.metadata_props[:]
        model.metadata_props.extend(self.model.metadata_props)
        model.producer_name = self.model.producer_name
        model.producer_version = self.model.producer_version
        if model.ir_version < 4:
            # IR < 4 requires every initializer to be declared as a graph input too.
            declared = {i.name for i in model.graph.input}
            for init in model.graph.initializer:
                if init.name not in declared:
                    model.graph.input.append(
                        onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        return model

    # -- lookups ---------------------------------------------------------------------
    def opset(self, domain: str = "") -> int:
        for imp in self.model.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return imp.version
        return 0

    @staticmethod
    def producer(tensor: gs.Tensor):
        return tensor.inputs[0] if tensor.inputs else None

    def const(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The value of a tensor that is a constant however the exporter wrote it, else None.

        Follows Constant nodes, ConstantOfShape of a constant shape, and shape-only ops
        (Identity, Cast, Reshape, (Un)Squeeze, Transpose) applied to constants.
        """
        if tensor is None or not self.is_const(tensor):
            return None
        weight = on_disk(tensor)
        if weight is not None:  # read from its file each time: holding them all is what disk mode avoids
            return weight.load()
        key = tensor.name
        if key not in self._const_cache:
            try:
                value = self._evaluate(tensor)
            except (ValueError, IndexError, TypeError, KeyError, ArithmeticError):  # a malformed constant
                value = None
            if value is not None and value.nbytes > _UNCACHED_BYTES and self._weights_on_disk:
                return value  # computed from weights on disk: not kept either
            self._const_cache[key] = value
        return self._const_cache[key]

    def _evaluate(self, tensor: gs.Tensor) -> np.ndarray | None:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        node = self.producer(tensor)
        if node.op == "Constant":
            return _constant_node_value(node)
        if node.op == "ConstantOfShape":
            shape = self.const(node.inputs[0])
            fill = node.attrs.get("value")
            fill = np.asarray(fill.values).reshape(-1) if fill is not None else np.zeros(1, np.float32)
            return np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype)
        args = [self.const(t) if t.name else None for t in node.inputs]
        return _fold(node, args, self.opset(""))

    def evaluate(self, tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
        """Numeric value of a weight, also through casts and (de)quantization (for scoring)."""
        value = self.const(tensor)
        if value is not None or depth > 16:
            return value
        node = self.producer(tensor)
        if node is None or node.op not in _EVALUABLE:
            return None
        args = [self.evaluate(t, depth + 1) if t.name else None for t in node.inputs]
        if args[0] is None or (node.op != "DequantizeLinear" and any(a is None for a in args)):
            return None
        try:
            if node.op == "DequantizeLinear":
                return _dequantize(node, args)
            if node.op in ("Mul", "Div", "Add", "Sub"):
                return _EVALUABLE[node.op](args[0].astype(np.float32), args[1].astype(np.float32))
            return _fold(node, args, self.opset(""))
        except (ValueError, IndexError, TypeError, KeyError, ArithmeticError):  # attributes or shapes that do not fit
            return None

    def is_const(self, tensor: gs.Tensor | None, depth: int = 0) -> bool:
        if tensor is None or depth > 32:
            return False
        if isinstance(tensor, gs.Constant):
            return True
        node = self.producer(tensor)
        if node is None:
            return False
        if node.op == "Constant":
            return True
        if node.op == "ConstantOfShape" or node.op in _FOLDABLE:
            return all(self.is_const(t, depth + 1) for t in node.inputs if t.name)
        if node.op in _SHAPE_ARITHMETIC or node.op in _SHAPE_ASSEMBLY:
            return all(self._small_integer_const(t, depth + 1) for t in node.inputs if t.name)
        return False

    def _small_integer_const(self, tensor: gs.Tensor, depth: int) -> bool:
        if isinstance(tensor, gs.Constant):  # decided from dtype and shape, without reading a big weight
            try:
                dtype, size = np.dtype(tensor.dtype), int(np.prod(tensor.shape, dtype=np.int64))
            except TypeError:  # a type numpy does not know (bfloat16 in graphsurgeon): not a shape value
                return False
            if size > _SHAPE_ARITHMETIC_MAX_ELEMENTS or not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
                return False
        return self.is_const(tensor, depth) and _small_integers(self.const(tensor))

    def shape(self, tensor: gs.Tensor | None) -> tuple | None:
        """Static shape: ints for known dims, None for unknown ones; None if the rank is unknown."""
        if tensor is None:
            return None
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        if tensor.shape is None:
            value = self.const(tensor)
            return None if value is None else tuple(value.shape)
        return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in tensor.shape)

    def rank(self, tensor: gs.Tensor | None) -> int | None:
        s = self.shape(tensor)
        return None if s is None else len(s)

    # -- editing ---------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        existing = self.gs.tensors()
        while True:
            name = f"{base}__p{next(self._names)}"
            if name not in existing:
                return name

    def set_const_input(self, node: gs.Node, index: int, value: np.ndarray, key=None) -> None:
        """Give `node` a new constant at input `index`, never changing what other users see.

        Nodes whose update has the same `key` (same source, same slicing) share one tensor.
        """
        old = node.inputs[index]
        self._const_cache.clear()
        if key is not None and key in self._cow_cache:
            node.inputs[index] = self._cow_cache[key]
            return
        on_disk = isinstance(value, DiskValues)  # a weight on disk: sliced when written, never generated
        if not on_disk:
            value = np.ascontiguousarray(value)
        producer = self.producer(old) if not isinstance(old, gs.Constant) else None
        uniform = not on_disk and value.size > 0 and bool(np.all(value == value.reshape(-1)[0]))
        shape = np.array(value.shape, dtype=np.int64)
        if uniform and producer is not None and producer.op == "ConstantOfShape":
            shape_in = producer.inputs[0]
            if len(old.outputs) == 1 and isinstance(shape_in, gs.Constant) and len(shape_in.outputs) == 1:
                shape_in.values = shape  # sole user: edit the generated weight's shape in place
                return
        if uniform and value.size >= _GENERATE_MIN_ELEMENTS and self.opset("") >= 9:
            # A uniform tensor (model-zoo graphs generate their weights) stays generated:
            # a ConstantOfShape node instead of a materialized initializer keeps the file small.
            out = gs.Variable(self.fresh_name(old.name), dtype=value.dtype)
            fill = gs.Constant(self.fresh_name(old.name + "_fill"), value.reshape(-1)[:1].copy())
            self.gs.nodes.append(gs.Node("ConstantOfShape", name=self.fresh_name(old.name + "_gen"),
                                         attrs={"value": fill}, outputs=[out],
                                         inputs=[gs.Constant(self.fresh_name(old.name + "_shape"), shape)]))
            new = out
        elif isinstance(old, gs.Constant) and len(old.outputs) == 1 and old not in self.gs.outputs:
            old.values = value
            new = old
        else:
            new = gs.Constant(self.fresh_name(old.name or "const"), value)
        node.inputs[index] = new
        if key is not None:
            self._cow_cache[key] = new


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return np.asarray(v.values if hasattr(v, "values") else v)
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in attrs:
            return np.asarray(attrs[name], dtype=dtype)
    return None


def _small_integers(value) -> bool:
    return value is not None and value.size <= _SHAPE_ARITHMETIC_MAX_ELEMENTS and (
        np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_)


def _fold(node: gs.Node, args: list, opset: int) -> np.ndarray | None:
    """Evaluate a shape-only op (or integer shape arithmetic) on constant inputs."""
    x = args[0]
    op, attrs = node.op, node.attrs
    if op in _SHAPE_ARITHMETIC:
        return np.asarray(_SHAPE_ARITHMETIC[op](*args))
    if op == "Concat":
        return np.concatenate([np.asarray(a) for a in args], axis=int(attrs["axis"]))
    if op == "Gather":
        return np.take(x, args[1], axis=int(attrs.get("axis", 0)))
    if op == "Slice":
        return _slice(x, args[1:], attrs)
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
    if op == "Transpose":
        return np.transpose(x, attrs.get("perm"))
    if op == "Reshape":
        target = [int(v) for v in args[1].reshape(-1)]
        if not int(attrs.get("allowzero", 0)):
            target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
        return x.reshape(target)
    axes = attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = [int(v) for v in args[1].reshape(-1)]
    if op == "Squeeze":
        return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)
    if op == "Unsqueeze":
        out_rank = x.ndim + len(axes)
        for a in sorted(a + out_rank if a < 0 else a for a in axes):
            x = np.expand_dims(x, a)
        return x
    return None


def _slice(x: np.ndarray, params: list, attrs: dict) -> np.ndarray:
    if "starts" in attrs:  # opset < 10
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends, axes, steps = (list(params) + [None] * 4)[:4]
    starts, ends = [int(v) for v in np.reshape(starts, -1)], [int(v) for v in np.reshape(ends, -1)]
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.reshape(axes, -1)]
    steps = [1] * len(starts) if steps is None else [int(v) for v in np.reshape(steps, -1)]
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = x.shape[axis]
        if step < 0:  # numpy takes None for "before the first", ONNX a very negative end
            start, end = min(start, dim - 1), (None if end < -dim else end)
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _dequantize(node: gs.Node, args: list) -> np.ndarray:
    x, scale = args[0], args[1]
    zero = args[2] if len(args) > 2 and args[2] is not None else np.zeros_like(scale, dtype=np.int32)
    x = x.astype(np.float32)
    scale, zero = np.asarray(scale, np.float32), np.asarray(zero).astype(np.float32)
    if scale.size > 1:
        axis = int(node.attrs.get("axis", 1))
        axis = axis + x.ndim if axis < 0 else axis
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (x - zero) * scale
