"""Benchmark: measured speed-up on onnxruntime's CPU kernels, plain `--filters R` against
`--filters R --target cpu` (channel counts kept in multiples of 8).

Models: timm's mobilenetv2_100 (R 0.4), efficientnet_b0 (0.3), regnety_008 (0.3) and resnet50
(0.3), random init with a fixed seed (benchmarks/coverage_timm.build), eval mode, exported by the
legacy torch exporter at 1x3x224x224 (BatchNorm folded by the exporter's constant folding). MACs
are the tool's count; latency is the median over runs in alternating blocks within one process
(bench_resnet50.latency_side_by_side), batch 1. "speed-up / MAC ratio" is how much of the MAC
saving the CPU turns into time: 1.0 when latency falls as fast as MACs.

    .venv/bin/python benchmarks/bench_target_cpu.py [--runs 40] [--threads 2] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import coverage_timm  # noqa: E402
from bench_resnet50 import latency_side_by_side  # noqa: E402
from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "target_cpu.json"
TITLE = "## Measured speed-up on CPU: --target cpu"
MODELS = [("mobilenetv2_100", 0.4), ("efficientnet_b0", 0.3), ("regnety_008", 0.3), ("resnet50", 0.3)]
VARIANTS = [("--filters R", {}), ("--filters R --target cpu", {"target": "cpu"})]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort

    from onnxprune import prune

    rows = []
    for name, ratio in MODELS:
        if args.only and args.only not in name:
            continue
        print(f"{name}: export", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model, x = coverage_timm.build(name, {}, 224)
            original = tmp / "original.onnx"
            coverage_timm.export(model, x, original, "legacy")
            del model
            paths, reports = {"original": original}, {}
            for label, options in VARIANTS:
                print(f"{name}: {label}", flush=True)
                result = prune(str(original), filters=ratio, latency_runs=0, **options)
                out = tmp / f"{len(paths)}.onnx"
                result.save(out)
                paths[label], reports[label] = out, result.report
            latency = latency_side_by_side(paths, args.runs, args.threads)
        macs_before = reports[VARIANTS[0][0]]["macs"]["before"]
        row = {"model": name, "ratio": ratio, "macs_before": macs_before, "latency_original_ms": latency["original"],
               "variants": {}}
        for label, _ in VARIANTS:
            report = reports[label]
            mac_ratio = macs_before / report["macs"]["after"]
            speedup = latency["original"] / latency[label]
            rounding = report.get("rounding") or {}
            row["variants"][label] = {"macs_after": report["macs"]["after"], "mac_ratio": mac_ratio,
                                      "latency_ms": latency[label], "speedup": speedup,
                                      "speedup_per_mac_ratio": speedup / mac_ratio,
                                      "channels_removed": report["summary"]["channels_removed"],
                                      "removed_ratio": rounding.get("removed_ratio")}
            print(f"  {label}: MACs {mac_ratio:.2f}x fewer, {latency[label]:.2f} ms against "
                  f"{latency['original']:.2f} ms ({speedup:.2f}x)", flush=True)
        rows.append(row)

    today = dt.date.today().isoformat()
    lines = [f"{TITLE} ({today})", "",
             f"Machine: {machine()}, onnxruntime {ort.__version__}. Command: `.venv/bin/python "
             f"benchmarks/bench_target_cpu.py --runs {args.runs} --threads {args.threads}`; results in "
             "`benchmarks/results/target_cpu.json`.", "",
             "timm models, random init (seed fixed), legacy export at 1x3x224x224, batch 1. Latency: median of "
             f"{args.runs} runs per model in alternating blocks, {args.threads} threads. `--target cpu` keeps every "
             "group at a multiple of 8 channels, the multiple nearest to what R asks.", "",
             "| model | R | variant | MACs after / before | channels removed | latency ms (original) | speed-up "
             "| speed-up / MAC ratio |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for label, v in row["variants"].items():
            lines.append(f"| {row['model']} | {row['ratio']} | `{label}` | {1 / v['mac_ratio']:.3f} | "
                         f"{v['channels_removed']} | {v['latency_ms']:.2f} ({row['latency_original_ms']:.2f}) | "
                         f"{v['speedup']:.2f}x | {v['speedup_per_mac_ratio']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(json.dumps({"date": today, "machine": machine(), "runs": args.runs,
                                       "threads": args.threads, "rows": rows}, indent=2))
        write_section(DOC, TITLE, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
