"""Benchmark: magnitude vs activation criteria, with and without training-free recovery.

Fashion-MNIST CNN (benchmarks/fashion_mnist.py, trained here): calibration on 512 training
images, accuracy and output cosine on the 10,000 test images, every configuration pruned
with the same uniform ratio, so the MACs match. Appends a dated section to
docs/benchmarks.md unless --no-write.

    .venv/bin/python benchmarks/bench_calibration.py [--ratio 0.3] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fashion_mnist as fm  # noqa: E402
from machine_info import machine  # noqa: E402

from onnxprune import prune  # noqa: E402

CRITERIA = ("l2", "act", "apoz", "wanda", "recon")
RECOVERY = ("none", "bias", "bias,bn", "lsq,bn")
CALIB_SAMPLES = 512


def _logits(model, images, batch=1000):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model))
    return np.concatenate([session.run(None, {"images": images[i:i + batch]})[0]
                           for i in range(0, len(images), batch)])


def _cosine(a, b):
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def fashion_rows(ratio: float):
    model = fm.trained_cnn()
    train_x, _ = fm.load("train")
    test_x, test_y = fm.load("t10k")
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(train_x), CALIB_SAMPLES, replace=False)
    calib = [{"images": train_x[chosen[i:i + 64]]} for i in range(0, CALIB_SAMPLES, 64)]
    reference = _logits(model, test_x)
    base = {"accuracy": float((reference.argmax(1) == test_y).mean())}
    rows = []
    for crit in CRITERIA:
        for recover in RECOVERY:
            started = time.perf_counter()
            result = prune(str(model), filters=ratio, importance=crit, calib=calib, recover=recover,
                           latency_runs=0, verify=False)
            seconds = time.perf_counter() - started
            logits = _logits(result.model, test_x)
            rows.append({"criterion": crit, "recover": recover,
                         "macs": result.report["macs"]["after"] / result.report["macs"]["before"],
                         "accuracy": float((logits.argmax(1) == test_y).mean()),
                         "cosine": _cosine(logits, reference), "seconds": seconds})
            print(rows[-1], flush=True)
    return base, rows


def markdown(ratio, base, rows) -> str:
    lines = [f"## Calibration: criteria and recovery on a Fashion-MNIST CNN ({dt.date.today().isoformat()})", "",
             f"Machine: {machine()}.", "",
             f"Command: `.venv/bin/python benchmarks/bench_calibration.py --ratio {ratio}`. Model: "
             "benchmarks/fashion_mnist.py's CNN (conv 32/64/128 with BatchNorm, linear 128, 10 classes; 2 epochs, "
             f"seed 0), test accuracy {base['accuracy']:.4f}. Every row removes {ratio:.0%} of every prunable "
             f"group (MACs kept: {rows[0]['macs']:.3f}); calibration: {CALIB_SAMPLES} training images; measured "
             "on the 10,000 test images: top-1 accuracy and the mean cosine of the logits to the original's.", "",
             "| criterion | recovery | accuracy | logit cosine | prune s |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['criterion']} | {r['recover']} | {r['accuracy']:.4f} | {r['cosine']:.4f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    base, rows = fashion_rows(args.ratio)
    text = markdown(args.ratio, base, rows)
    print(text)
    if not args.no_write:
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
