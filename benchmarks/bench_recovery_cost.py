"""Benchmark: what calibration criteria and training-free recovery cost on a ResNet-50.

ResNet-50 (torchvision architecture, seeded random weights, BatchNorm kept so `bn` has work),
--filters R with 64 calibration images of 224x224 (random, in one .npz), each variant the CLI in
a fresh process: wall seconds and peak RSS. Random weights say nothing about accuracy; this is
about time and memory (the 3x3 convolutions' patch Grams are 576 to 4,608 wide). Writes a dated
section to docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_recovery_cost.py [--ratio 0.3] [--samples 64] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_resnet50 import run_tool  # noqa: E402
from machine_info import machine  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
TITLE = "## Recovery cost on ResNet-50"
VARIANTS = (("l2", "none"), ("act", "none"), ("recon", "none"), ("l2", "bias"), ("l2", "bias,bn"),
            ("l2", "lsq"), ("l2", "lsq,bn"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from fixtures.torch_models import export

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "resnet50.onnx"
        export("resnet50", model)  # BatchNorm nodes kept
        calib = tmp / "calib.npz"
        images = np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32)
        np.savez(calib, input=images)
        for importance, recover in VARIANTS:
            extra = [] if importance == "l2" and recover == "none" else ["--calib", str(calib)]
            wall, rss, report = run_tool([str(model), "--filters", str(args.ratio), "-o", str(tmp / "out.onnx"),
                                          "--no-verify", "--importance", importance, "--recover", recover, *extra])
            notes = [n for n in report.get("notes", []) if "lsq" in n or "BatchNorm" in n]
            rec = report.get("recovery", {})
            rows.append((importance, recover, wall, rss, rec.get("layers_compensated", 0),
                         rec.get("bn_reestimated", 0), notes))
            print(f"{importance:6s} {recover:8s} {wall:6.1f} s  {rss:6.0f} MiB  {notes}", flush=True)

    lines = [f"{TITLE} ({dt.date.today().isoformat()})", "",
             f"Machine: {machine()}, Python {platform.python_version()}, onnxruntime {ort.__version__}. "
             f"Command: `.venv/bin/python benchmarks/bench_recovery_cost.py --ratio {args.ratio} "
             f"--samples {args.samples}`.", "",
             f"ResNet-50 with BatchNorm, --filters {args.ratio}, {args.samples} calibration images of 224x224 in "
             "one .npz, no verification; each row is the CLI in a fresh process (wall time includes loading "
             "and saving). Random weights: this measures cost, not accuracy (docs: the Calibration section).", "",
             "| criterion | recovery | wall s | peak RSS MiB | layers compensated | BatchNorms corrected |",
             "|---|---|---|---|---|---|"]
    for importance, recover, wall, rss, layers, bns, _ in rows:
        lines.append(f"| {importance} | {recover} | {wall:.1f} | {rss:.0f} | {layers} | {bns} |")
    notes = sorted({n for row in rows for n in row[6]})
    if notes:
        lines += ["", "Report notes: " + " ".join(f"'{n}'" for n in notes)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        old = DOC.read_text() if DOC.exists() else ""
        start = old.find(TITLE)
        if start >= 0:
            end = old.find("\n## ", start + 1)
            old = old[:start] + (old[end + 1:] if end >= 0 else "")
        DOC.write_text(old.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
