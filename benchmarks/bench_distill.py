"""Distillation benchmark: paraphrase-MiniLM-L3-v2 (the shared corpus model) with a quarter of
its attention heads and MLP neurons removed, then fine-tuned through onnxruntime-training to
match the original's token states (mse, no labels) on unlabelled sentences. Measured: the
mean-pooled sentence embedding's cosine with the original's on held-out sentences.

Runs in the main environment (tokenizer, evaluation); onnxprune's side runs in the training
environment (`--training-python`, default .venv-training/bin/python), through the CLI.

    .venv/bin/python benchmarks/bench_distill.py [--epochs 8] [--no-write]

Data: the 64 sentences of benchmarks/calibration_data.py, alternating between training and
evaluation; each training sentence is its own .npz (no padding), so batches are of one sentence.
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
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import calibration_data as cd  # noqa: E402
from machine_info import machine, write_section  # noqa: E402
from real_fidelity import MINILM, TOKEN_OUTPUT, cosine, mean_pool, minilm_tokenizer  # noqa: E402
from real_models import fetch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "distill.json"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Distillation after pruning: paraphrase-MiniLM"
PRUNE = ["--heads", "0.25", "--neurons", "0.25"]


def run(epochs: int, python: str, lr: float) -> dict:
    model = fetch(MINILM)
    tokenizer = minilm_tokenizer()
    train_text, eval_text = cd.SENTENCES[0::2], cd.SENTENCES[1::2]
    batch = tokenizer(eval_text, padding=True, return_tensors="np")
    eval_feeds = {"input_ids": batch["input_ids"].astype(np.int64),
                  "attention_mask": batch["attention_mask"].astype(np.int64)}

    def embeddings(path):
        (tokens,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([TOKEN_OUTPUT],
                                                                                            eval_feeds)
        return mean_pool(tokens, eval_feeds["attention_mask"])

    reference = embeddings(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_dir = work / "train"
        train_dir.mkdir()
        for index, sentence in enumerate(train_text):
            ids = tokenizer([sentence], return_tensors="np")
            np.savez(train_dir / f"{index:03d}.npz", input_ids=ids["input_ids"].astype(np.int64),
                     attention_mask=ids["attention_mask"].astype(np.int64))
        variants = [
            ("l2, no training", [], False),
            ("l2, lsq recovery, no training", ["--calib", str(train_dir), "--recover", "lsq"], False),
            ("l2 + mse fine-tuning", [], True),
            ("l2, lsq recovery + mse fine-tuning", ["--calib", str(train_dir), "--recover", "lsq"], True),
        ]
        for name, extra, train in variants:
            print(f"{name} ...", file=sys.stderr)
            out, report = work / "out.onnx", work / "report.json"
            command = [python, "-m", "onnxprune", str(model), *PRUNE, *extra, "-o", str(out), "--report", str(report),
                       "-q"]
            if train:
                command += ["--finetune", str(train_dir), "--loss", "mse", "--train-output", TOKEN_OUTPUT,
                            "--epochs", str(epochs), "--batch-size", "1", "--lr", str(lr)]
            began = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{name}: {done.stderr.strip()}")
            wall = time.perf_counter() - began
            data = json.loads(report.read_text())
            similarity = cosine(embeddings(out), reference)
            finetune = data.get("finetune") or {}
            rows.append({"variant": name, "cos_mean": float(similarity.mean()), "cos_min": float(similarity.min()),
                         "macs": data["macs"]["after"] / data["macs"]["before"], "wall_s": round(wall, 1),
                         "steps": finetune.get("steps"), "step_ms": finetune.get("step_ms")})
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "epochs": epochs, "lr": lr,
            "train": len(train_text), "eval": len(eval_text), "rows": rows}


def render(results: dict) -> str:
    lines = [SECTION + f" ({results['date']})", "",
             f"Machine: {results['machine']}. `benchmarks/bench_distill.py`; results in "
             "`benchmarks/results/distill.json`.", "",
             f"paraphrase-MiniLM-L3-v2 (`{MINILM}`), `{' '.join(PRUNE)}` (l2), with or without training-free `lsq` "
             f"recovery on the {results['train']} training sentences, then fine-tuned through onnxruntime-training "
             f"to match the original's token states (`--loss mse`, no labels; {results['epochs']} epochs of one "
             f"sentence per batch, AdamW lr {results['lr']:g}). Cosine of mean-pooled sentence embeddings with the "
             f"original's on {results['eval']} held-out sentences (the sentences of "
             "benchmarks/calibration_data.py, alternating between the halves). `--loss kd` does not apply here: "
             "its softmax is over classes, and this model's outputs are embeddings.", "",
             "| variant | MACs kept | cosine mean | cosine min | steps | ms/step | wall s |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['variant']} | {row['macs']:.2f} | {row['cos_mean']:.4f} | {row['cos_min']:.4f} | "
                     f"{row['steps'] or '-'} | {row['step_ms'] or '-'} | {row['wall_s']} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--training-python", default=str(ROOT / ".venv-training" / "bin" / "python"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if args.render else run(args.epochs, args.training_python, args.lr)
    if not args.render and not args.no_write:
        RESULTS.write_text(json.dumps(results, indent=1))
    print(render(results))
    if not args.no_write:
        write_section(DOC, SECTION, render(results))


if __name__ == "__main__":
    main()
