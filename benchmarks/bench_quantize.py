"""Quantization after pruning: file size, accuracy and onnxruntime latency of int8 models, pruned and not.

Table 1, the Fashion-MNIST CNN of benchmarks/fashion_mnist.py with its BatchNorms folded
(bench_sparsity.folded_cnn): the original; int8 alone (`filters=0.0, quantize="int8"`);
`--filters 0.5` with training-free recovery (`--recover refit`, the best of bench_finetune
--training-free, on the calibration images); the same run with `--quantize int8` (static QDQ,
calibrated on the same `--calib` images); fine-tuned one epoch as bench_finetune does, then int8,
where onnxruntime-training is installed (run with .venv-training/bin/python). Accuracy on the
10,000 test images; latency side by side at batch 1 and a larger batch.

Table 2, the ResNet-50-sized model of bench_resnet50 (fixtures.torch_models, BatchNorm folded) and
the BERT-base-sized encoder of bench_bert, random weights: original, int8, pruned and pruned+int8,
static int8 calibrated on a few random batches (BERT also dynamic), file sizes and latency side
by side. Results: benchmarks/results/quantize.json and the section "Quantization after pruning"
of docs/benchmarks.md.

The torch models are exported once into --workdir (torch needed; the training environment may
lack it), then every run reads the cached ONNX files:

    .venv/bin/python benchmarks/bench_quantize.py --models-only   # export ResNet-50, BERT; train the CNN
    .venv-training/bin/python benchmarks/bench_quantize.py        # all rows
    .venv/bin/python benchmarks/bench_quantize.py --no-write      # without the fine-tuned rows
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import fashion_mnist as fm  # noqa: E402
from bench_finetune import BATCH, CALIB_IMAGES, LR, WARMUP, WEIGHT_DECAY  # noqa: E402
from bench_sparsity import can_finetune, folded_cnn  # noqa: E402
from machine_info import machine, write_section  # noqa: E402
from onnxprune.passes.quantize import QUANTIZE_SAMPLES  # noqa: E402
from timing import side_by_side  # noqa: E402

from onnxprune import prune, save_model  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "quantize.json"
TITLE = "## Quantization after pruning"
CNN_FILTERS, CNN_RECOVER = 0.5, "refit"
RESNET_FILTERS = 0.3
BERT_PRUNE = {"heads": 0.25, "neurons": 0.25}  # bench_bert's first row
TRAIN_IMAGES, VAL_IMAGES = 55000, 5000  # as bench_finetune: the first 55,000 train, the last 5,000 validate
CNN_BATCHES = (1, 256)
NOT_RUN = "not run (needs onnxruntime-training)"
# onnxruntime's session option that turns u8s8 int8 products into u8u8 on x86 CPUs without VNNI
PRECISION = "session.x64quantprecision"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cached_models(workdir: Path, build: bool) -> tuple[Path, Path]:
    """The ResNet-50-sized and BERT-base-sized exports in `workdir`, exported with torch where
    missing and `build` (bench_resnet50's and bench_bert's builders); the CNN trained and cached."""
    resnet, bert = workdir / "resnet50.onnx", workdir / "bert.onnx"
    if not build:
        missing = [str(p) for p in (resnet, bert) if not p.exists()]
        if missing or not fm.cached_cnn_path().exists():
            raise SystemExit(f"not built yet: {', '.join(missing) or fm.cached_cnn_path()}; first run "
                             ".venv/bin/python benchmarks/bench_quantize.py --models-only (needs torch)")
        return resnet, bert
    fm.trained_cnn()
    if not resnet.exists():
        from fixtures.torch_models import export

        log("exporting the ResNet-50-sized model ...")
        export("resnet50", resnet.with_suffix(".tmp.onnx"), fold_bn=True)
        os.replace(resnet.with_suffix(".tmp.onnx"), resnet)
    if not bert.exists():
        import bench_bert

        log("exporting the BERT-base-sized encoder ...")
        bench_bert.export(bert.with_suffix(".tmp.onnx"))
        os.replace(bert.with_suffix(".tmp.onnx"), bert)
    return resnet, bert


def random_feeds(model: Path, samples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Standard-normal inputs at the model's static shape with `samples` on axis 0; an attention
    mask all ones."""
    feeds = {}
    for value in onnx.load(str(model), load_external_data=False).graph.input:
        shape = [samples] + [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
        feeds[value.name] = (np.ones(shape, np.float32) if "mask" in value.name
                             else rng.standard_normal(shape).astype(np.float32))
    return feeds


def session_accuracy(model: Path, images: np.ndarray, labels: np.ndarray, optimize: bool = True,
                     config: dict | None = None, batch: int = 500) -> float:
    """Test accuracy in a session with the given options (fm.accuracy takes none). With
    `optimize=False` a QDQ model runs each DequantizeLinear and float op as written instead of
    the fused int8 kernels: what the quantized model computes in exact arithmetic."""
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    hits = sum(int((session.run(None, {"images": images[s:s + batch]})[0].argmax(1) == labels[s:s + batch]).sum())
               for s in range(0, len(images), batch))
    return hits / len(images)


def int8_flags() -> str:
    """The CPU's int8 dot-product extensions (onnxruntime's u8s8 kernels saturate without them)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags.split()]
    return ", ".join(found) or "none of avx2/avx512/vnni/amx"


def run_prune(model: Path, out: Path, **options) -> dict:
    """One prune() run, its result saved to `out`: wall seconds and the report parts the tables use."""
    began = time.perf_counter()
    result = prune(str(model), latency_runs=0, **options)
    seconds = time.perf_counter() - began
    save_model(result.model, out)
    report = result.report
    return {"path": out, "bytes": out.stat().st_size, "seconds": round(seconds, 1), "params": report["params"],
            "macs": report["macs"], "verification": report.get("verification"),
            "quantization": report.get("quantization"), "finetune": report.get("finetune"),
            "notes": report.get("notes", [])}


def same_pruned(a: dict, b: dict) -> bool:
    """Whether two runs pruned to the same float model: same params and the same verification
    difference on the same inputs (the int8 run verifies its float model before quantizing)."""
    va, vb = a.get("verification") or {}, b.get("verification") or {}
    return a["params"] == b["params"] and va.get("max_abs_diff") == vb.get("max_abs_diff")


def cnn_table(workdir: Path, threads: int, runs: int, finetune: bool) -> dict:
    model = folded_cnn(workdir)
    images, labels = fm.load("train")
    test = fm.load("t10k")
    calib, train, val = workdir / "cnn_calib.npz", workdir / "cnn_train.npz", workdir / "cnn_val.npz"
    np.savez(calib, images=images[:CALIB_IMAGES])  # bench_finetune --training-free's calibration images
    common = {"calib": str(calib)}
    specs = [("original + int8", "int8", dict(filters=0.0, quantize="int8")),
             (f"--filters {CNN_FILTERS}, --recover {CNN_RECOVER}", "pruned",
              dict(filters=CNN_FILTERS, recover=CNN_RECOVER)),
             (f"--filters {CNN_FILTERS}, --recover {CNN_RECOVER}, int8", "pruned_int8",
              dict(filters=CNN_FILTERS, recover=CNN_RECOVER, quantize="int8")),
             (f"--filters {CNN_FILTERS}, --recover {CNN_RECOVER}, int8 --quant-reduce-range", "pruned_int8_7bit",
              dict(filters=CNN_FILTERS, recover=CNN_RECOVER, quantize="int8", quant_reduce_range=True))]
    tuning = dict(filters=CNN_FILTERS, finetune=str(train), val=str(val), epochs=1, batch_size=BATCH, lr=LR,
                  weight_decay=WEIGHT_DECAY, warmup=WARMUP)
    tuned_specs = [(f"--filters {CNN_FILTERS}, fine-tuned 1 epoch", "tuned", tuning),
                   (f"--filters {CNN_FILTERS}, fine-tuned 1 epoch, int8", "tuned_int8", dict(tuning, quantize="int8")),
                   (f"--filters {CNN_FILTERS}, fine-tuned 1 epoch, int8 --quant-reduce-range", "tuned_int8_7bit",
                    dict(tuning, quantize="int8", quant_reduce_range=True))]
    if finetune:
        np.savez(train, images=images[:TRAIN_IMAGES], labels=labels[:TRAIN_IMAGES])
        np.savez(val, images=images[TRAIN_IMAGES:TRAIN_IMAGES + VAL_IMAGES],
                 labels=labels[TRAIN_IMAGES:TRAIN_IMAGES + VAL_IMAGES])
        specs += tuned_specs
    del images, labels
    rows = {"original": {"label": "original", "path": model, "bytes": model.stat().st_size}}
    log(f"CNN original: {rows['original']['bytes']} bytes")
    for label, key, options in specs:
        log(f"CNN {label} ...")
        rows[key] = {"label": label, **run_prune(model, workdir / f"cnn_{key}.onnx", **common, **options)}
        log(f"  {rows[key]['seconds']} s, {rows[key]['bytes']} bytes")
    for key, row in rows.items():
        row["accuracy"] = fm.accuracy(row["path"], *test)
        if "int8" in key:
            row["accuracy_qdq_in_float"] = session_accuracy(row["path"], *test, optimize=False)
            row["accuracy_u8u8"] = session_accuracy(row["path"], *test, config={PRECISION: "1"})
        row["size_ratio"] = round(rows["original"]["bytes"] / row["bytes"], 2)
    paths = {k: r["path"] for k, r in rows.items()}
    paths.update({f"{k} u8u8": (r["path"], {PRECISION: "1"}) for k, r in rows.items() if "int8" in k})
    for batch in CNN_BATCHES:
        log(f"CNN latency at batch {batch} ...")
        latency = side_by_side(paths, {"images": test[0][:batch]}, runs if batch == 1 else max(runs // 5, 5), threads)
        for k, ms in latency.items():
            key, field = (k[:-5], "latency_ms_u8u8") if k.endswith(" u8u8") else (k, "latency_ms")
            rows[key].setdefault(field, {})[str(batch)] = ms
    for row in rows.values():
        log(f"  {row['label']}: accuracy {row['accuracy']:.4f} ({row.get('accuracy_u8u8')} u8u8), "
            f"{row['bytes']} bytes, {row['latency_ms']} ms ({row.get('latency_ms_u8u8')} u8u8)")
    if not finetune:
        for label, key, _ in tuned_specs:
            rows[key] = {"label": label, "not_run": NOT_RUN}
    consistent = {"pruned": same_pruned(rows["pruned"], rows["pruned_int8"])}
    if finetune:
        consistent["tuned"] = same_pruned(rows["tuned"], rows["tuned_int8"])
    return {"rows": rows, "calib_images": CALIB_IMAGES, "quantize_samples": min(QUANTIZE_SAMPLES, CALIB_IMAGES),
            "same_float_model": consistent, "batches": list(CNN_BATCHES), "finetuned": finetune}


def large_table(name: str, model: Path, workdir: Path, feeds: dict, calib: dict, prune_options: dict,
                threads: int, runs: int, dynamic: bool) -> dict:
    """Original, int8, pruned, pruned+int8 of one random-weight model (static int8 on `calib`;
    with `dynamic`, also dynamic int8 rows)."""
    calib_path = workdir / f"{name}_calib.npz"
    np.savez(calib_path, **calib)
    # The float run gets --calib too (nothing in it uses the data but verification, whose inputs are then the
    # int8 run's), so the two runs' verification tells whether they pruned to the same float model.
    data = {"calib": str(calib_path)}
    static = dict(quantize="int8", quant_mode="static", **data)
    specs = [("original + int8 (static)", "int8", dict(filters=0.0, **static)),
             ("pruned", "pruned", dict(prune_options, **data)),
             ("pruned + int8 (static)", "pruned_int8", dict(prune_options, **static))]
    if dynamic:
        dynamic_int8 = dict(quantize="int8", quant_mode="dynamic")
        specs[1:1] = [("original + int8 (dynamic)", "int8_dynamic", dict(filters=0.0, **dynamic_int8))]
        specs.append(("pruned + int8 (dynamic)", "pruned_int8_dynamic", dict(prune_options, **dynamic_int8)))
    rows = {"original": {"label": "original", "path": model, "bytes": model.stat().st_size}}
    for label, key, options in specs:
        log(f"{name} {label} ...")
        rows[key] = {"label": label, **run_prune(model, workdir / f"{name}_{key}.onnx", **options)}
        log(f"  {rows[key]['seconds']} s, {rows[key]['bytes']} bytes")
    log(f"{name} latency ...")
    latency = side_by_side({k: r["path"] for k, r in rows.items()}, feeds, runs, threads)
    for k, row in rows.items():
        row["latency_ms"] = latency[k]
        row["size_ratio"] = round(rows["original"]["bytes"] / row["bytes"], 2)
        log(f"  {row['label']}: {row['bytes']} bytes, {latency[k]} ms")
    return {"rows": rows, "calib_samples": len(next(iter(calib.values()))),
            "same_float_model": same_pruned(rows["pruned"], rows["pruned_int8"]),
            "shapes": {k: list(v.shape) for k, v in feeds.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnxprune-quant-bench"))
    parser.add_argument("--models-only", action="store_true", help="export the torch models into --workdir, stop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=100, help="latency runs per model at batch 1 (CNN)")
    parser.add_argument("--large-runs", type=int, default=30, help="latency runs per model, ResNet-50 and BERT")
    parser.add_argument("--calib-batches", type=int, default=8, help="random calibration samples, ResNet-50/BERT")
    parser.add_argument("--skip-large", action="store_true", help="only the CNN table (checks the script)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--render", type=Path, nargs="?", const=RESULTS, metavar="JSON",
                        help="rewrite the doc section from saved results (default: benchmarks/results/quantize.json)")
    args = parser.parse_args()
    if args.render:
        text = section(json.loads(args.render.read_text()))
        print(text)
        if not args.no_write:
            write_section(DOC, TITLE, text)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    resnet, bert = cached_models(args.workdir, build=args.models_only)
    if args.models_only:
        return 0
    began = time.perf_counter()
    finetune = can_finetune()
    log(f"onnxruntime {ort.__version__}, fine-tuning {'available' if finetune else 'not available'}")
    results = {"date": dt.date.today().isoformat(), "machine": machine(), "python": platform.python_version(),
               "onnxruntime": ort.__version__, "cpu_flags": int8_flags(), "threads": args.threads, "command": command(),
               "runs": args.runs, "large_runs": args.large_runs,
               "cnn": cnn_table(args.workdir, args.threads, args.runs, finetune)}
    if not args.skip_large:
        rng = np.random.default_rng(0)
        n = args.calib_batches
        results["resnet50"] = large_table("resnet50", resnet, args.workdir, random_feeds(resnet, 1, rng),
                                          random_feeds(resnet, n, rng), {"filters": RESNET_FILTERS}, args.threads,
                                          args.large_runs, dynamic=False)
        results["bert"] = large_table("bert", bert, args.workdir, random_feeds(bert, 1, rng),
                                      random_feeds(bert, n, rng), BERT_PRUNE, args.threads, args.large_runs,
                                      dynamic=True)
    results["wall_s"] = round(time.perf_counter() - began, 1)
    text = section(results)
    print(text)
    (args.workdir / "quantize.json").write_text(json.dumps(results, indent=1, default=str) + "\n")  # for --render
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1, default=str) + "\n")
        write_section(DOC, TITLE, text)
    return 0


def command() -> str:
    python = Path(sys.executable)
    shown = os.path.relpath(python, ROOT) if python.is_relative_to(ROOT) else str(python)
    return " ".join([shown, "benchmarks/bench_quantize.py", *sys.argv[1:]])


def _points(a: float, b: float) -> float:
    return round(100 * (a - b), 2)


def cnn_section(cnn: dict, runs: int, cpu_flags: str) -> list[str]:
    rows = cnn["rows"]
    original = rows["original"]
    batches = cnn["batches"]
    lines = ["### Fashion-MNIST CNN", "",
             "The CNN of benchmarks/fashion_mnist.py (trained here, 2 epochs) with its BatchNorms folded into the "
             f"convolutions (bench_sparsity.folded_cnn), {rows['int8']['params']['before']:,} params. int8: "
             "`--quantize int8` in the same `prune()` run as the pruning, static QDQ, int8 weights per output "
             "channel and int8 activations, MinMax ranges over the first "
             f"{cnn['quantize_samples']} of the {cnn['calib_images']:,} `--calib` images (the first "
             f"{cnn['calib_images']:,} training images, as bench_finetune --training-free); int8 alone is "
             "`filters=0.0, quantize=\"int8\"`. Pruned: `--filters 0.5` (l2) with `--recover refit` on the same "
             "`--calib` images, the best training-free recovery of bench_finetune --training-free. Fine-tuned: "
             f"`--filters 0.5`, then one epoch on the first {TRAIN_IMAGES:,} training images as bench_finetune "
             f"(batch {BATCH}, AdamW lr {LR:g}, weight decay {WEIGHT_DECAY:g}, warm-up {WARMUP:g} then cosine, "
             f"`--unfold-bn` default, the best of before/after on {VAL_IMAGES:,} validation images kept), "
             "`--calib` given to both rows (the int8 one calibrates on it). Test accuracy on the 10,000 test "
             "images; KiB: size of the ONNX "
             "file (bytes in the results JSON); latency: median per model, all models' sessions alternating in "
             "blocks in one process, "
             f"{runs} runs at batch 1 (input [1,1,28,28]) and {max(runs // 5, 5)} at batch {batches[-1]} "
             f"([{batches[-1]},1,28,28]); tool s: the whole `prune()` call. \"QDQ in float\": the same int8 "
             "file with onnxruntime's graph optimizations off, so each DequantizeLinear and float op runs as "
             "written instead of the fused int8 kernels: what the quantized model computes in exact arithmetic. "
             f"\"u8u8\": the same file with onnxruntime's session option `{PRECISION}=1`, which has its x86 "
             "int8 kernels multiply u8 by u8 instead of u8 by s8 on CPUs without VNNI.", "",
             "| model | test accuracy | QDQ in float | u8u8 | KiB | vs original | "
             + " | ".join(f"ms, batch {b}" for b in batches) + " | tool s |",
             "|---|---|---|---|---|---|" + "---|" * len(batches) + "---|"]
    for row in rows.values():
        if "not_run" in row:
            lines.append(f"| {row['label']} | {row['not_run']} |" + " |" * (5 + len(batches)))
            continue
        latency = " | ".join(f"{row['latency_ms'][str(b)]:.3f}" for b in batches)
        exact, u8u8 = (f"{row[k]:.4f}" if k in row else "-" for k in ("accuracy_qdq_in_float", "accuracy_u8u8"))
        lines.append(f"| {row['label']} | {row['accuracy']:.4f} | {exact} | {u8u8} | {row['bytes'] / 1024:.1f} | "
                     f"{row['size_ratio']:.2f}x | {latency} | {row.get('seconds', '-')} |")
    checks = []
    for key in ("pruned", "tuned"):
        f, q, q7 = rows[key], rows[f"{key}_int8"], rows[f"{key}_int8_7bit"]
        if "accuracy" in q:
            checks.append({"name": "refit" if key == "pruned" else "fine-tuned", "ratio": q["size_ratio"],
                           "float": f["accuracy"], "int8": q["accuracy"], "exact": q["accuracy_qdq_in_float"],
                           "u8u8": q["accuracy_u8u8"], "7bit": q7["accuracy"]})
    size_met = all(c["ratio"] >= 10 for c in checks)

    def verdict(field: str, what: str) -> str:
        costs = [_points(c["float"], c[field]) for c in checks]
        ok = size_met and all(cost < 1 for cost in costs)
        return (f"{what}: **{'met' if ok else 'not met'}** ("
                + "; ".join(f"{c['name']} {c[field]:.4f} against {c['float']:.4f} float, {cost:.2f} points lost"
                            for c, cost in zip(checks, costs)) + ")")

    lines += ["", "Expectation (issue 15): pruned + int8 at least 10x smaller than the original, for under a point "
              "more accuracy loss than the pruned model alone. Size: "
              + ", ".join(f"{c['ratio']:.2f}x ({c['name']})" for c in checks)
              + f" smaller, {'met' if size_met else 'not met'}. Accuracy and size together: "
              + "; ".join([verdict("int8", "with onnxruntime's default int8 kernels on this CPU"),
                           verdict("7bit", "7-bit weights (`--quant-reduce-range`, set by `--target cpu`), default "
                                   "kernels"),
                           verdict("exact", "the 8-bit files computed exactly"),
                           verdict("u8u8", f"with `{PRECISION}=1`")])
              + f". int8 alone: {rows['int8']['size_ratio']:.2f}x smaller, {rows['int8']['accuracy']:.4f} against "
              f"{original['accuracy']:.4f}."]
    gaps = [(row["label"], _points(row["accuracy_qdq_in_float"], row["accuracy"])) for row in rows.values()
            if "accuracy_qdq_in_float" in row]
    if any(abs(points) >= 1 for _, points in gaps):
        vnni = "vnni" in cpu_flags
        lines += ["", "onnxruntime's default int8 kernels against the same file computed exactly: "
                  + ", ".join(f"{label} {-points:+.2f} points" for label, points in gaps)
                  + f". This CPU has {cpu_flags}{'' if vnni else ' and no VNNI'}: onnxruntime's x86 u8s8 int8 "
                  "products can saturate on such CPUs, and the u8u8 column, equal to the exact one here, shows "
                  "that this is the loss. The tool's report runs the quantized model both ways and notes the "
                  "difference; `--quant-reduce-range` (set by `--target cpu`) quantizes the weights to 7 bits, "
                  "which these kernels compute exactly (the rows marked so). "
                  f"Latency with `{PRECISION}=1`, in the same side-by-side runs: "
                  + "; ".join(f"{row['label']} " + " / ".join(f"{row['latency_ms_u8u8'][str(b)]:.3f}" for b in batches)
                              + " ms" for row in rows.values() if "latency_ms_u8u8" in row)
                  + f" (batch {' / '.join(str(b) for b in batches)})."]
    same = cnn["same_float_model"]
    lines += ["", "The float and int8 rows of each pair come from two `prune()` runs with the same options but "
              "`quantize`; the float model inside the int8 run is the float row's (same params and same "
              "verification difference): " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items())
              + "."]
    for batch in batches:
        lines[-1] += " " + speed_text(rows, [("original", "int8"), ("pruned", "pruned_int8"), ("tuned", "tuned_int8")],
                                      str(batch))
    return lines


def speed_text(rows: dict, pairs: list[tuple[str, str]], batch: str | None = None, what: str = "") -> str:
    """How int8 compares with its float model in latency, pair by pair."""
    parts, slower = [], 0
    for float_key, int8_key in pairs:
        if "latency_ms" not in rows.get(int8_key, {}):
            continue
        a, b = rows[float_key]["latency_ms"], rows[int8_key]["latency_ms"]
        a, b = (a[batch], b[batch]) if batch else (a, b)
        parts.append(f"{rows[int8_key]['label']} runs at {a / b:.2f}x the speed of {rows[float_key]['label']}")
        slower += a < b
    where = f" at batch {batch}" if batch else ""
    return (f"{what + ' latency' if what else 'Latency'}{where}: " + "; ".join(parts) + "."
            + (f" int8 is slower than its float model in {slower} of these {len(parts)} pairs on this CPU "
               "(onnxruntime's int8 kernels pay off with VNNI/AMX or on GPUs, as the tool's note says)."
               if slower else ""))


def large_section(results: dict, runs: int) -> list[str]:
    resnet, bert = results["resnet50"], results["bert"]
    lines = ["### ResNet-50-sized and BERT-base-sized models (random weights)", "",
             "ResNet-50: bench_resnet50's model (fixtures.torch_models `resnet50`, torch layout, BatchNorm folded "
             f"at export), input {resnet['shapes']['input']}, pruned `--filters {RESNET_FILTERS}` (l2). BERT: "
             "bench_bert's encoder (12 post-LN layers, hidden 768, 12 heads, FFN 3072), inputs "
             + ", ".join(f"{k} {v}" for k, v in bert["shapes"].items()) + ", pruned `"
             + " ".join(f"--{k} {v}" for k, v in BERT_PRUNE.items()) + "` (bench_bert's first row). Static int8: "
             f"QDQ as above, calibrated on {resnet['calib_samples']} random standard-normal samples (batch 1 each, "
             "attention mask all ones): enough for a size and latency table, not for accuracy, and these weights "
             "are random anyway; `--quant-mode static` is given, since the default (`auto`) quantizes a model "
             "without convolutions, like this BERT, dynamically. Dynamic int8 (BERT only): `--quant-mode dynamic` "
             "without `--calib`, weights int8, activations quantized at run time. Latency: median of "
             f"{runs} runs per model, the sessions of one model's rows alternating in blocks in one process, "
             f"{results['threads']} threads; MB: ONNX file size, 10^6 bytes. Output cosine: the tool's report, on its "
             "verification input (the "
             "first calibration sample; for rows without `--calib`, random inputs), against the original.", "",
             "| model | variant | params | MB | vs original | ms | speedup | output cosine | tool s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, table in (("ResNet-50", resnet), ("BERT-base", bert)):
        rows = table["rows"]
        for key, row in rows.items():
            quant = row.get("quantization") or {}
            fidelity = (quant.get("fidelity") or {}).get("quantized") or {}
            if key == "pruned":
                fidelity = ((rows["pruned_int8"].get("quantization") or {}).get("fidelity") or {}).get("pruned") or {}
            params = rows["pruned" if "pruned" in key else "int8"]["params"]["after" if "pruned" in key else "before"]
            cosine = f"{fidelity['cosine']:.4f}" if fidelity.get("cosine") is not None else "-"
            lines.append(f"| {name} | {row['label']} | {params / 1e6:.2f} M | {row['bytes'] / 1e6:.1f} | "
                         f"{row['size_ratio']:.2f}x | {row['latency_ms']:.1f} | "
                         f"{rows['original']['latency_ms'] / row['latency_ms']:.2f}x | {cosine} | "
                         f"{row.get('seconds', '-')} |")
    pairs = [("original", "int8"), ("pruned", "pruned_int8"), ("original", "int8_dynamic"),
             ("pruned", "pruned_int8_dynamic")]
    lines += ["", speed_text(resnet["rows"], pairs, what="ResNet-50"), "", speed_text(bert["rows"], pairs, what="BERT"),
              "", "For reference, the issue's figure in kind (another machine): ResNet-50 at 30% filters, 102 -> 45 MB "
              "and 22 -> 9 ms. The float model inside each pruned int8 run is the pruned row's: ResNet-50 "
              f"{'yes' if resnet['same_float_model'] else 'NO'}, BERT {'yes' if bert['same_float_model'] else 'NO'}."]
    return lines


def section(results: dict) -> str:
    cnn = results["cnn"]
    lines = [f"{TITLE} ({results['date']})", "",
             f"Machine: {results['machine']} (CPU flags: {results['cpu_flags']}), Python {results['python']}, "
             f"onnxruntime {results['onnxruntime']}"
             f"{' (onnxruntime-training)' if cnn['finetuned'] else ''}, {results['threads']} threads. Command: "
             f"`{results['command']}` (after `.venv/bin/python benchmarks/bench_quantize.py --models-only` exported "
             "the torch models); results in `benchmarks/results/quantize.json`; the whole run took "
             f"{results['wall_s'] / 60:.1f} min. The machine is shared: latencies vary between runs.", ""]
    lines += cnn_section(cnn, results["runs"], results["cpu_flags"])
    if "resnet50" in results:
        lines += [""] + large_section(results, results["large_runs"])
    notes = sorted({n for table in ("cnn", "resnet50", "bert") if table in results
                    for row in results[table]["rows"].values() for n in row.get("notes", []) if "quantize" in n})
    if notes:
        lines += ["", "The tool's quantization notes: " + "; ".join(f"'{n}'" for n in notes) + "."]
    wrapped = [line if line.startswith(("|", "#")) or not line
               else textwrap.fill(line, 120, break_long_words=False, break_on_hyphens=False) for line in lines]
    return "\n".join(wrapped) + "\n"


if __name__ == "__main__":
    sys.exit(main())
