"""Fine-tuning with labels on a real model: the PP-OCR text-angle classifier (shared corpus),
pruned, then fine-tuned through onnxruntime-training on text crops labelled upright (0) or
turned 180 degrees (1), with cross-entropy or distillation from the original mixed with it.

Runs in the main environment (crops, evaluation); onnxprune runs in the training environment
(`--training-python`, default .venv-training/bin/python), through the CLI.

    .venv/bin/python benchmarks/bench_cls_finetune.py [--filters 0.3] [--epochs 20] [--lr 1e-3] [--no-write]

Data: the crops of benchmarks/bench_calibration.py's classifier case (benchmarks/calibration_data.py):
the calibration half trains, the evaluation half (other text lines) measures accuracy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import calibration_data as cd  # noqa: E402
from bench_calibration import OCR_CLS, distinct_dims  # noqa: E402
from machine_info import machine, write_section  # noqa: E402
from real_models import fetch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cls_finetune.json"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Fine-tuning with labels: PP-OCR text-angle classifier"


def crops_and_labels(half: str, crops: dict) -> tuple[np.ndarray, np.ndarray]:
    upright = np.stack([cd.paddle_input(c, 48, 192)[0] for c in crops[half]])
    turned = np.stack([cd.paddle_input(c[::-1, ::-1], 48, 192)[0] for c in crops[half]])
    return np.concatenate([upright, turned]), np.r_[np.zeros(len(upright)), np.ones(len(turned))].astype(np.int64)


def accuracy(path, x, y, reference=None) -> tuple[float, float | None]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = np.concatenate([session.run(None, {"x": x[s:s + 32]})[0] for s in range(0, len(x), 32)])
    agree = None if reference is None else float((out.argmax(1) == reference.argmax(1)).mean())
    return float((out.argmax(1) == y).mean()), agree, out


def run(filters: float, epochs: int, lr: float, python: str) -> dict:
    crops = cd.ocr_crops(aspect=4.0, stride=1.0)
    train_x, train_y = crops_and_labels("calib", crops)
    eval_x, eval_y = crops_and_labels("eval", crops)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "cls.onnx"
        onnx.save(distinct_dims(fetch(OCR_CLS)), str(model))
        original_accuracy, _, reference = accuracy(model, eval_x, eval_y)
        np.savez(work / "train.npz", x=train_x, labels=train_y)
        prune = ["--filters", str(filters), "--input-shape", "x:1,3,48,192"]
        train = ["--finetune", str(work / "train.npz"), "--epochs", str(epochs), "--batch-size", "16", "--lr",
                 str(lr)]
        variants = [("pruned, no training", []),
                    ("+ ce fine-tuning (labels)", train + ["--loss", "ce"]),
                    ("+ kd from the original, mixed with ce", train + ["--loss", "kd"])]
        for name, extra in variants:
            print(f"{name} ...", file=sys.stderr)
            out, report = work / "out.onnx", work / "report.json"
            began = time.perf_counter()
            done = subprocess.run([python, "-m", "onnxprune", str(model), *prune, *extra, "-o", str(out),
                                   "--report", str(report), "-q"], capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{name}: {done.stderr.strip()}")
            wall = time.perf_counter() - began
            data = json.loads(report.read_text())
            acc, agree, _ = accuracy(out, eval_x, eval_y, reference)
            finetune = data.get("finetune") or {}
            rows.append({"variant": name, "accuracy": acc, "agree": agree,
                         "macs": data["macs"]["after"] / data["macs"]["before"], "steps": finetune.get("steps"),
                         "step_ms": finetune.get("step_ms"), "wall_s": round(wall, 1),
                         "notes": [n for n in data.get("notes", []) if n.startswith("fine-tuning")]})
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "filters": filters, "epochs": epochs, "lr": lr,
            "train": len(train_x), "eval": len(eval_x), "original": original_accuracy, "rows": rows}


def render(results: dict) -> str:
    lines = [SECTION + f" ({results['date']})", "",
             f"Machine: {results['machine']}. `benchmarks/bench_cls_finetune.py`; results in "
             "`benchmarks/results/cls_finetune.json`.", "",
             f"`{OCR_CLS}` (a Paddle export, opset 11, weights in Constant nodes), `--filters {results['filters']:g}` "
             f"(l2) at `--input-shape x:1,3,48,192`, then fine-tuned through onnxruntime-training for "
             f"{results['epochs']} epochs (batch 16, AdamW lr {results['lr']:g}) on {results['train']} labelled "
             "crops (the calibration half of the classifier case above, each upright and turned 180 degrees); "
             f"accuracy on the {results['eval']} crops of the other text lines. The original model's accuracy "
             f"there: {results['original']:.4f}. The input shape fixes dims for pruning only: training runs at "
             "batch 16, the model's BatchNorms on batch statistics. With so few crops this measures that "
             "labelled fine-tuning recovers a real, BatchNorm-carrying Paddle model, not how far it can go.", "",
             "| variant | MACs kept | accuracy | same class as original | steps | ms/step | wall s |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['variant']} | {row['macs']:.2f} | {row['accuracy']:.4f} | {row['agree']:.4f} | "
                     f"{row['steps'] or '-'} | {row['step_ms'] or '-'} | {row['wall_s']} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--filters", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--training-python", default=str(ROOT / ".venv-training" / "bin" / "python"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if args.render else run(args.filters, args.epochs, args.lr,
                                                                     args.training_python)
    if not args.render and not args.no_write:
        RESULTS.write_text(json.dumps(results, indent=1))
    print(render(results))
    if not args.no_write:
        write_section(DOC, SECTION, render(results))


if __name__ == "__main__":
    main()
