"""Pruning the model width (--hidden): what it saves, what it costs in latency, and how exact it is.

Models (random weights, nothing downloaded):

  * ViT-Tiny/16 at 224x224 (timm `vit_tiny_patch16_224`, torch legacy export, opset 17): its
    width runs through 25 LayerNormalization ops, so this is where `--hidden-layernorm exact`
    (each pruned LayerNorm written out as 14 ops) and `fused` (kept, approximate) differ;
  * a Llama-shaped decoder (fixtures/llama_decoder.py: hidden 512, 4 layers, 8 heads, 4 kv heads,
    SwiGLU 1376, vocab 4096, sequence 128): RMSNorm written out by the exporter as
    Pow/ReduceMean/..., each kept exact by one Mul.

For each, `--hidden 0.25` and, for comparison, `--neurons 0.25` (MLP hidden units): params and
MACs from the tool's report, onnxruntime latency on this machine (one thread, median of 50 runs
after 5 warm-up runs, one session per model, batch 1, the models' own shapes), and exactness: dead width
channels planted (tests/planting.py), the same amount removed, the largest output difference
relative to the largest output. Results go to benchmarks/results/hidden_width.json and a section
of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_hidden.py [--workdir /tmp/onnxprune-hidden]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "hidden_width.json"
TITLE = "## Model width (--hidden)"
RUNS, WARMUP = 50, 5


def vit(workdir: Path) -> tuple[onnx.ModelProto, dict]:
    import coverage_timm

    model, x = coverage_timm.build("vit_tiny_patch16_224", {}, 224)
    path = workdir / "vit_tiny_224.onnx"
    coverage_timm.export(model, x, path, "legacy")
    return onnx.load(str(path)), {"input": [1, 3, 224, 224]}


def decoder(workdir: Path) -> tuple[onnx.ModelProto, dict]:
    from fixtures.llama_decoder import write_decoder

    path = workdir / "llama_512.onnx"
    write_decoder(path, hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1376, vocab=4096, seq=128,
                  progress=False)
    return onnx.load(str(path)), {}


def latency_ms(model: onnx.ModelProto, feeds: dict) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # one thread: steadier beside other work on a 2-core machine
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(WARMUP):
        session.run(None, feeds)
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def exactness(model: onnx.ModelProto, options: dict, feeds: dict) -> float:
    from conftest import max_rel_diff, run_model
    from planting import plant_dead_channels

    from onnxprune import prune

    planted, _ = plant_dead_channels(model, 0.25, hidden=True)
    pruned = prune(planted, hidden=0.25, latency_runs=0, **options).model
    return max_rel_diff(run_model(planted, feeds), run_model(pruned, feeds))


def rows_for(name: str, model: onnx.ModelProto, shapes: dict) -> list[dict]:
    from onnxprune import prune
    from onnxprune.core.metrics import random_inputs
    from onnxprune.core.shapes import concrete_input_shapes

    dims, _ = concrete_input_shapes(model, shapes or None)
    feeds = random_inputs(model, dims, 1)
    base = {"model": name, "run": "original", "latency_ms": latency_ms(model, feeds)}
    rows = [base]
    runs = [("--hidden 0.25", {"hidden": 0.25}), ("--neurons 0.25", {"neurons": 0.25})]
    if any(node.op_type == "LayerNormalization" for node in model.graph.node):
        runs.insert(1, ("--hidden 0.25 --hidden-layernorm fused", {"hidden": 0.25, "hidden_layernorm": "fused"}))
    for label, options in runs:
        print(f"{name}: {label}", flush=True)
        start = time.perf_counter()
        result = prune(model, latency_runs=0, input_shapes=shapes or None, **options)
        seconds = time.perf_counter() - start
        report = result.report
        row = {"model": name, "run": label, "tool_s": round(seconds, 1),
               "params": [report["params"]["before"], report["params"]["after"]],
               "macs": [report["macs"]["before"], report["macs"]["after"]],
               "latency_ms": latency_ms(result.model, feeds),
               "layernorm_ops": sum(n.op_type == "LayerNormalization" for n in result.model.graph.node)}
        if "hidden" in options:
            row["planted_rel_diff"] = exactness(model, {k: v for k, v in options.items() if k != "hidden"}, feeds)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | run | params kept | MACs kept | ORT latency ms | LayerNorm ops "
             "| planted dead width: rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["run"] == "original":
            lines.append(f"| {r['model']} | original | 1.000 | 1.000 | {r['latency_ms']:.2f} | | |")
            continue
        planted = f"{r['planted_rel_diff']:.1e}" if "planted_rel_diff" in r else ""
        lines.append(f"| {r['model']} | `{r['run']}` | {r['params'][1] / r['params'][0]:.3f} | "
                     f"{r['macs'][1] / r['macs'][0]:.3f} | {r['latency_ms']:.2f} | {r['layernorm_ops']} | {planted} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-hidden"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, build in (("ViT-Tiny/16 224", vit), ("Llama-shaped 512x4", decoder)):
        model, shapes = build(args.workdir)
        rows += rows_for(name, model, shapes)
    info = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": info, "rows": rows}, indent=1))
    text = (f"{TITLE}\n\nMeasured {dt.date.today().isoformat()} on {info} by `benchmarks/bench_hidden.py` "
            "(random weights; batch 1 at the models' own shapes: ViT 224x224, decoder 128 tokens; "
            f"onnxruntime CPU, one thread, median of {RUNS} runs).\n\n" + table(rows))
    write_section(DOC, TITLE, text)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
