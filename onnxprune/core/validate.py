"""What must hold of an input graph before any work is done, each fault told in one line.

A malformed input found only after pruning would be blamed on the pruning ("the pruned model
failed verification"); these checks name what is wrong with the user's model instead:
a node reading a tensor nothing produces, two producers of one name, a cycle, a constant
whose data does not fill its declared shape. Nodes that are merely out of order (an acyclic
graph listed unsorted) can be put in order.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxPruneError
from .modelio import ModelFile, read_model


def _itemsize(data_type: int) -> float | None:
    """Bytes per element in raw_data (0.5 for 4-bit types), None where not fixed or unknown."""
    if data_type in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING):
        return None
    name = onnx.TensorProto.DataType.Name(data_type)
    if name.endswith(("4", "4E2M1")) and ("INT4" in name or "FLOAT4" in name):
        return 0.5
    try:
        return float(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


# The typed repeated field each data type stores its values in, when not in raw_data.
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def _stored_elements(tensor: onnx.TensorProto) -> float | None:
    """Elements the tensor's data holds, or None when it is stored externally (checked on load)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if tensor.HasField("raw_data"):
        size = _itemsize(tensor.data_type)
        return None if not size else len(tensor.raw_data) / size
    for name in _TYPED_FIELDS:
        values = getattr(tensor, name)
        if len(values):
            count = len(values)
            if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                return count / 2
            size = _itemsize(tensor.data_type)
            if size == 0.5:  # int4/uint4/float4 pack two values per int32
                return count * 2
            return count
    return 0


def check_tensor_data(tensor: onnx.TensorProto, where: str) -> None:
    """A one-line error when `tensor`'s data does not fill its declared dims."""
    if any(d < 0 for d in tensor.dims):
        raise OnnxPruneError(f"{where} {tensor.name!r}: negative dim in its shape {list(tensor.dims)}")
    declared = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    stored = _stored_elements(tensor)
    if stored is None:
        return
    if stored == 0 and declared:
        raise OnnxPruneError(f"{where} {tensor.name!r}: declares shape {list(tensor.dims)} but holds no data")
    if (stored != declared and not (_itemsize(tensor.data_type) == 0.5 and abs(stored - declared) < 1)):
        raise OnnxPruneError(f"{where} {tensor.name!r}: declares shape {list(tensor.dims)} ({declared} values) "
                             f"but its data holds {stored:g}")


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"node #{index} ({node.op_type})"


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (If/Loop/Scan bodies)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for graph in graphs:
            local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
            for inner in graph.node:
                local.update(inner.output)
            for inner in graph.node:
                names.update(n for n in inner.input if n and n not in local)
                names.update(_outer_names(inner) - local)
            names.update(o.name for o in graph.output if o.name not in local)
    return names


UNSORTED_NOTE = ("the input's nodes were not in topological order (the ONNX standard requires it): "
                 "they were sorted")


def _check_text(graph: onnx.GraphProto) -> None:
    """Names must be text: protobuf hands back bytes for a string that is not valid UTF-8,
    which only a damaged file holds."""
    for index, node in enumerate(graph.node):
        fields = [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
        if not all(isinstance(f, str) for f in fields):
            raise OnnxPruneError(f"node #{index}: a name in it is not valid UTF-8 text (a damaged file?)")
    for kind, items in (("graph input", graph.input), ("graph output", graph.output),
                        ("initializer", graph.initializer)):
        for item in items:
            if not isinstance(item.name, str):
                raise OnnxPruneError(f"a {kind} name is not valid UTF-8 text (a damaged file?)")


def check_graph(model: onnx.ModelProto) -> list[int] | None:
    """Refuse a structurally broken main graph in one line. Returns None when the nodes are in
    order, else the order to put them in (see sort_nodes). Subgraphs are only checked for what
    they read from the main graph.
    """
    graph = model.graph
    _check_text(graph)
    producer: dict[str, str] = {}
    for tensor in graph.initializer:
        check_tensor_data(tensor, "initializer")
        if tensor.name in producer:
            raise OnnxPruneError(f"initializer {tensor.name!r} is stored twice")
        producer[tensor.name] = f"initializer {tensor.name!r}"
    for inp in graph.input:
        producer.setdefault(inp.name, f"graph input {inp.name!r}")  # IR < 4 lists initializers as inputs too
    for index, node in enumerate(graph.node):
        label = _node_label(node, index)
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    check_tensor_data(attr.t, f"{label}: constant")
        for name in node.output:
            if not name:
                continue
            if name in producer:
                raise OnnxPruneError(f"tensor {name!r} has two producers: {producer[name]} and {label}; "
                                     "tensor names must be unique")
            producer[name] = label
    reads = []
    for index, node in enumerate(graph.node):
        names = [n for n in node.input if n] + sorted(_outer_names(node))
        for name in names:
            if name not in producer:
                raise OnnxPruneError(f"{_node_label(node, index)} reads tensor {name!r}, which no node, "
                                     "initializer or graph input produces")
        reads.append(names)
    for out in graph.output:
        if out.name not in producer:
            raise OnnxPruneError(f"graph output {out.name!r} is produced by no node, initializer or input")
    order = _topological_order(graph, reads)
    return None if order == list(range(len(graph.node))) else order


def sort_nodes(model: onnx.ModelProto, order: list[int]) -> None:
    """Put the main graph's nodes in `order` (in place)."""
    nodes = [onnx.NodeProto() for _ in order]
    for copy, index in zip(nodes, order):
        copy.CopyFrom(model.graph.node[index])
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _topological_order(graph: onnx.GraphProto, reads: list[list[str]]) -> list[int]:
    """Node indices with every producer before its users: the file's order when it already is,
    else a sort. A cycle is a one-line error naming a node on it."""
    made_by = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    deps = [{made_by[n] for n in names if n in made_by} for names in reads]
    if all(d < i for i, found in enumerate(deps) for d in found):
        return list(range(len(graph.node)))
    waiting = [len(found) for found in deps]
    users: dict[int, list[int]] = {}
    for i, found in enumerate(deps):
        for d in found:
            users.setdefault(d, []).append(i)
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for user in sorted(users.get(i, ())):
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if len(order) == len(graph.node):
        return order
    # Every node left waits on another one left: walking back along those must come round.
    done = set(order)
    node, seen = next(i for i in range(len(graph.node)) if i not in done), set()
    while node not in seen:
        seen.add(node)
        node = min(d for d in deps[node] if d not in done)
    raise OnnxPruneError(f"the graph has a cycle through {_node_label(graph.node[node], node)}")


def refuse_unsupported(model: onnx.ModelProto) -> None:
    if model.ir_version > 11:
        raise OnnxPruneError(f"IR version {model.ir_version} is newer than this onnx package supports")


def load_input(model, weights: str = "memory") -> tuple[onnx.ModelProto, bool]:
    """The model to work on, and whether it was loaded here (so free to change in place).
    `weights`: where a path's external data stays (modelio.read_model)."""
    if isinstance(model, ModelFile):
        return model.model, True
    if isinstance(model, (str, Path)):
        return read_model(model, weights).model, True
    if not isinstance(model, onnx.ModelProto):
        raise OnnxPruneError(f"model: expected a path or an onnx.ModelProto, got {type(model).__name__}")
    return model, False
