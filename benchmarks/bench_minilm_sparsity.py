"""Weight sparsity on a real sentence encoder: paraphrase-MiniLM-L3-v2 (its own legacy export,
see tests/real_models.py) at 2:4 and 50% unstructured, by magnitude, Wanda and SparseGPT.

Calibration (Wanda, SparseGPT): the 64 sentences of benchmarks/calibration_data.py, in padded
batches of 8 with their attention mask (padding left out of the statistics). Evaluation: the 24
held-out sentences of benchmarks/real_fidelity.py, disjoint from them; the metric is the cosine
between the pruned and the original model's mean-pooled sentence embeddings, mean and min. Tool
time and peak memory (RSS of this process, in GB) are given per row. No training. Results:
benchmarks/results/minilm_sparsity.json and the section "Weight sparsity on paraphrase-MiniLM"
of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_minilm_sparsity.py
"""
from __future__ import annotations

import datetime as dt
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import calibration_data  # noqa: E402
import real_fidelity  # noqa: E402
from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "minilm_sparsity.json"
TITLE = "## Weight sparsity on paraphrase-MiniLM"
SHARED = ROOT.parent / "shared" / "models" / "paraphrase_minilm_l3_v2_bert.onnx"


def batches(tokenizer, sentences: list[str], size: int = 8) -> list[dict]:
    out = []
    for start in range(0, len(sentences), size):
        enc = tokenizer(sentences[start:start + size], padding=True, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def embeddings(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    session = real_fidelity.session(model)
    return np.concatenate([real_fidelity.mean_pool(session.run([real_fidelity.TOKEN_OUTPUT], f)[0],
                                                   f["attention_mask"].astype(bool)) for f in feeds])


def main() -> int:
    from real_models import fetch

    from onnxprune import load_model, prune

    model = load_model(SHARED if SHARED.is_file() else fetch("paraphrase_minilm_l3_v2_bert.onnx"))
    tokenizer = real_fidelity.minilm_tokenizer()
    calib = batches(tokenizer, list(calibration_data.SENTENCES))
    held_out = batches(tokenizer, list(real_fidelity.SENTENCES), size=24)
    reference = embeddings(model, held_out)
    rows = []
    for label, pattern in (("2:4", {"pattern": "2:4"}), ("50% unstructured", {"sparsity": 0.5})):
        for method in ("magnitude", "wanda", "sparsegpt"):
            options = dict(pattern, sparsity_method=method, latency_runs=0)
            if method != "magnitude":
                options["calib"] = calib
            print(f"{label} by {method}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            result = prune(model, **options)
            seconds = time.perf_counter() - start
            cos = real_fidelity.cosine(embeddings(result.model, held_out), reference)
            total = result.report["sparsity"]["total"]
            rows.append({"pattern": label, "method": method, "sparsity": total["sparsity"], "layers": total["layers"],
                         "dense_layers": len(result.report["sparsity"]["skipped"]),
                         "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                         "seconds": round(seconds, 1),
                         "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
            print(rows[-1], file=sys.stderr, flush=True)
    info = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": info, "rows": rows}, indent=1))
    lines = ["| pattern | method | sparsity | layers sparse (dense) | cosine mean / min | tool s | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['sparsity']:.3f} | {r['layers']} ({r['dense_layers']}) | "
                     f"{r['cosine_mean']:.4f} / {r['cosine_min']:.4f} | {r['seconds']} | {r['peak_rss_gb']} |")
    text = (f"{TITLE}\n\nMeasured {dt.date.today().isoformat()} on {info} by `benchmarks/bench_minilm_sparsity.py`: "
            "paraphrase-MiniLM-L3-v2 (3 layers, hidden 384), every MatMul with a constant weight; Wanda and SparseGPT "
            "calibrated on 64 sentences, cosine of mean-pooled embeddings against the dense model on 24 held-out "
            "sentences; no training. Peak RSS is the process's so far (it only grows).\n\n" + "\n".join(lines))
    write_section(DOC, TITLE, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
