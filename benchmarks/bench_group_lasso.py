"""Group-lasso fine-tuning, then removing what went to zero, against l2 pruning of the same
channels' count, at the same training budget: the trained Fashion-MNIST CNN (BatchNorm folded).

Group lasso: `onnxprune finetune --regularize group-lasso --reg-strength X` for 2 epochs (every
value coupled to a channel shrinks together, whole channels reach zero), then `--zero-channels`
(exact: the report's accuracy before and after removal agree), then 1 epoch of fine-tuning.
Baseline: the same number of channels per group removed by l2 (`keep_counts`) from the trained
CNN, then 3 epochs of fine-tuning. Both: 20,000 training images, batch 64, AdamW lr 1e-3,
cross-entropy, `--unfold-bn off`; test accuracy on 10,000 images. Needs the training environment:

    .venv-training/bin/python benchmarks/bench_group_lasso.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import fashion_mnist  # noqa: E402
from bench_sparsity import TRAIN_IMAGES, folded_cnn  # noqa: E402
from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "group_lasso.json"
TITLE = "## Group lasso, then removing the zero channels"
STRENGTHS = (0.5, 1.0, 2.0, 5.0, 10.0)
TRAINING = dict(loss="ce", lr=1e-3, batch_size=64, unfold_bn="off")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-group-lasso"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import onnxprune

    model = onnx.load(str(folded_cnn(Path("/tmp/onnxprune-sparsity"))))
    images, labels = fashion_mnist.load("train")
    train = args.workdir / "train.npz"
    np.savez(train, images=images[:TRAIN_IMAGES], labels=labels[:TRAIN_IMAGES])
    test_images, test_labels = fashion_mnist.load("t10k")

    def accuracy(m):
        return fashion_mnist.accuracy(m, test_images, test_labels)

    rows = []
    for strength in STRENGTHS:
        print(f"group lasso {strength}", file=sys.stderr, flush=True)
        regularized = onnxprune.finetune(model, str(train), epochs=2, regularize="group-lasso", reg_strength=strength,
                                         **TRAINING)
        summary = regularized.report["finetune"]["regularization"]
        removed = onnxprune.prune(regularized.model, zero_channels=True, latency_runs=0)
        kept = {d.key: d.group.channels - len(d.removed) for d in removed.plan.decisions}
        tuned = onnxprune.finetune(removed.model, str(train), epochs=1, **TRAINING)
        baseline = onnxprune.prune(model, keep_counts=kept, finetune=str(train), epochs=3, latency_runs=0, **TRAINING)
        rows.append({"strength": strength, "channels_zero": summary["channels_zero"], "channels": summary["channels"],
                     "params": removed.report["params"]["after"], "params_before": removed.report["params"]["before"],
                     "regularized": accuracy(regularized.model), "removed": accuracy(removed.model),
                     "tuned": accuracy(tuned.model), "baseline_params": baseline.report["params"]["after"],
                     "baseline": accuracy(baseline.model)})
        print(rows[-1], file=sys.stderr, flush=True)
    info = machine()
    dense = accuracy(model)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": info, "dense": dense, "rows": rows},
                                  indent=1))
    text = section(rows, dense, info)
    write_section(DOC, TITLE, text)
    print(text)
    return 0


def section(rows: list[dict], dense: float, info: str) -> str:
    lines = ["| strength | channels at zero | params | after 2 epochs with group lasso | zero channels removed | "
             "+ 1 epoch | l2, same channels, 3 epochs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strength']:g} | {r['channels_zero']} of {r['channels']} | {r['params']} | "
                     f"{r['regularized']:.4f} | {r['removed']:.4f} | {r['tuned']:.4f} | {r['baseline']:.4f} |")
    return (f"{TITLE}\n\nMeasured {dt.date.today().isoformat()} on {info} by `benchmarks/bench_group_lasso.py`: the "
            f"BatchNorm-folded Fashion-MNIST CNN ({rows[0]['params_before'] if rows else '-'} params, test accuracy "
            f"{dense:.4f}); 2 epochs of fine-tuning with `--regularize group-lasso --reg-strength X`, then "
            "`--zero-channels`, then 1 epoch of plain fine-tuning; against removing the same number of channels "
            "per group by l2 from the trained CNN and fine-tuning 3 epochs. 20,000 training images, batch 64, AdamW "
            "lr 1e-3, cross-entropy; test accuracy on 10,000 images.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
