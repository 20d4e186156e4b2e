"""Measuring a model in onnxruntime: random test inputs and latency. (Counting params and
MACs is cost.py's.)"""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnx

from .progress import progress


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
