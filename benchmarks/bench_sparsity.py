"""Weight sparsity on a trained Fashion-MNIST CNN: test accuracy by pattern and method, before and
after one short fine-tuning.

Model: benchmarks/fashion_mnist.py's CNN (three conv stages, two linear layers, trained here,
2 epochs), its BatchNorms folded into the convolutions by onnxruntime's basic graph
optimizations (saved as an ONNX file), 94.5K weights in 5 layers. The first convolution reads
one channel, so it cannot hold N:M and stays dense under 2:4 (the report lists it).

Rows: 2:4, 50% and 70% unstructured, each by magnitude, Wanda and SparseGPT (`--calib`: 512
training images, the same for every row), then the same with `--finetune` one epoch over the
first 20,000 training images (cross-entropy, lr 1e-3, batch 64; the zeros are held at zero)
where onnxruntime-training is installed (run this script with .venv-training/bin/python for
those rows; the CNN must have been trained once with torch, by .venv/bin/python); with it also
gradual rows: 50% and 70% unstructured reached during that same epoch on the cubic schedule
(`--schedule cubic`, magnitude). Accuracy on
the 10,000 test images. Results: benchmarks/results/sparsity.json and the section "Weight
sparsity" of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_sparsity.py            # the rows without fine-tuning
    .venv-training/bin/python benchmarks/bench_sparsity.py   # all rows
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
from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "sparsity.json"
TITLE = "## Weight sparsity"
PATTERNS = [("2:4", {"pattern": "2:4"}), ("50% unstructured", {"sparsity": 0.5}),
            ("70% unstructured", {"sparsity": 0.7})]
METHODS = ("magnitude", "wanda", "sparsegpt")
CALIB_IMAGES, TRAIN_IMAGES = 512, 20000


def folded_cnn(workdir: Path) -> Path:
    """The trained CNN with its BatchNorms folded into the convolutions (onnxruntime, basic level)."""
    import onnxruntime as ort

    path = workdir / "fashion_cnn_folded.onnx"
    if not path.exists():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(str(fashion_mnist.trained_cnn()), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(path))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node), "BatchNorm left unfolded"
    return path


def data(workdir: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    images, labels = fashion_mnist.load("train")
    order = np.random.default_rng(0).permutation(len(images))
    calib, train = workdir / "calib.npz", workdir / "train.npz"
    np.savez(calib, images=images[order[:CALIB_IMAGES]])
    np.savez(train, images=images[:TRAIN_IMAGES], labels=labels[:TRAIN_IMAGES])
    test_images, test_labels = fashion_mnist.load("t10k")
    return calib, train, test_images, test_labels


def can_finetune() -> bool:
    from onnxprune.passes.finetune import FineTune

    try:
        FineTune.check_runtime()
    except Exception:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-sparsity"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from onnxprune import prune

    model_path = folded_cnn(args.workdir)
    calib, train, test_images, test_labels = data(args.workdir)
    model = onnx.load(str(model_path))
    dense = fashion_mnist.accuracy(model, test_images, test_labels)
    rows = [{"pattern": "dense", "method": "", "accuracy": dense}]
    finetune = can_finetune()
    tuned_dense = None
    if finetune:
        result = prune(model, filters=0.0, finetune=str(train), loss="ce", epochs=1, lr=1e-3, batch_size=64,
                       latency_runs=0)
        tuned_dense = fashion_mnist.accuracy(result.model, test_images, test_labels)
        rows[0]["accuracy_finetuned"] = tuned_dense
    for label, pattern in PATTERNS:
        for method in METHODS:
            options = dict(pattern, sparsity_method=method, latency_runs=0)
            if method != "magnitude":
                options["calib"] = str(calib)
            print(f"{label} by {method}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = prune(model, **options)
            seconds = time.perf_counter() - start
            sparsity = result.report["sparsity"]
            row = {"pattern": label, "method": method, "seconds": round(seconds, 1),
                   "sparsity": sparsity["total"]["sparsity"], "layers": sparsity["total"]["layers"],
                   "dense_layers": len(sparsity["skipped"]),
                   "accuracy": fashion_mnist.accuracy(result.model, test_images, test_labels)}
            if finetune:
                tuned = prune(model, **options, finetune=str(train), loss="ce", epochs=1, lr=1e-3, batch_size=64)
                row["accuracy_finetuned"] = fashion_mnist.accuracy(tuned.model, test_images, test_labels)
                row["sparsity_after_finetuning"] = tuned.report["sparsity"]["total"]["sparsity"]
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        if finetune and pattern.get("sparsity"):  # the same epoch, the zeros growing during it
            print(f"{label} gradual", file=sys.stderr, flush=True)
            tuned = prune(model, **pattern, schedule="cubic", finetune=str(train), loss="ce", epochs=1, lr=1e-3,
                          batch_size=64, latency_runs=0)
            sparsity = tuned.report["sparsity"]
            rows.append({"pattern": label, "method": "magnitude, cubic during fine-tuning",
                         "sparsity": sparsity["total"]["sparsity"], "layers": sparsity["total"]["layers"],
                         "dense_layers": len(sparsity["skipped"]), "accuracy": None,
                         "accuracy_finetuned": fashion_mnist.accuracy(tuned.model, test_images, test_labels)})
            print(rows[-1], file=sys.stderr, flush=True)
    info = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": info, "finetuned": finetune,
                                   "rows": rows}, indent=1))
    write_section(DOC, TITLE, section(rows, info, finetune))
    print(section(rows, info, finetune))
    return 0


def section(rows: list[dict], info: str, finetune: bool) -> str:
    head = ("| pattern | method | sparsity | layers sparse (dense) | test accuracy | after 1 epoch of fine-tuning |"
            if finetune else "| pattern | method | sparsity | layers sparse (dense) | test accuracy |")
    lines = [head, "|" + "---|" * (6 if finetune else 5)]
    for r in rows:
        cells = [r["pattern"], r["method"] or "-",
                 f"{r['sparsity']:.3f}" if "sparsity" in r else "0",
                 f"{r['layers']} ({r['dense_layers']})" if "layers" in r else "-",
                 f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"]
        if finetune:
            cells.append(f"{r['accuracy_finetuned']:.4f}" if "accuracy_finetuned" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return (f"{TITLE}\n\nMeasured {dt.date.today().isoformat()} on {info} by `benchmarks/bench_sparsity.py`: the "
            "Fashion-MNIST CNN of benchmarks/fashion_mnist.py (trained here, BatchNorm folded), 10,000 test images; "
            f"Wanda and SparseGPT calibrated on {CALIB_IMAGES} training images"
            + (f"; fine-tuning one epoch over {TRAIN_IMAGES:,} training images, zeros held (the gradual rows reach "
               "their zeros during that epoch, all by 3/4 of its steps, so they have no value before it)"
               if finetune else "")
            + ". Sparsity counts the zeros of the layers made sparse (the first convolution, one input channel, "
            "stays dense under 2:4).\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
