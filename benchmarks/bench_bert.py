"""Benchmark: heads, neurons and layers on a BERT-base-sized encoder (random weights).

12 post-LN layers, hidden 768, 12 heads, FFN 3072, sequence 128, written in torch the way
Hugging Face's BertLayer computes (q/k/v Linear, view to heads, scores, softmax, context,
output Linear, residual + LayerNorm) and exported by the legacy exporter. Measures the
tool's wall time and onnxruntime latency before/after, side by side, and appends a dated
section to docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_bert.py [--runs 20] [--threads 2] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_info import machine  # noqa: E402

from onnxprune import prune, save_model  # noqa: E402

HIDDEN, HEADS, FFN, LAYERS, SEQ = 768, 12, 3072, 12, 128
TOOL_RUNS = 3


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.up, self.down = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def heads(self, t):
        return t.view(t.shape[0], t.shape[1], HEADS, HIDDEN // HEADS).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS) + mask
        context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], HIDDEN)
        x = self.ln1(x + self.o(context))
        return self.ln2(x + self.down(torch.nn.functional.gelu(self.up(x))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x, attention_mask):
        mask = (1.0 - attention_mask[:, None, None, :]) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return x


def export(path: Path) -> None:
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(1, SEQ, HIDDEN)
    mask = torch.ones(1, SEQ)
    with torch.no_grad():
        torch.onnx.export(model, (x, mask), str(path), input_names=["hidden", "attention_mask"],
                          output_names=["output"], opset_version=17, dynamo=False)


def latencies(paths: dict, runs: int, threads: int, rounds: int = 4) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    feeds = {"hidden": np.random.default_rng(0).standard_normal((1, SEQ, HIDDEN)).astype(np.float32),
             "attention_mask": np.ones((1, SEQ), np.float32)}
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            s.run(None, feeds)
            for _ in range(max(runs // rounds, 1)):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    variants = {
        "heads 25% + neurons 25%": dict(heads=0.25, neurons=0.25),
        "heads 50% + neurons 50%": dict(heads=0.5, neurons=0.5),
        "drop 1/4 of the blocks (6 of 24 sublayers)": dict(layers=0.25),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "bert.onnx"
        export(src)
        paths, rows = {"original": src}, []
        for label, opts in variants.items():
            times = []
            for _ in range(TOOL_RUNS):  # the file cache and lazy imports make a single run noisy
                t0 = time.perf_counter()
                result = prune(src, latency_runs=0, verify=False, **opts)
                times.append(time.perf_counter() - t0)
            seconds = statistics.median(times)
            out = tmp / f"v{len(paths)}.onnx"
            save_model(result.model, out)
            paths[label] = out
            rows.append((label, seconds, result.report))
        lat = latencies(paths, args.runs, args.threads)
    first = rows[0][2]
    lines = [f"## BERT-base-sized encoder: heads, neurons, layers ({dt.date.today().isoformat()})", "",
             f"Machine: {machine()}, Python {platform.python_version()}, onnxruntime {ort.__version__}.",
             f"Command: `.venv/bin/python benchmarks/bench_bert.py --runs {args.runs} --threads {args.threads}`. "
             f"Model: {LAYERS} post-LN layers, hidden {HIDDEN}, {HEADS} heads, FFN {FFN}, sequence {SEQ}, random "
             "weights, legacy torch export; tool time is the median of 3 runs of `prune()` with the checker but without the onnxruntime "
             f"run; latency is the median of {args.runs} runs per model in alternating blocks, {args.threads} threads.",
             "", f"Original: {first['params']['before'] / 1e6:.1f} M params, {first['macs']['before'] / 1e9:.2f} GMACs, "
             f"latency {lat['original']:.1f} ms.", "",
             "| variant | tool time (s) | params after | MACs after | latency (ms) | speedup |", "|---|---|---|---|---|---|"]
    for label, seconds, report in rows:
        lines.append(f"| {label} | {seconds:.2f} | {report['params']['after'] / 1e6:.1f} M | "
                     f"{report['macs']['after'] / 1e9:.2f} G | {lat[label]:.1f} | {lat['original'] / lat[label]:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with (ROOT / "docs" / "benchmarks.md").open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
