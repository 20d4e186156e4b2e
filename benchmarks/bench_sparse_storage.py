"""What sparse weights buy on disk and in onnxruntime: file size dense, stored as ONNX sparse
initializers (`--sparse-storage`) and zipped, and onnxruntime's load time and latency of both forms.

Models: the Fashion-MNIST CNN of bench_sparsity.py (BatchNorm folded, 94.5K weights; its
folded file must exist, made by that benchmark) and paraphrase-MiniLM-L3-v2 (../shared/models,
17 M parameters, of which the 18 MatMul weights are made sparse; the 12.5 M-parameter word
embedding table stays dense). Each row: `onnxprune MODEL --sparsity R` (magnitude) written
once plain and once with `--sparse-storage`. Sizes are of the written files; "zipped" is the
plain file through zip's deflate (level 6). Load: median seconds to create an onnxruntime
session from the file (5 tries); latency: median of 20 runs at one thread, at the shapes in the
table (random inputs). The outputs of both forms are compared bit for bit.

    .venv/bin/python benchmarks/bench_sparse_storage.py
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "sparse_storage.json"
TITLE = "## Sparse storage"
MINILM = ROOT.parent / "shared" / "models" / "paraphrase_minilm_l3_v2_bert.onnx"
CNN = Path("/tmp/onnxprune-sparsity/fashion_cnn_folded.onnx")  # bench_sparsity.py's working folder
MODELS = [("Fashion-MNIST CNN", CNN, {"images": [1, 1, 28, 28]}),
          ("paraphrase-MiniLM-L3", MINILM, {"input_ids": [1, 128], "attention_mask": [1, 128]})]
SETTINGS = [("dense", []), ("2:4", ["--pattern", "2:4"]), ("50%", ["--sparsity", "0.5"]),
            ("70%", ["--sparsity", "0.7"]), ("80%", ["--sparsity", "0.8"]), ("90%", ["--sparsity", "0.9"])]


def zipped_bytes(path: Path, workdir: Path) -> int:
    target = workdir / "z.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        archive.write(path, path.name)
    return target.stat().st_size


def timings(path: Path, shapes: dict) -> tuple[float, float, list]:
    import onnx
    import onnxruntime as ort

    from onnxprune.core.metrics import random_inputs

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    loads = []
    for _ in range(5):
        start = time.perf_counter()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        loads.append(time.perf_counter() - start)
    feeds = random_inputs(onnx.load(str(path)), shapes, 0)
    if "attention_mask" in feeds:
        feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
    outputs = session.run(None, feeds)
    runs = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, feeds)
        runs.append(time.perf_counter() - start)
    return statistics.median(loads), statistics.median(runs), outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-storage"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, path, shapes in MODELS:
        if not path.exists():
            raise SystemExit(f"{path} is missing (the CNN: run benchmarks/bench_sparsity.py first)")
        shape_args = [arg for name, dims in shapes.items()
                      for arg in ("--input-shape", f"{name}:{','.join(map(str, dims))}")]
        for setting, flags in SETTINGS:
            print(f"{label}: {setting}", file=sys.stderr, flush=True)
            plain, stored = args.workdir / "plain.onnx", args.workdir / "stored.onnx"
            if flags:
                base = [sys.executable, "-m", "onnxprune", str(path), *flags, *shape_args, "-q", "--no-verify"]
                for out, extra in ((plain, []), (stored, ["--sparse-storage"])):
                    done = subprocess.run(base + extra + ["-o", str(out)], capture_output=True, text=True)
                    if done.returncode:
                        raise SystemExit(done.stderr)
            else:
                plain.write_bytes(path.read_bytes())
                stored.write_bytes(path.read_bytes())
            load_plain, run_plain, out_plain = timings(plain, shapes)
            load_stored, run_stored, out_stored = timings(stored, shapes)
            rows.append({"model": label, "setting": setting, "file_bytes": plain.stat().st_size,
                         "stored_bytes": stored.stat().st_size, "zipped_bytes": zipped_bytes(plain, args.workdir),
                         "load_s": round(load_plain, 4), "load_stored_s": round(load_stored, 4),
                         "latency_ms": round(run_plain * 1e3, 3), "latency_stored_ms": round(run_stored * 1e3, 3),
                         "same_outputs": all(np.array_equal(a, b) for a, b in zip(out_plain, out_stored))})
            print(rows[-1], file=sys.stderr, flush=True)
    info = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": info, "rows": rows}, indent=1))
    text = section(rows, info)
    write_section(DOC, TITLE, text)
    print(text)
    return 0


def section(rows: list[dict], info: str) -> str:
    mb = 1e6
    lines = ["| model | sparsity | file MB | stored sparse MB | zipped MB | load s (sparse) | latency ms (sparse) "
             "| same outputs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['setting']} | {r['file_bytes'] / mb:.3f} | {r['stored_bytes'] / mb:.3f} | "
                     f"{r['zipped_bytes'] / mb:.3f} | {r['load_s']:.3f} ({r['load_stored_s']:.3f}) | "
                     f"{r['latency_ms']:.3f} ({r['latency_stored_ms']:.3f}) | {'yes' if r['same_outputs'] else 'NO'} |")
    return (f"{TITLE}\n\nMeasured {dt.date.today().isoformat()} on {info} by `benchmarks/bench_sparse_storage.py`: "
            "each model pruned by magnitude to the sparsity shown and written plain and with `--sparse-storage` "
            "(ONNX sparse initializers: each nonzero stored with its int64 position, only where that is smaller). "
            "Zipped: the plain file through deflate, level 6. Load: median seconds to create an onnxruntime session "
            "from the file; latency: median of 20 runs at one thread, the CNN at 1x1x28x28 and MiniLM at 1x128 "
            "tokens, random inputs; the sparse form's numbers in brackets.\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
