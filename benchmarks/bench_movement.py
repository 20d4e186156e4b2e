"""Movement against magnitude for weight sparsity reached during distillation: paraphrase-MiniLM-L3-v2
made 50% and 70% sparse (unstructured, every MatMul with a constant weight), fine-tuned to match
the original's token states (mse, no labels) on unlabelled sentences. Measured: the mean-pooled
sentence embedding's cosine with the original's on held-out sentences.

Variants per sparsity: magnitude at once without training; magnitude at once, then the same
distillation with the zeros held; magnitude reached gradually during it (`--schedule cubic`);
movement reached gradually during it (`--schedule cubic --mask-by movement`).

Runs in the main environment (tokenizer, evaluation); onnxprune's side runs in the training
environment (`--training-python`, default .venv-training/bin/python), through the CLI. Data as
bench_distill.py: the 64 sentences of benchmarks/calibration_data.py, alternating between
training and evaluation, one sentence per batch.

    .venv/bin/python benchmarks/bench_movement.py [--epochs 8]
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

RESULTS = ROOT / "benchmarks" / "results" / "movement.json"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Movement pruning: paraphrase-MiniLM"
SPARSITIES = (0.5, 0.7)
VARIANTS = [("magnitude, at once, no training", [], False),
            ("magnitude, at once, then distilled", [], True),
            ("magnitude, gradual during distillation", ["--schedule", "cubic"], True),
            ("movement, gradual during distillation", ["--schedule", "cubic", "--mask-by", "movement"], True)]


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
        for sparsity in SPARSITIES:
            for name, extra, train in VARIANTS:
                print(f"{sparsity}: {name} ...", file=sys.stderr, flush=True)
                out, report = work / "out.onnx", work / "report.json"
                command = [python, "-m", "onnxprune", str(model), "--sparsity", str(sparsity), *extra, "-o", str(out),
                           "--report", str(report), "-q"]
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
                rows.append({"sparsity": sparsity, "variant": name, "cos_mean": float(similarity.mean()),
                             "cos_min": float(similarity.min()),
                             "reached": data["sparsity"]["total"]["sparsity"], "wall_s": round(wall, 1)})
                print(rows[-1], file=sys.stderr, flush=True)
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "epochs": epochs, "lr": lr,
            "train": len(train_text), "eval": len(eval_text), "rows": rows}


def render(results: dict) -> str:
    lines = [SECTION + f" ({results['date']})", "",
             f"Machine: {results['machine']}. `benchmarks/bench_movement.py`; results in "
             "`benchmarks/results/movement.json`.", "",
             f"paraphrase-MiniLM-L3-v2, `--sparsity R` (unstructured, every MatMul with a constant weight), distilled "
             f"through onnxruntime-training to match the original's token states (`--loss mse`, no labels; "
             f"{results['epochs']} epochs of one sentence per batch over {results['train']} sentences, AdamW lr "
             f"{results['lr']:g}); gradual rows reach R on the cubic schedule by 3/4 of the steps. Cosine of "
             f"mean-pooled sentence embeddings with the original's on {results['eval']} held-out sentences.", "",
             "| sparsity | variant | reached | cosine mean | cosine min | wall s |", "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['sparsity']} | {row['variant']} | {row['reached']:.3f} | {row['cos_mean']:.4f} | "
                     f"{row['cos_min']:.4f} | {row['wall_s']} |")
    return "\n".join(lines + [""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--training-python", default=str(ROOT / ".venv-training" / "bin" / "python"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = run(args.epochs, args.training_python, args.lr)
    if not args.no_write:
        RESULTS.write_text(json.dumps(results, indent=1))
        write_section(DOC, SECTION, render(results))
    print(render(results))


if __name__ == "__main__":
    main()
