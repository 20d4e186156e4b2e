"""Latency of several models side by side, for the benchmarks."""
from __future__ import annotations

import statistics
import time

import onnxruntime as ort


def side_by_side(paths: dict, feeds: dict, runs: int, threads: int, rounds: int = 5) -> dict[str, float]:
    """Median latency (ms) per model, in alternating blocks of runs within one process, every
    model fed `feeds`. A value of `paths` is a path, or (path, {session config entry: value}).

    Blocks rather than single alternating runs: onnxruntime's intra-op threads spin after a run,
    and a run of another session during that spin measures the contention, not the model (seen
    here: 57 ms instead of 28 ms for the same ResNet-50)."""
    sessions = {}
    for key, value in paths.items():
        path, config = value if isinstance(value, tuple) else (value, {})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        for name, setting in config.items():
            options.add_session_config_entry(name, setting)
        sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, session in sessions.items():
            for _ in range(2):
                session.run(None, feeds)
            for _ in range(max(runs // rounds, 1)):
                began = time.perf_counter()
                session.run(None, feeds)
                times[k].append((time.perf_counter() - began) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}
