"""Pruning decoders larger than memory: tool time and peak RSS beside the model's size.

Models: fixtures/llama_decoder.py presets, random weights in one external data file, nothing
downloaded: `1b` (TinyLlama-1.1B's shape, float32, 4.4 GB) and `7b` (Llama-2-7B's shape,
float16, 13.5 GB). Each is pruned by the CLI with `--heads 0.25 --neurons 0.25` at the model's
static sequence length (16):

  * `--weights disk`: the weights stay in their file and stream through, tensor by tensor;
  * `--weights memory` (1b only; 7b would need about three times its 13.5 GB): loaded, and
    verified in onnxruntime, for comparison. Both results must hold the same weights, compared
    tensor by tensor from the files.

Each run is a fresh process, timed from start to exit (wall clock), its peak RSS read from
getrusage. The page cache is dropped before each run where the machine allows it (as root), so
the weights are read from disk, and the table says whether it was. The pruned 1b model is then
run in onnxruntime once (a smoke check: finite logits of the right shape). Results go to
benchmarks/results/large_model.json and a section of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_large_model.py [--presets 1b,7b] [--workdir /tmp/onnxprune-large]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from machine_info import machine, write_section  # noqa: E402

from fixtures.llama_decoder import PRESETS, write_decoder  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "large_model.json"
TITLE = "## Models larger than memory"
FLAGS = ["--heads", "0.25", "--neurons", "0.25"]

# A fresh process runs the command and reports its child's peak RSS (KiB on Linux).
_MEASURED = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def drop_page_cache() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measured(cmd: list[str], log: Path) -> dict:
    cold = drop_page_cache()
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, "-c", _MEASURED, *cmd], stdout=subprocess.PIPE, stderr=err, text=True)
    rc, seconds, rss_kib = proc.stdout.split()[-3:]
    if int(rc):
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return {"seconds": round(float(seconds), 1), "peak_rss_bytes": int(rss_kib) * 1024, "cold_cache": cold}


def data_size(path: Path) -> int:
    return path.stat().st_size + path.with_name(path.name + ".data").stat().st_size


def same_weights(a: Path, b: Path) -> bool:
    """Every initializer of the two models equal, read one at a time from their files."""
    ma, mb = onnx.load(str(a), load_external_data=False), onnx.load(str(b), load_external_data=False)
    ta, tb = {t.name: t for t in ma.graph.initializer}, {t.name: t for t in mb.graph.initializer}
    if sorted(ta) != sorted(tb):
        return False
    for name, t in ta.items():
        x, y = (_read(t, a.parent), _read(tb[name], b.parent))
        if x.shape != y.shape or not np.array_equal(x, y):
            return False
    return True


def _read(tensor, base: Path) -> np.ndarray:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return np.fromfile(base / info["location"], dtype=dtype, count=count,
                       offset=int(info.get("offset", 0))).reshape(tuple(tensor.dims))


def smoke_run(path: Path) -> str:
    code = ("import numpy as np, onnxruntime as ort, sys; s = ort.InferenceSession(sys.argv[1]); "
            "y = s.run(None, {'input_ids': np.arange(16, dtype=np.int64).reshape(1, 16)})[0]; "
            "print(y.shape, bool(np.isfinite(y).all()))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else f"failed: {proc.stderr.strip().splitlines()[-1]}"


def run_preset(preset: str, work: Path) -> dict:
    config = PRESETS[preset]
    model = work / f"{preset}.onnx"
    row: dict = {"preset": preset, **config}
    if not model.exists() or not model.with_name(model.name + ".data").exists():
        print(f"[{preset}] generating {model}", file=sys.stderr)
        row["generated"] = write_decoder(model, **config, progress=False)
    row["model_bytes"] = data_size(model)
    row["params"] = sum(int(np.prod(t.dims, dtype=np.int64))
                        for t in onnx.load(str(model), load_external_data=False).graph.initializer)
    modes = ["disk", "memory"] if preset == "1b" else ["disk"]
    for mode in modes:
        out = work / f"{preset}.{mode}.onnx"
        report = work / f"{preset}.{mode}.json"
        print(f"[{preset}] --weights {mode}", file=sys.stderr)
        cmd = [sys.executable, "-m", "onnxprune", str(model), *FLAGS, "--weights", mode, "-o", str(out),
               "--report", str(report), "--quiet"]
        row[mode] = measured(cmd, work / f"{preset}.{mode}.log")
        rep = json.loads(report.read_text())
        row[mode].update({"params_after": rep["params"]["after"], "output_bytes": data_size(out),
                          "verification": rep["verification"]["onnxruntime"],
                          "groups_pruned": rep["summary"]["groups_pruned"]})
    if "memory" in modes:
        row["same_weights"] = same_weights(work / f"{preset}.disk.onnx", work / f"{preset}.memory.onnx")
        row["smoke_run"] = smoke_run(work / f"{preset}.disk.onnx")
    return row


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def render(rows: list[dict], meta: dict) -> str:
    lines = [f"{TITLE} ({meta['date']})", "",
             f"Machine: {meta['machine']}. `benchmarks/bench_large_model.py`: Llama-shaped decoders from "
             "fixtures/llama_decoder.py (random weights in one external data file; no RoPE, no kv cache), "
             f"pruned by the CLI with `{' '.join(FLAGS)}` at their static input [1, 16]. Wall time of the whole "
             "process and its peak RSS; the page cache was "
             f"{'dropped before each run (weights read from disk)' if meta['cold'] else 'not dropped'}.", "",
             *([meta["note"], ""] if meta.get("note") else []),
             "| model | params | size | --weights | time | peak RSS | RSS / size | params after | written | "
             "onnxruntime check |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for mode in ("disk", "memory"):
            if mode not in r:
                continue
            m = r[mode]
            lines.append(f"| {r['preset']} ({r['dtype']}, {r['layers']} layers, hidden {r['hidden']}) | "
                         f"{r['params'] / 1e9:.2f}B | {gb(r['model_bytes'])} | {mode} | {m['seconds']} s | "
                         f"{gb(m['peak_rss_bytes'])} | {m['peak_rss_bytes'] / r['model_bytes']:.2f} | "
                         f"{m['params_after'] / 1e9:.2f}B | {gb(m['output_bytes'])} | {m['verification']} |")
    lines.append("")
    for r in rows:
        if "same_weights" in r:
            lines.append(f"- {r['preset']}: the disk and memory runs wrote the same weights, tensor for tensor: "
                         f"{'yes' if r['same_weights'] else 'NO'}; the pruned model (disk run) in onnxruntime, "
                         f"logits shape and all finite: {r['smoke_run']}.")
    lines += ["- With `--weights disk` the onnx checker checks the graph (weights pointing into an empty file) "
              "and onnxruntime is not run: running the model needs its weights in memory. The `memory` row runs "
              "it (load, verify, 20 timed runs before and after), which is most of its time.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="1b,7b")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-large"))
    p.add_argument("--no-write", action="store_true", help="print the section, do not write docs/results")
    p.add_argument("--note", default="", help="a line on the conditions of the run, added to the section")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = [run_preset(preset, args.workdir) for preset in args.presets.split(",")]
    meta = {"date": dt.date.today().isoformat(), "machine": machine(), "cold": all(
        r[m]["cold_cache"] for r in rows for m in ("disk", "memory") if m in r),
        "seconds": round(time.time() - started), "note": args.note}
    text = render(rows, meta)
    print(text)
    if not args.no_write:
        RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        write_section(DOC, TITLE, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
