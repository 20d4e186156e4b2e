"""Gradient criteria against magnitude and activations on the trained Fashion-MNIST CNN: test
accuracy after removing half and 70% of the filters, without recovery, with `--recover refit`,
and after one epoch of fine-tuning; and what each criterion costs in time.

Model and data as bench_sparsity.py: the CNN of benchmarks/fashion_mnist.py, BatchNorm folded;
calibration: 512 training images with their labels (key `labels`, which the gradient criteria
use; they take gradients on the first 256, one at a time); fine-tuning: one epoch over the
first 20,000 training images (cross-entropy, lr 1e-3, batch 64, `--unfold-bn off`). Accuracy on
the 10,000 test images. "criterion s" is the wall time of the run without recovery (analysis,
scoring, removal, verification) in this process; the l2 row is the baseline for what the
scoring adds. Needs the training environment:

    .venv-training/bin/python benchmarks/bench_gradient_criteria.py
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
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import fashion_mnist  # noqa: E402
from bench_sparsity import TRAIN_IMAGES, folded_cnn  # noqa: E402
from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "gradient_criteria.json"
TITLE = "## Gradient criteria"
RATIOS = (0.5, 0.7)
CRITERIA = ("l2", "act", "taylor", "fisher", "obd")
CALIB_IMAGES = 512


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-gradients"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from onnxprune import prune

    model = onnx.load(str(folded_cnn(Path("/tmp/onnxprune-sparsity"))))
    images, labels = fashion_mnist.load("train")
    order = np.random.default_rng(0).permutation(len(images))
    calib, train = args.workdir / "calib.npz", args.workdir / "train.npz"
    np.savez(calib, images=images[order[:CALIB_IMAGES]], labels=labels[order[:CALIB_IMAGES]])
    np.savez(train, images=images[:TRAIN_IMAGES], labels=labels[:TRAIN_IMAGES])
    test_images, test_labels = fashion_mnist.load("t10k")
    dense = fashion_mnist.accuracy(model, test_images, test_labels)
    rows = []
    for ratio in RATIOS:
        for name in CRITERIA:
            print(f"filters {ratio} by {name}", file=sys.stderr, flush=True)
            options = dict(filters=ratio, neurons=0.0, importance=name, calib=str(calib), latency_runs=0)
            started = time.perf_counter()
            plain = prune(model, **options)
            seconds = time.perf_counter() - started
            refit = prune(model, **options, recover=("refit",))
            tuned = prune(model, **options, finetune=str(train), loss="ce", epochs=1, lr=1e-3, batch_size=64,
                          unfold_bn="off")
            rows.append({"ratio": ratio, "criterion": name, "seconds": round(seconds, 1),
                         "params": plain.report["params"]["after"],
                         "accuracy": fashion_mnist.accuracy(plain.model, test_images, test_labels),
                         "accuracy_refit": fashion_mnist.accuracy(refit.model, test_images, test_labels),
                         "accuracy_finetuned": fashion_mnist.accuracy(tuned.model, test_images, test_labels)})
            print(rows[-1], file=sys.stderr, flush=True)
    info = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": info, "dense": dense,
                                   "rows": rows}, indent=1))
    text = section(rows, dense, info)
    write_section(DOC, TITLE, text)
    print(text)
    return 0


def section(rows: list[dict], dense: float, info: str) -> str:
    lines = ["| filters removed | criterion | params | test accuracy | with --recover refit | after 1 epoch of "
             "fine-tuning | criterion s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['ratio']} | {r['criterion']} | {r['params']} | {r['accuracy']:.4f} | "
                     f"{r['accuracy_refit']:.4f} | {r['accuracy_finetuned']:.4f} | {r['seconds']:.1f} |")
    return (f"{TITLE}\n\nMeasured {dt.date.today().isoformat()} on {info} by `benchmarks/bench_gradient_criteria.py`: "
            f"the BatchNorm-folded Fashion-MNIST CNN (test accuracy {dense:.4f} unpruned), `--filters R` by each "
            f"criterion, calibrated on {CALIB_IMAGES} training images with their labels (the gradient criteria take "
            "gradients on the first 256, one sample at a time); fine-tuning one epoch over "
            f"{TRAIN_IMAGES:,} training images without recovery. Criterion s: wall time of the run without recovery "
            "(everything but writing), the l2 row being the run without any scoring cost worth the name.\n\n"
            + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
