"""Counting what pruning saves: parameters, multiply-accumulates, bytes, latency."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx
from onnx import numpy_helper

from .modelio import model_bytes

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point constants, including ConstantOfShape-generated weights."""
    total = 0
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            total += int(np.prod(init.dims, dtype=np.int64))
    consts = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                    total += int(np.prod(attr.t.dims, dtype=np.int64))
                    consts[node.output[0]] = attr.t
        elif node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            shape = consts.get(node.input[0])
            if shape is not None and (value is None or value.data_type in _FLOAT_TYPES):
                total += int(np.prod(numpy_helper.to_array(shape), dtype=np.int64))
    return total


def count_macs(static_model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul, from inferred shapes."""
    shapes = {}
    for vi in list(static_model.graph.value_info) + list(static_model.graph.input) + list(static_model.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for init in static_model.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in static_model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    total = 0
    for node in static_model.graph.node:
        try:
            total += _node_macs(node, shapes)
        except (KeyError, TypeError, ValueError, IndexError):
            continue
    return int(total)


def _prod(dims):
    # Shape inference sometimes loses a batch-like dim even with fixed inputs; count it as 1.
    if dims is None:
        raise ValueError("unknown rank")
    return int(np.prod([1 if d is None or d == 0 else d for d in dims], dtype=np.int64))


def _node_macs(node, shapes):
    op = node.op_type
    if op == "Conv":
        w = shapes[node.input[1]]
        return _prod(shapes[node.output[0]]) * _prod(w[1:])
    if op == "ConvTranspose":
        w = shapes[node.input[1]]
        return _prod(shapes[node.input[0]]) * _prod(w[1:])
    if op == "Gemm":
        a = shapes[node.input[0]]
        trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return _prod(shapes[node.output[0]]) * _prod([k])
    if op == "MatMul":
        a = shapes[node.input[0]]
        return _prod(shapes[node.output[0]]) * _prod([a[-1]])
    return 0


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        shape = shapes[inp.name]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_ or "mask" in inp.name.lower():
            feeds[inp.name] = np.ones(shape, dtype=dtype)  # attention masks: attend everywhere
        else:
            feeds[inp.name] = rng.integers(0, 100, size=shape).astype(dtype)  # token ids, indices
    return feeds


def measure_latency(session, feeds, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of session.run in milliseconds."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


__all__ = ["count_params", "count_macs", "model_bytes", "random_inputs", "measure_latency"]
