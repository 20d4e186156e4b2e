"""Measuring a model in onnxruntime: random test inputs and latency. (Counting params and
MACs is cost.py's.)"""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from .progress import progress


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs to run `model` on: normal floats, masks of ones, and integers (token ids, token
    types, positions) below the row count of every table the graph looks them up in."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inits = {i.name for i in model.graph.initializer}
    bounds = _index_bounds(model.graph)
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
            high = max(1, min(100, bounds.get(inp.name, 100)))
            feeds[inp.name] = rng.integers(0, high, size=shape).astype(dtype)  # token ids, indices
    return feeds


def _index_bounds(graph: onnx.GraphProto) -> dict[str, int]:
    """{graph input: the fewest rows of a constant table that a Gather indexes with it}
    (through Cast/Identity/Unsqueeze/Reshape/Squeeze/Flatten on the way)."""
    sizes = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            sizes[node.output[0]] = list(node.attribute[0].t.dims)
    origin = {i.name: i.name for i in graph.input}
    for node in graph.node:  # nodes are in topological order
        if node.op_type in ("Cast", "Identity", "Unsqueeze", "Reshape", "Squeeze", "Flatten") and node.input \
                and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
    bounds: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in origin:
            continue
        table = sizes.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table and -len(table) <= axis < len(table):
            name = origin[node.input[1]]
            bounds[name] = min(bounds.get(name, table[axis]), table[axis])
    return bounds


def measure_latency(session, feeds, runs: int = 20, warmup: int = 3, budget_s: float | None = None) -> float:
    """Median wall time of session.run in milliseconds (see timed_runs)."""
    return timed_runs(session, feeds, runs, warmup, budget_s)[0]


def timed_runs(session, feeds, runs: int = 20, warmup: int = 3, budget_s: float | None = None,
               min_runs: int = 3) -> tuple[float, int]:
    """(median wall time of session.run in ms, timed runs). With a budget, warm-up and timed
    runs together stop near `budget_s` seconds (never fewer than `min_runs` timed runs): a
    model taking seconds per inference is not run 2 x 23 times to time it."""
    started = time.perf_counter()
    session.run(None, feeds)
    first = time.perf_counter() - started
    if budget_s is not None:
        warmup = min(warmup, max(1, int(0.2 * budget_s / max(first, 1e-9))))
        runs = max(min(runs, int(0.8 * budget_s / max(first, 1e-9))), min(min_runs, runs))
    for _ in range(warmup - 1):
        session.run(None, feeds)
    times = []
    for _ in progress(range(runs), "timing", unit="run"):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), runs


__all__ = ["random_inputs", "measure_latency", "timed_runs"]
