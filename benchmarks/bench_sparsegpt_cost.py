"""What SparseGPT costs on a BERT-base-sized encoder: tool time and peak memory.

Model: `transformers.BertModel` with BERT-base's configuration (12 layers, hidden 768, 12 heads,
FFN 3072, vocabulary 30522; 109 M parameters), random weights (nothing downloaded), exported by
torch's legacy exporter (opset 17) with dynamic batch and sequence. Calibration: the 64
sentences of benchmarks/calibration_data.py, tokenized with MiniLM's uncased vocabulary (the
same 30522 tokens), 8 padded batches of 8. Each row is a fresh process running
`onnxprune MODEL --pattern 2:4 | --sparsity 0.5 --sparsity-method M --calib FILE --no-verify`,
timed from start to exit, its peak RSS read from getrusage. Random weights: no accuracy here
(docs/benchmarks.md has MiniLM's). Results: benchmarks/results/sparsegpt_cost.json and the
section "SparseGPT's cost" of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_sparsegpt_cost.py [--workdir /tmp/onnxprune-sparsegpt]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import calibration_data  # noqa: E402
import real_fidelity  # noqa: E402
from machine_info import machine, write_section  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "sparsegpt_cost.json"
TITLE = "## SparseGPT's cost"
_MEASURED = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def bert_base(workdir: Path) -> Path:
    import torch
    import transformers

    path = workdir / "bert_base.onnx"
    if path.exists():
        return path
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(transformers.BertConfig())

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    model = Tokens().eval()
    ids = torch.randint(0, 30522, (2, 16))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask")})
    return path


def calibration(workdir: Path) -> Path:
    tokenizer = real_fidelity.minilm_tokenizer()
    folder = workdir / "calib"
    folder.mkdir(exist_ok=True)
    sentences = list(calibration_data.SENTENCES)
    for i in range(0, len(sentences), 8):
        enc = tokenizer(sentences[i:i + 8], padding=True, return_tensors="np")
        np.savez(folder / f"batch{i // 8:02d}.npz", input_ids=enc["input_ids"].astype(np.int64),
                 attention_mask=enc["attention_mask"].astype(np.int64))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-sparsegpt"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, calib = bert_base(args.workdir), calibration(args.workdir)
    size_gb = model.stat().st_size / 1e9
    rows = []
    for label, flags in (("2:4", ["--pattern", "2:4"]), ("50% unstructured", ["--sparsity", "0.5"])):
        for method in ("magnitude", "sparsegpt"):
            cmd = [str(ROOT / ".venv" / "bin" / "onnxprune"), str(model), *flags, "--sparsity-method", method,
                   "--no-verify", "-q", "-o", str(args.workdir / "out.onnx")]
            if method != "magnitude":
                cmd += ["--calib", str(calib)]
            print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, "-c", _MEASURED, *cmd], capture_output=True, text=True, check=True)
            rc, seconds, rss_kb = out.stdout.split()
            rows.append({"pattern": label, "method": method, "exit": int(rc), "seconds": round(float(seconds), 1),
                         "peak_rss_gb": round(int(rss_kb) / 2**20, 2)})
            print(rows[-1], file=sys.stderr, flush=True)
    info = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": info, "model_gb": size_gb,
                                   "rows": rows}, indent=1))
    lines = ["| pattern | method | exit | tool s | peak RSS GB |", "|---|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {r['method']} | {r['exit']} | {r['seconds']} | {r['peak_rss_gb']} |" for r in rows]
    text = (f"{TITLE}\n\nMeasured {dt.date.today().isoformat()} on {info} by `benchmarks/bench_sparsegpt_cost.py`: "
            f"a BERT-base-sized encoder (random weights, 109 M parameters, {size_gb:.2f} GB file), every MatMul made "
            "sparse; SparseGPT calibrated on 64 sentences in 8 batches; `--no-verify`, each row a fresh process "
            "(wall clock to exit, peak RSS of the process).\n\n" + "\n".join(lines))
    write_section(DOC, TITLE, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
