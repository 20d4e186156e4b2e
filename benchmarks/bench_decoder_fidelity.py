"""Fidelity of a trained Llama-shaped byte-level decoder pruned by 25%: heads, MLP neurons, layers.

The model is benchmarks/train_tiny_decoder.py's: hidden 256, 4 decoder layers, 8 query heads on
4 key/value heads (GQA), SwiGLU MLP 688, RMSNorm, RoPE, untied embeddings, vocabulary 256 (bytes),
trained on CPython's pydoc topics and exported by torch's dynamo exporter (input_ids and
attention_mask [batch, sequence] dynamic, logits out, no kv cache). It is trained first if
its cache folder does not hold it.

Data (train_tiny_decoder.splits()): calibration is the calibration split only, cut into
non-overlapping windows of 128 bytes (attention mask all ones) and written as one .npz;
evaluation is the held-out split, cut the same way. Nothing is chosen on the held-out split.

Rows, each one onnxprune.prune() call on the exported model (the CLI equivalent is recorded):
- heads 25% (`heads=0.25`: one of the 4 kv groups per layer goes, with its 2 query heads) and
  MLP neurons 25% (`neurons=0.25`: 172 of 688 per layer, gate/up rows and down columns), each
  with the data-free l2 criterion and with the calibration criteria act, wanda and recon, and
  with the training-free recoveries bias, lsq and refit; where this onnxprune has `hidden`
  (`--hidden`: the residual width, through RMSNorm), hidden 25% (256 -> 192) the same ways;
- layers: the tool's residual blocks are sublayers (4 decoder layers = 8 blocks: attention and
  MLP), so `layers=1` removes one sublayer (the brief's "one of 4 layers" is not what the
  option does); `layers=2` removes 2 of 8 blocks (25%), with `layer_importance` magnitude and
  influence (ShortGPT's 1 - cos on the calibration tokens), and one whole decoder layer by
  `drop_layers` (its attention and MLP Add), the layer chosen here by ShortGPT's block
  influence of the whole decoder layer measured on the calibration tokens;
- with --finetune (run by .venv-training/bin/python, onnxruntime-training): the best
  training-free row of each structure, chosen by calibration-split cross-entropy, followed by
  a short distillation from the original (`loss='kd'`, `kd_alpha=1.0`, next-byte labels given
  so that the tool takes the class axis as the last one) on windows of the train split.

Metrics on the held-out split (positions 1.. of each window): next-byte cross-entropy (nats)
and perplexity, top-1 agreement with the original model's next-byte prediction, top-1
accuracy; on the calibration split the cross-entropy too (a check for overfitting). Params
and MACs from the tool's report (MACs at input_ids/attention_mask [1, 128] via input_shapes,
except for the influence rows: with calibration data that option fails there, so they run at
the tool's default dims), and MACs measured here at [1, 128] from the shapes onnxruntime gives
every MatMul (`macs_measured`: the tool's count leaves out most of the lm_head, whose output is
the graph output). Seconds: the prune() call (verification included, latency timing off).

onnxruntime sessions (the tool's too) are made with one intra-op thread here: the tool offers
no thread setting, so this script gives `onnxruntime.SessionOptions` that default.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_decoder_fidelity.py
    OMP_NUM_THREADS=1 nice -n 10 .venv-training/bin/python benchmarks/bench_decoder_fidelity.py --finetune

Writes benchmarks/results/decoder_fidelity.json (the --finetune run adds its rows to it).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime as dt  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_tiny_decoder as tiny  # noqa: E402
from machine_info import machine  # noqa: E402

from onnxprune import PruneOptions, VerificationError, prune  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "decoder_fidelity.json"
SHAPES = {"input_ids": [1, tiny.SEQ], "attention_mask": [1, tiny.SEQ]}  # where the tool counts MACs
CALIB_NPZ = tiny.CACHE / "calibration.npz"
TRAIN_NPZ = tiny.CACHE / "distill_train.npz"
TRAIN_NOLABEL_NPZ = tiny.CACHE / "distill_train_no_labels.npz"
EVAL_BATCH = 32

CHANNEL_METHODS = [  # (label, importance, recover)
    ("l2", "l2", ()),
    ("l2 + lsq", "l2", ("lsq",)),
    ("act", "act", ()),
    ("wanda", "wanda", ()),
    ("recon", "recon", ()),
    ("act + lsq", "act", ("lsq",)),
    ("recon + bias", "recon", ("bias",)),
    ("recon + lsq", "recon", ("lsq",)),
    ("recon + refit", "recon", ("refit",)),
]
STRUCTURES = {"heads 25%": {"heads": 0.25}, "neurons 25%": {"neurons": 0.25}}
if "hidden" in {f.name for f in dataclasses.fields(PruneOptions)}:  # `--hidden`, where this onnxprune has it
    STRUCTURES["hidden 25%"] = {"hidden": 0.25}
# Fine-tuning (distillation): steps of FT_BATCH windows of the train split, fixed a priori.
FT_STEPS, FT_BATCH, FT_LR = 150, 16, 5e-4


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


class _OneThread(ort.SessionOptions):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.intra_op_num_threads = 1
        self.inter_op_num_threads = 1


ort.SessionOptions = _OneThread  # the tool's sessions too (it makes them by ort.SessionOptions())


def session(model) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, ort.SessionOptions(), providers=["CPUExecutionProvider"])


# ---- data and metrics -------------------------------------------------------------------------

def feeds(windows: np.ndarray) -> dict:
    return {"input_ids": windows, "attention_mask": np.ones_like(windows)}


def write_npz(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def evaluate(model, windows: np.ndarray) -> dict:
    """Cross-entropy sum/count and the next-byte argmax at positions 0..S-2 of every window."""
    sess = session(model)
    total, count, preds = 0.0, 0, []
    for i in range(0, len(windows), EVAL_BATCH):
        ids = windows[i:i + EVAL_BATCH]
        logits = sess.run(["logits"], feeds(ids))[0]
        s, n = tiny.cross_entropy(logits, ids)
        total, count = total + s, count + n
        preds.append(logits[:, :-1].argmax(-1).astype(np.uint8))
    preds = np.concatenate(preds)
    return {"ce": total / count, "tokens": count, "preds": preds,
            "top1_acc": float((preds == windows[:, 1:]).mean())}


def measured_macs(model: onnx.ModelProto, seq: int = tiny.SEQ) -> int:
    """MatMul/Gemm multiply-accumulates at input_ids/attention_mask [1, seq], from the shapes the
    tensors actually have when onnxruntime runs the model (every MatMul's input and output made a
    graph output): a count that needs no shape inference, next to the tool's."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    nodes = [n for n in probe.graph.node if n.op_type in ("MatMul", "Gemm")]
    have = {o.name for o in probe.graph.output}
    names = list(dict.fromkeys(t for n in nodes for t in (n.input[0], n.output[0]) if t not in have))
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names)
    sess = session(probe)
    ids = np.zeros((1, seq), np.int64)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds(ids))))
    return int(sum(math.prod(values[n.output[0]].shape) * values[n.input[0]].shape[-1] for n in nodes))


class Bench:
    def __init__(self, model_path: Path, meta: dict) -> None:
        self.path, self.meta = model_path, meta
        parts = tiny.splits()
        self.split_info = parts["info"]
        self.held = tiny.windows(parts["heldout"])
        self.calib = tiny.windows(parts["calibration"])
        self.train_bytes = parts["train"]
        write_npz(CALIB_NPZ, feeds(self.calib))
        self.model = onnx.load(str(model_path))
        started = time.perf_counter()
        self.ref = evaluate(self.model, self.held)
        self.ref_calib = evaluate(self.model, self.calib)
        self.macs = measured_macs(self.model)
        log(f"original: held-out CE {self.ref['ce']:.4f} (ppl {math.exp(self.ref['ce']):.3f}), top-1 acc "
            f"{self.ref['top1_acc']:.4f}; calibration CE {self.ref_calib['ce']:.4f}; "
            f"{time.perf_counter() - started:.1f}s")

    def original(self) -> dict:
        return {"heldout_ce": self.ref["ce"], "heldout_ppl": math.exp(self.ref["ce"]),
                "heldout_top1_acc": self.ref["top1_acc"], "calibration_ce": self.ref_calib["ce"],
                "heldout_windows": int(len(self.held)), "heldout_tokens_scored": self.ref["tokens"],
                "calibration_windows": int(len(self.calib)), "calibration_tokens": int(self.calib.size),
                "macs_measured": self.macs}

    def row(self, structure: str, label: str, options: dict, cli: str) -> dict:
        row = {"structure": structure, "method": label,
               "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
                           if k not in ("calib", "finetune")},
               "calibrated": "calib" in options, "cli": cli}
        log(f"  {structure:12s} {label} ...")
        started = time.perf_counter()
        try:
            # --layer-importance influence with --calib fails under --input-shape (see the report):
            # those rows run without it, so the tool counts their MACs at its default dims
            shapes = {} if options.get("layer_importance") == "influence" else SHAPES
            row["input_shapes"] = shapes or "tool defaults"
            result = prune(str(self.path), input_shapes=shapes, latency_runs=0, **options)
        except VerificationError as exc:
            result = exc.result
            row["error"] = f"VerificationError: {exc}"
        except Exception as exc:  # a tool failure is a finding: record it, go on
            row["seconds"] = round(time.perf_counter() - started, 2)
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=-6)
            log(f"    failed: {row['error']}")
            return row
        row["seconds"] = round(time.perf_counter() - started, 2)
        report = result.report
        row.update(
            params_before=report["params"]["before"], params_after=report["params"]["after"],
            params_kept=report["params"]["after"] / report["params"]["before"],
            macs_before=report["macs"]["before"], macs_after=report["macs"]["after"],
            macs_kept=report["macs"]["after"] / report["macs"]["before"],
            groups={f"{g['kind']} {g['channels_before']}->{g['channels_after']}": 0 for g in report["groups"]
                    if g["channels_after"] < g["channels_before"]},
            verification={k: report["verification"].get(k) for k in ("checker", "onnxruntime", "max_abs_diff",
                                                                      "max_rel_diff", "max_abs_output")},
            notes=list(report.get("notes", [])), recovery=report.get("recovery"),
            rolled_back=report.get("rolled_back", []), layers=report.get("layers"),
            training=report.get("training") or report.get("finetune"))
        for g in report["groups"]:
            if g["channels_after"] < g["channels_before"]:
                row["groups"][f"{g['kind']} {g['channels_before']}->{g['channels_after']}"] += 1
        if result.model is None:
            row.setdefault("error", "no model")
            return row
        row["macs_measured"] = measured_macs(result.model)
        row["macs_measured_kept"] = row["macs_measured"] / self.macs
        held = evaluate(result.model, self.held)
        calib = evaluate(result.model, self.calib)
        row.update(heldout_ce=held["ce"], heldout_ppl=math.exp(held["ce"]), heldout_top1_acc=held["top1_acc"],
                   heldout_top1_agreement=float((held["preds"] == self.ref["preds"]).mean()),
                   calibration_ce=calib["ce"],
                   calibration_top1_agreement=float((calib["preds"] == self.ref_calib["preds"]).mean()))
        log(f"    params {row['params_kept']:.3f} MACs {row['macs_kept']:.3f} "
            f"(measured {row['macs_measured_kept']:.3f}) held-out CE {row['heldout_ce']:.4f} "
            f"(orig {self.ref['ce']:.4f}) agree {row['heldout_top1_agreement']:.4f} calib CE "
            f"{row['calibration_ce']:.4f} {row['seconds']:.1f}s"
            + (f"; rolled back {len(row['rolled_back'])}" if row["rolled_back"] else "")
            + (f"; {row['error']}" if "error" in row else ""))
        return row

    # -- layers ----------------------------------------------------------------------------------
    def block_adds(self) -> list[str]:
        """The tool's residual-block candidates (Add node names) in graph order."""
        result = prune(self.model, layers=1, layer_importance="magnitude", input_shapes=SHAPES,
                       latency_runs=0, verify=False)
        names = list(result.report["layers"]["scores"])
        order = {n.name: i for i, n in enumerate(self.model.graph.node)}
        return sorted(names, key=order.__getitem__)

    def decoder_layer_influence(self, adds: list[str]) -> list[float]:
        """ShortGPT's block influence of each whole decoder layer on the calibration tokens:
        1 - cos(layer input, layer output) per token, averaged. Layer i is blocks 2i
        (attention) and 2i+1 (MLP); its input is the residual operand of block 2i's Add."""
        nodes = {n.name: n for n in self.model.graph.node}
        producers = {o: n for n in self.model.graph.node for o in n.output}
        outputs = [nodes[a].output[0] for a in adds]
        first = nodes[adds[0]]
        # the residual operand of the first block is the embedding (a Gather), not the branch's output
        embedding = next(i for i in first.input if producers.get(i) is not None and producers[i].op_type == "Gather")
        probe = onnx.ModelProto()
        probe.CopyFrom(self.model)
        have = {o.name for o in probe.graph.output}
        for name in [embedding, *outputs]:
            if name not in have:
                probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        sess = session(probe)
        names = [embedding, *outputs]
        layers = len(adds) // 2
        sums, count = np.zeros(layers), 0
        for i in range(0, len(self.calib), EVAL_BATCH):
            values = dict(zip(names, sess.run(names, feeds(self.calib[i:i + EVAL_BATCH]))))
            inputs = [values[embedding]] + [values[outputs[2 * k + 1]] for k in range(layers - 1)]
            for k in range(layers):
                width = inputs[k].shape[-1]
                x, y = inputs[k].reshape(-1, width), values[outputs[2 * k + 1]].reshape(-1, width)
                cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)
                sums[k] += float((1 - cos).sum())
            count += inputs[0].shape[0] * inputs[0].shape[1]
        return (sums / count).tolist()


def cli_of(options: dict, model: str = "MODEL") -> str:
    parts = [".venv/bin/onnxprune", model]
    flags = {"heads": "--heads", "neurons": "--neurons", "hidden": "--hidden", "layers": "--layers",
             "importance": "--importance", "layer_importance": "--layer-importance"}
    for key, flag in flags.items():
        if key in options:
            parts += [flag, str(options[key])]
    for name in options.get("drop_layers", ()):
        parts += ["--drop-layer", name]
    if "calib" in options:
        parts += ["--calib", "CALIB.npz"]
    if options.get("recover"):
        parts += ["--recover", ",".join(options["recover"])]
    if "finetune" in options:
        parts[0] = ".venv-training/bin/onnxprune"
        parts += ["--finetune", "TRAIN.npz", "--loss", options["loss"], "--kd-alpha", str(options["kd_alpha"]),
                  "--steps", str(options["steps"]), "--batch-size", str(options["batch_size"]), "--lr",
                  str(options["lr"])]
    if options.get("layer_importance") != "influence":
        parts += [f"--input-shape input_ids:1,{tiny.SEQ}", f"--input-shape attention_mask:1,{tiny.SEQ}"]
    parts += ["-o", "OUT.onnx", "--report", "REPORT.json"]
    return " ".join(parts)


def with_calib(importance: str, recover: tuple) -> dict:
    options = {"importance": importance}
    if importance != "l2" or recover:
        options["calib"] = str(CALIB_NPZ)
    if recover:
        options["recover"] = recover
    return options


def training_free_rows(bench: Bench) -> tuple[list[dict], dict]:
    rows = []
    for structure, ratios in STRUCTURES.items():
        for label, importance, recover in CHANNEL_METHODS:
            options = {**ratios, **with_calib(importance, recover)}
            rows.append(bench.row(structure, label, options, cli_of(options)))
    adds = bench.block_adds()
    influence = bench.decoder_layer_influence(adds)
    weakest = int(np.argmin(influence))
    layer_info = {"blocks_in_graph_order": adds, "decoder_layer_influence_calibration": influence,
                  "decoder_layer_dropped": weakest, "blocks_of_dropped_layer": adds[2 * weakest:2 * weakest + 2]}
    log(f"  decoder-layer influence on the calibration tokens: {[round(v, 4) for v in influence]} -> layer {weakest}")
    layer_rows = [
        ("1 block", "magnitude", {"layers": 1, "layer_importance": "magnitude"}),
        ("1 block", "influence", {"layers": 1, "layer_importance": "influence", "calib": str(CALIB_NPZ)}),
        ("2 blocks (25%)", "magnitude", {"layers": 2, "layer_importance": "magnitude"}),
        ("2 blocks (25%)", "influence", {"layers": 2, "layer_importance": "influence", "calib": str(CALIB_NPZ)}),
        ("2 blocks (25%)", "influence + lsq", {"layers": 2, "layer_importance": "influence", "calib": str(CALIB_NPZ),
                                                "recover": ("lsq",)}),
        ("2 blocks (25%)", "influence + refit", {"layers": 2, "layer_importance": "influence",
                                                  "calib": str(CALIB_NPZ), "recover": ("refit",)}),
        ("1 decoder layer", f"layer {weakest} by decoder-layer influence",
         {"drop_layers": tuple(layer_info["blocks_of_dropped_layer"])}),
        ("1 decoder layer", f"layer {weakest} by decoder-layer influence + refit",
         {"drop_layers": tuple(layer_info["blocks_of_dropped_layer"]), "calib": str(CALIB_NPZ),
          "recover": ("refit",)}),
    ]
    for structure, label, options in layer_rows:
        rows.append(bench.row(structure, label, options, cli_of(options)))
    return rows, layer_info


def finetune_rows(bench: Bench, base_rows: list[dict]) -> list[dict]:
    """The best training-free row of each structure (by calibration-split cross-entropy), then
    FT_STEPS steps of distillation from the original on windows of the train split. Next-byte
    labels are given (with kd_alpha 1.0 they do not enter the loss): without labels the tool
    takes axis 1 of the [batch, sequence, vocab] logits as the class axis. One extra row shows
    that: the neurons row distilled without labels."""
    data = np.frombuffer(bench.train_bytes, dtype=np.uint8)
    n = (len(data) - 1) // tiny.SEQ
    ids = np.stack([data[i * tiny.SEQ:(i + 1) * tiny.SEQ + 1] for i in range(n)]).astype(np.int64)
    inputs = {"input_ids": ids[:, :-1], "attention_mask": np.ones_like(ids[:, :-1])}
    write_npz(TRAIN_NPZ, {**inputs, "labels": ids[:, 1:]})
    write_npz(TRAIN_NOLABEL_NPZ, inputs)
    structures = list(dict.fromkeys(r["structure"] for r in base_rows if r["structure"] != "1 block"))
    plans = []
    for structure in structures:
        cands = [r for r in base_rows if r["structure"] == structure and "calibration_ce" in r]
        if cands:
            plans.append((structure, min(cands, key=lambda r: r["calibration_ce"]), True))
    plans += [(s, best, False) for s, best, _ in plans if s == "neurons 25%"]
    rows = []
    for structure, best, labelled in plans:
        options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in best["options"].items()}
        if best["calibrated"]:
            options["calib"] = str(CALIB_NPZ)
        options.update(finetune=str(TRAIN_NPZ if labelled else TRAIN_NOLABEL_NPZ), loss="kd", kd_alpha=1.0,
                       steps=FT_STEPS, batch_size=FT_BATCH, lr=FT_LR, epochs=1)
        label = best["method"] + f" + kd {FT_STEPS} steps" + ("" if labelled else " (no labels: class axis 1)")
        cli = cli_of(options).replace("TRAIN.npz", "TRAIN.npz" if labelled else "TRAIN_NO_LABELS.npz")
        row = bench.row(structure, label, options, cli)
        row["finetune"] = {"from_row": best["method"], "train_windows": int(len(ids)), "steps": FT_STEPS,
                           "batch_size": FT_BATCH, "lr": FT_LR, "loss": "kd", "kd_alpha": 1.0, "temperature": 2.0,
                           "labels_given": labelled, "teacher": "the original model"}
        rows.append(row)
    return rows


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def working_tree() -> dict:
    """What the run's onnxprune had beyond the commit: changed tracked files and a hash of the diff."""
    try:
        files = subprocess.run(["git", "status", "--short", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split("\n")
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"changed_files": [f.strip() for f in files if f.strip()],
            "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--finetune", action="store_true",
                        help="add the distillation rows (run with .venv-training/bin/python) to the results")
    parser.add_argument("--json", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.finetune:
        if not (tiny.CACHE / tiny.ONNX_NAME).exists():
            log("run benchmarks/train_tiny_decoder.py (or this script without --finetune) first")
            return 2
        path, meta = tiny.CACHE / tiny.ONNX_NAME, json.loads((tiny.CACHE / "meta.json").read_text())
        outcome = json.loads(args.json.read_text())
        bench = Bench(path, meta)
        rows = finetune_rows(bench, outcome["rows"])
        outcome["finetune"] = {"onnxruntime": ort.__version__, "commit": commit(), "working_tree": working_tree(),
                               "original_in_this_runtime": bench.original(),
                               "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1),
                               "date": dt.date.today().isoformat(), "command": "OMP_NUM_THREADS=1 nice -n 10 "
                               ".venv-training/bin/python benchmarks/bench_decoder_fidelity.py --finetune"}
    else:
        import torch
        import transformers

        torch.set_num_threads(1)
        path, meta = tiny.ensure()
        bench = Bench(path, meta)
        rows, layer_info = training_free_rows(bench)
        outcome = {
            "date": dt.date.today().isoformat(), "commit": commit(), "working_tree": working_tree(),
            "structures": STRUCTURES, "machine": machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/bench_decoder_fidelity.py",
            "model": {"config": meta["config"], "params": meta["params"], "training": {
                k: v for k, v in meta["training"].items() if k != "history"},
                "training_history": meta["training"]["history"], "heldout_ce_torch": meta["heldout_ce_torch"],
                "heldout_ce_onnx_export": meta.get("heldout_ce_onnx"), "onnx_file": str(path),
                "onnx_nodes": len(bench.model.graph.node),
                "opset": [f"{o.domain or 'ai.onnx'} {o.version}" for o in bench.model.opset_import]},
            "splits": bench.split_info, "input_shapes_for_macs": SHAPES, "original": bench.original(),
            "layers": layer_info, "rows": rows, "wall_seconds": round(time.perf_counter() - started, 1),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.json.parent, delete=False, suffix=".tmp") as f:
        f.write(json.dumps(outcome, indent=1, default=str) + "\n")
    os.chmod(f.name, 0o644)
    Path(f.name).replace(args.json)
    log(f"wrote {args.json} ({time.perf_counter() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
