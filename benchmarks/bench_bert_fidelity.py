"""Fidelity of a real sentence-embedding BERT, exported by both torch exporters and pruned with heads.

paraphrase-MiniLM-L3-v2 (BERT: 3 layers, 12 heads, hidden 384, FFN 1536) arrives as a legacy
torch export (paraphrase_minilm_l3_v2_bert.onnx, see /work/shared/models/MANIFEST.md). Its
weights are copied into a `transformers.BertModel` of the same configuration (read from the
graph: initializer shapes, the head reshape constants, the LayerNorm epsilon), which must give
the ONNX model's token outputs back on real sentences. That model is exported twice, with
dynamic batch and sequence: torch.onnx.export(dynamo=False, opset 17, dynamic_axes) and
torch.onnx.export(dynamo=True, torch.export.Dim dynamic_shapes). Inputs input_ids and
attention_mask (token_type_ids are zeros inside), output last_hidden_state.

Each export is pruned without --input-shape to keep 75% and 50% of its MACs, heads analysed as
whole heads (heads=0.0) next to the MLP neurons, four ways: l2 without recovery; recon with
lsq; recon with the sequential refit; per-group ratios from onnxprune's sensitivity analysis
(measured on the calibration data with the best of the three rows' criterion and recovery)
with that criterion and recovery. Then, calibrated on a larger set (benchmarks/calibration_text.py:
sentences of Python's documentation, plus the 64): recon + lsq with one ratio, and one head in twelve
cut per layer (heads=1/12 with the target) with the FFN widths from sensitivity curves measured with
lsq on that set (min_keep 0.25 and 0.05). No training anywhere.

Sentences: the 64 of benchmarks/calibration_data.py calibrate (8 padded batches of 8 with
their attention mask); the 24 of benchmarks/real_fidelity.py, disjoint from them, are held out
for evaluation. Metric: cosine between the pruned and the original export's mean-pooled
(attention-mask weighted) sentence embeddings, mean and min over the held-out sentences.

Writes benchmarks/results/bert_fidelity.json and the section "## paraphrase-MiniLM-L3-v2
exported both ways, heads and neurons, no training" of docs/fidelity.md (unless --no-write);
prints the section on stdout and progress on stderr.

    .venv/bin/python benchmarks/bench_bert_fidelity.py [--no-write] [--render] [--json FILE] [--save-exports DIR]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import gc
import json
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import calibration_data  # noqa: E402
import calibration_text  # noqa: E402
import real_fidelity  # noqa: E402
from machine_info import machine, write_section  # noqa: E402
from real_fidelity import (  # noqa: E402
    MINILM,
    PARAPHRASES,
    TOKEN_OUTPUT,
    commit,
    cosine,
    mean_pool,
    minilm_tokenizer,
)

from onnxprune import VerificationError, prune  # noqa: E402
from onnxprune.sensitivity import analyze_sensitivity  # noqa: E402

SHARED = Path("/work/shared/models") / MINILM
DOC = ROOT / "docs" / "fidelity.md"
RESULTS = ROOT / "benchmarks" / "results" / "bert_fidelity.json"
TITLE = "## paraphrase-MiniLM-L3-v2 exported both ways, heads and neurons, no training"
COMMAND = ".venv/bin/python benchmarks/bench_bert_fidelity.py"

TARGETS = (0.75, 0.5)  # fraction of MACs kept
GOALS = {0.75: 0.97, 0.5: 0.93}  # mean held-out sentence cosine the issue asks for
CALIB_BATCH = 8  # sentences per calibration batch, padded to the longest
METHODS = [  # (label, importance, recover)
    ("l2", "l2", "none"),
    ("recon + lsq", "recon", "lsq"),
    ("recon + refit", "recon", "refit"),
]
# Rows calibrated on the larger set (calibration_text.py: sentences of Python's documentation, plus
# the 64 above), recon + lsq: one ratio for heads and FFN (bisection); and one head in twelve cut
# per layer (heads=1/12 with the target: cut as given), the FFN widths from sensitivity curves
# measured with lsq on every sentence of the larger set, with the default min_keep (0.25) and
# with 0.05 (the curves may then take a layer's FFN below a quarter).
ONE_HEAD = 1 / 12
LARGE_SENSITIVITY_RATIOS = (0.25, 0.5, 0.65, 0.75, 0.85, 0.95)
LARGE_CALIB_METHODS = [  # (label, heads ratio given with the target, sensitivity curves?, min_keep)
    ("recon + lsq, pydoc calibration", 0.0, False, None),
    ("1 head/layer + sensitivity FFN, recon + lsq, pydoc calibration", ONE_HEAD, True, None),
    ("1 head/layer + sensitivity FFN, min_keep 0.05, recon + lsq, pydoc calibration", ONE_HEAD, True, 0.05),
]
PREFIX = "model.0.auto_model."  # the sentence-transformers export's name for the BertModel


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def session(model) -> ort.InferenceSession:
    return real_fidelity.session(Path(model) if isinstance(model, (str, Path)) else model)


# ---- the torch model, rebuilt from the ONNX graph ---------------------------------------------

def read_config(graph: onnx.GraphProto) -> dict:
    """BertConfig fields from the legacy export: sizes from initializer shapes, heads from the
    constant [heads, head_dim] of the attention reshapes, epsilon from LayerNormalization."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    vocab, hidden = shapes[PREFIX + "embeddings.word_embeddings.weight"]
    layers = 1 + max(int(name[len(PREFIX + "encoder.layer."):].split(".")[0])
                     for name in shapes if name.startswith(PREFIX + "encoder.layer."))
    producers = {o: n for n in graph.node for o in n.output}

    def constant(name):
        node = producers.get(name)
        if node is None or node.op_type != "Constant":
            return None
        return numpy_helper.to_array(node.attribute[0].t).ravel().tolist()

    heads = None
    for node in graph.node:
        if node.op_type == "Reshape" and "attention/self" in node.name:
            concat = producers.get(node.input[1])
            if concat is not None and concat.op_type == "Concat":
                tail = [constant(i) for i in concat.input[-2:]]
                if all(t is not None and len(t) == 1 for t in tail) and tail[0][0] * tail[1][0] == hidden:
                    heads = tail[0][0]
                    break
    if heads is None:
        raise RuntimeError("no [heads, head_dim] reshape constant found in the attention")
    eps = next(a.f for n in graph.node if n.op_type == "LayerNormalization" for a in n.attribute
               if a.name == "epsilon")
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=shapes[PREFIX + "encoder.layer.0.intermediate.dense.bias"][0],
                max_position_embeddings=shapes[PREFIX + "embeddings.position_embeddings.weight"][0],
                type_vocab_size=shapes[PREFIX + "embeddings.token_type_embeddings.weight"][0],
                layer_norm_eps=float(np.float32(eps)), hidden_act="gelu")


def rebuild(model: onnx.ModelProto):
    """A transformers BertModel (no pooler) holding the ONNX model's weights, and how each
    state_dict entry was found."""
    import torch
    from transformers import BertConfig, BertModel

    config = read_config(model.graph)
    bert = BertModel(BertConfig(**config), add_pooling_layer=False).eval()
    wanted = bert.state_dict()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found, how = {}, collections.Counter()
    for name, value in weights.items():  # named as in the torch module
        if name.startswith(PREFIX) and name[len(PREFIX):] in wanted:
            found[name[len(PREFIX):]] = value
            how["by name"] += 1
    # The exporter renamed the MatMul weights (onnx::MatMul_470...): they are [in, out], the
    # Linear weight is [out, in]. The MatMul node's name gives the module path.
    unnamed = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[1] not in found:
            key = node.name.split("/auto_model/")[-1].rsplit("/MatMul", 1)[0].replace("/", ".") + ".weight"
            if key in wanted and key not in found:
                found[key] = weights[node.input[1]].T
                how["by MatMul node name, transposed"] += 1
            else:
                unnamed.append(weights[node.input[1]])
    # Anything left: by shape, in graph order.
    for key in [k for k in wanted if k not in found]:
        shape = tuple(wanted[key].shape)
        index = next((i for i, w in enumerate(unnamed) if w.T.shape == shape), None)
        if index is None:
            raise RuntimeError(f"no ONNX weight for {key} {list(shape)}")
        found[key] = unnamed.pop(index).T
        how["by shape and order, transposed"] += 1
    bert.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in found.items()}, strict=True)
    return bert, config, dict(how)


def encoder(bert):
    """The BertModel as a module taking (input_ids, attention_mask), returning last_hidden_state."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, *args):
            input_ids, attention_mask = args
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=torch.zeros_like(input_ids)).last_hidden_state

    return Encoder().eval()


NAMES = ["input_ids", "attention_mask"]


def export_legacy(module, example, path: Path) -> None:
    import torch

    dynamic = {name: {0: "batch", 1: "sequence"} for name in [*NAMES, "last_hidden_state"]}
    with torch.no_grad():
        torch.onnx.export(module, example, str(path), input_names=NAMES, output_names=["last_hidden_state"],
                          opset_version=17, dynamic_axes=dynamic, dynamo=False)


def export_dynamo(module, example, path: Path) -> None:
    import torch

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(module, example, input_names=NAMES, output_names=["last_hidden_state"],
                                    dynamic_shapes=(tuple({0: batch, 1: seq} for _ in NAMES),), dynamo=True)
    program.save(str(path))


EXPORTERS = {"legacy": ("torch.onnx.export(dynamo=False), opset 17, dynamic_axes", export_legacy),
             "dynamo": ("torch.onnx.export(dynamo=True), torch.export.Dim dynamic_shapes", export_dynamo)}


# ---- data -----------------------------------------------------------------------------------

def feeds(tokenizer, sentences: list[str]) -> dict:
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    return {"input_ids": batch["input_ids"].astype(np.int64),
            "attention_mask": batch["attention_mask"].astype(np.int64)}


def tokens_of(model, feed: dict, output: str) -> np.ndarray:
    return session(model).run([output], feed)[0]


# ---- pruning rows ---------------------------------------------------------------------------

def embeddings_of(model, batches: list[dict]) -> np.ndarray:
    """Mean-pooled sentence embeddings over several batches, one session."""
    sess = session(model)
    return np.concatenate([mean_pool(sess.run(["last_hidden_state"], f)[0], f["attention_mask"]) for f in batches])


def node_order(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    order = {}
    for i, node in enumerate(model.graph.node):
        order.setdefault(node.name, i)
        for out in node.output:
            order.setdefault(out, i)
    return order


def kept_per_layer(plan, kind: str, order: dict[str, int], channels: int | None = None) -> list[int]:
    """Channels kept by each group of `kind` (heads: heads kept), in graph order."""
    decisions = [d for d in plan.decisions if d.group.kind == kind
                 and (channels is None or d.group.channels == channels)]
    decisions.sort(key=lambda d: order.get(d.key.split(":in")[0], 1 << 30))
    return [int(d.group.channels - len(d.removed)) for d in decisions]


# The verification run compares the candidate on the first calibration batch; where the
# candidate still has the measuring dims pinned, onnxruntime refuses that batch and every
# group is rolled back (see the report that goes with this benchmark).
PINNED_DIMS = "Got invalid dimensions for input"



def attempt(path, row: dict, **options):
    """prune(path, **options); a failure is a finding: recorded in row["error"], and the result is
    None (a VerificationError's result is kept, with the error recorded)."""
    try:
        return prune(str(path), **options)
    except VerificationError as exc:
        row["error"] = f"VerificationError: {exc}"
        return exc.result
    except Exception as exc:  # the tool's failures of every kind
        row["error"] = f"{type(exc).__name__}: {exc}"
        return None

class Export:
    """One export under test: its file, the original's embeddings, and the data."""

    def __init__(self, name: str, path: Path, eval_feed: dict, calib: list[dict], config: dict,
                 large_calib: list[dict] | None = None) -> None:
        self.name, self.path, self.eval_feed, self.calib, self.config = name, path, eval_feed, calib, config
        self.order = node_order(path)
        self.reference = embeddings_of(path, [eval_feed])
        self.calib_sets = {"small": calib}
        self.calib_references = {"small": embeddings_of(path, calib)}
        if large_calib is not None:
            self.calib_sets["large"] = large_calib
            self.calib_references["large"] = embeddings_of(path, large_calib)
        self.pinned_dims_rollback = False  # set once a verified run rolled everything back for that reason

    def row(self, target: float, label: str, importance: str, recover: str, verify: bool = True,
            sensitivity=None, calib_set: str = "small", heads: float = 0.0, min_keep: float | None = None) -> dict:
        """One prune to `target` of the MACs; `heads` > 0 is cut as given, the rest allocated."""
        calib = self.calib_sets[calib_set]
        options = dict(target_macs=target, heads=heads, importance=importance, latency_runs=0, verify=verify)
        if min_keep is not None:
            options["min_keep"] = min_keep
        if importance != "l2" or recover != "none":
            options.update(calib=calib, recover=recover)
        if sensitivity is not None:
            options["sensitivity"] = sensitivity
        row = {"method": label, "importance": importance, "recover": recover, "verify": verify,
               "sensitivity": sensitivity is not None, "target": target, "calibration": calib_set,
               "heads_given": heads, "min_keep": min_keep}
        started = time.perf_counter()
        result = attempt(self.path, row, **options)
        row["seconds"] = round(time.perf_counter() - started, 2)
        if result is None or "error" in row:
            log(f"    {label:36s} {row['error']}")
            return row
        report = result.report
        cos = cosine(self.reference, embeddings_of(result.model, [self.eval_feed]))
        calib_cos = cosine(self.calib_references[calib_set], embeddings_of(result.model, calib))
        heads_kept = kept_per_layer(result.plan, "heads", self.order)
        heads_total = int(sum(d.group.channels for d in result.plan.decisions if d.group.kind == "heads"))
        row.update(
            macs_before=report["macs"]["before"], macs_after=report["macs"]["after"],
            macs_kept=report["macs"]["after"] / report["macs"]["before"],
            params_kept=report["params"]["after"] / report["params"]["before"],
            heads_kept=heads_kept, heads_total=heads_total, heads_pruned=heads_total - int(sum(heads_kept)),
            ffn_kept=kept_per_layer(result.plan, "neurons", self.order, self.config["intermediate_size"]),
            groups=dict(collections.Counter(f"{g['kind']} {g['channels_before']}->{g['channels_after']}"
                                            for g in report["groups"] if g["channels_after"] < g["channels_before"])),
            cos_mean=float(cos.mean()), cos_min=float(cos.min()),
            calib_cos_mean=float(calib_cos.mean()), calib_cos_min=float(calib_cos.min()),
            verification={k: report["verification"].get(k) for k in ("checker", "onnxruntime", "max_abs_diff",
                                                                      "max_rel_diff")},
            notes=list(report.get("notes", [])), recovery=report.get("recovery"),
            rolled_back=report.get("rolled_back", []), summary=report.get("summary"),
            input_shapes=report.get("input_shapes"))
        row["reached"] = row["macs_kept"] <= target + 0.005
        if verify and not row["reached"] and any(PINNED_DIMS in r["reason"] for r in row["rolled_back"]):
            self.pinned_dims_rollback = True
        log(f"    {label:36s} MACs {row['macs_kept']:.3f} heads {heads_kept} FFN {row['ffn_kept']} "
            f"cos {row['cos_mean']:.4f}/{row['cos_min']:.4f} (calib {row['calib_cos_mean']:.4f}) "
            f"{row['seconds']:.1f}s" + (f"; {len(row['rolled_back'])} groups rolled back" if row["rolled_back"] else ""))
        return row

    def method_rows(self, target: float, label: str, importance: str, recover: str, sensitivity=None,
                    **extra) -> list[dict]:
        """The row as the tool gives it; where the verification rolled everything back because
        of the pinned dims, also the same prune with verify=False (checked here instead: it runs
        on the held-out batch at other dims). `extra` goes to row()."""
        calibrated = importance != "l2" or recover != "none"
        if calibrated and self.pinned_dims_rollback:  # known outcome (and the costliest run): not repeated
            return [{**self.row(target, label + ", verify off", importance, recover, verify=False,
                                sensitivity=sensitivity, **extra), "verified_run_skipped": True}]
        row = self.row(target, label, importance, recover, sensitivity=sensitivity, **extra)
        rows = [row]
        if calibrated and self.pinned_dims_rollback:
            rows.append(self.row(target, label + ", verify off", importance, recover, verify=False,
                                 sensitivity=sensitivity, **extra))
        return rows


def usable(row: dict) -> bool:
    return "cos_mean" in row and row["reached"]


def run_export(export: Export) -> dict:
    targets, scans = {}, {}
    for target in TARGETS:
        log(f"  target MACs {target}")
        rows = []
        for label, importance, recover in METHODS:
            rows += export.method_rows(target, label, importance, recover)
        good = [r for r in rows if usable(r)]
        if good:
            best = max(good, key=lambda r: r["cos_mean"])
            key = (best["importance"], best["recover"])
            if key not in scans:
                started = time.perf_counter()
                try:
                    scan = analyze_sensitivity(str(export.path), calibration=export.calib, importance=key[0],
                                               heads=True, recover=() if key[1] == "none" else key[1])
                    scans[key] = {"scan": scan, "seconds": round(time.perf_counter() - started, 1)}
                    log(f"    sensitivity ({key[0]}, recover {key[1]}): {len(scan.rows)} trials over "
                        f"{len({t.key for t in scan.rows})} of {scan.groups_total} groups, {scans[key]['seconds']}s; "
                        f"notes {scan.notes}")
                except Exception as exc:
                    scans[key] = {"scan": None, "seconds": round(time.perf_counter() - started, 1),
                                  "error": f"{type(exc).__name__}: {exc}"}
                    log(f"    sensitivity failed: {scans[key]['error']}")
            scan = scans[key]["scan"]
            label = "sensitivity, " + best["method"].replace(", verify off", "")
            if scan is None:
                rows.append({"method": label, "sensitivity": True, "target": target, "error": scans[key]["error"]})
            else:
                for row in export.method_rows(target, label, key[0], key[1], sensitivity=scan):
                    row["sensitivity_seconds"] = scans[key]["seconds"]
                    rows.append(row)
        if "large" in export.calib_sets:
            for label, heads, curves, min_keep in LARGE_CALIB_METHODS:
                scan = None
                if curves:
                    key = ("recon", "lsq", "large")
                    if key not in scans:
                        started = time.perf_counter()
                        scan = analyze_sensitivity(str(export.path), calibration=export.calib_sets["large"],
                                                   importance="recon", heads=True, recover="lsq",
                                                   ratios=LARGE_SENSITIVITY_RATIOS,
                                                   calib_limit=sum(len(f["input_ids"]) for f in
                                                                   export.calib_sets["large"]))
                        scans[key] = {"scan": scan, "seconds": round(time.perf_counter() - started, 1)}
                        log(f"    sensitivity on the larger set: {scans[key]['seconds']}s")
                    scan = scans[key]["scan"]
                for row in export.method_rows(target, label, "recon", "lsq", sensitivity=scan, calib_set="large",
                                              heads=heads, min_keep=min_keep):
                    if scan is not None:
                        row["sensitivity_seconds"] = scans[("recon", "lsq", "large")]["seconds"]
                    rows.append(row)
        targets[str(target)] = rows
    sensitivity = {}
    for key, entry in scans.items():  # (importance, recover) or (importance, recover, "large")
        scan = entry["scan"]
        sensitivity[", ".join(key)] = {
            "seconds": entry["seconds"], "error": entry.get("error"),
            **({} if scan is None else {
                "groups_total": scan.groups_total, "groups_measured": len({t.key for t in scan.rows}),
                "data": scan.data, "notes": list(scan.notes),
                "trials": [{"key": t.key, "kind": t.kind, "channels": t.channels, "ratio": t.ratio,
                            "removed": t.removed, "cosine_drop": t.cosine_drop, "rel_error": t.rel_error,
                            "error": t.error} for t in scan.rows]})}
    return {"targets": targets, "sensitivity": sensitivity, "pinned_dims_rollback": export.pinned_dims_rollback}


# ---- the whole run --------------------------------------------------------------------------

def measure(save_exports: Path | None) -> dict:
    import torch

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    source = SHARED if SHARED.is_file() else real_fidelity.fetch(MINILM)
    original = onnx.load(str(source))
    log(f"model {source}")
    bert, config, mapping = rebuild(original)
    log(f"rebuilt BertModel {config}; weights {mapping}")

    tokenizer = minilm_tokenizer()
    calib_text, eval_text = list(calibration_data.SENTENCES), list(real_fidelity.SENTENCES)
    assert not set(calib_text) & set(eval_text), "calibration and evaluation sentences overlap"
    calib = [feeds(tokenizer, calib_text[i:i + CALIB_BATCH]) for i in range(0, len(calib_text), CALIB_BATCH)]
    # The larger set: Python's documentation prose and the 64, sorted by length so that batches
    # carry little padding (the tool leaves padding out of its statistics anyway).
    large_text = list(dict.fromkeys(calibration_text.pydoc_sentences() + calib_text))
    assert not set(large_text) & set(eval_text), "calibration and evaluation sentences overlap"
    lengths = {t: len(tokenizer(t)["input_ids"]) for t in large_text}
    large_text.sort(key=lambda t: lengths[t])
    large_calib = [feeds(tokenizer, large_text[i:i + CALIB_BATCH]) for i in range(0, len(large_text), CALIB_BATCH)]
    eval_feed = feeds(tokenizer, eval_text)
    mask = eval_feed["attention_mask"].astype(bool)

    # The rebuilt torch model against the ONNX model, on every sentence (real tokens only).
    onnx_tokens, diffs = {}, []
    for key, feed in [("eval", eval_feed), *((f"calib{i}", f) for i, f in enumerate(calib))]:
        ref = tokens_of(original, feed, TOKEN_OUTPUT)
        with torch.no_grad():
            ids = torch.from_numpy(feed["input_ids"])
            out = bert(input_ids=ids, attention_mask=torch.from_numpy(feed["attention_mask"]),
                       token_type_ids=torch.zeros_like(ids)).last_hidden_state.numpy()
        real = feed["attention_mask"].astype(bool)
        diffs.append(float(np.abs(out[real] - ref[real]).max()))
        onnx_tokens[key] = ref
    torch_diff = max(diffs)
    log(f"torch vs ONNX, real tokens of all {len(calib_text) + len(eval_text)} sentences: max abs diff {torch_diff:.2e}")
    if torch_diff > 1e-4:
        raise RuntimeError(f"the rebuilt model does not reproduce the ONNX model (max abs diff {torch_diff})")

    # Vocabulary check on the original: paraphrase pairs (in the held-out set) closer than the rest.
    pooled = mean_pool(onnx_tokens["eval"], eval_feed["attention_mask"])
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    sim = unit @ unit.T
    pairs = {(eval_text.index(a), eval_text.index(b)) for a, b in PARAPHRASES}
    paraphrase = float(np.mean([sim[i, j] for i, j in pairs]))
    others = float(np.mean([sim[i, j] for i in range(len(eval_text)) for j in range(i + 1, len(eval_text))
                            if (i, j) not in pairs]))

    # An example batch of 2 x 16 so that neither dim is traced as 1 (torch specializes 0/1).
    example = (torch.from_numpy(calib[0]["input_ids"][:2, :16].copy()),
               torch.from_numpy(calib[0]["attention_mask"][:2, :16].copy()))
    module = encoder(bert)
    workdir = Path(tempfile.mkdtemp(prefix="bench-bert-fidelity-"))
    outcome = {"config": config, "weight_mapping": mapping, "torch_vs_onnx_max_abs_diff": torch_diff,
               "sentences": {"calibration": len(calib_text), "evaluation": len(eval_text),
                             "calibration_batches": len(calib),
                             "calibration_tokens": int(sum(f["attention_mask"].sum() for f in calib)),
                             "calibration_positions_padded": int(sum(f["attention_mask"].size for f in calib)),
                             "large_calibration": len(large_text),
                             "large_calibration_from_pydoc": len(large_text) - len(calib_text),
                             "large_calibration_batches": len(large_calib),
                             "large_calibration_tokens": int(sum(f["attention_mask"].sum() for f in large_calib)),
                             "large_calibration_positions_padded": int(sum(f["attention_mask"].size
                                                                           for f in large_calib)),
                             "evaluation_tokens": int(mask.sum()),
                             "evaluation_lengths": [int(mask.sum(1).min()), int(mask.sum(1).max())]},
               "vocabulary_check": {"paraphrase_pairs": paraphrase, "other_pairs": others},
               "exports": {}}
    try:
        paths = {}
        for name, (how, export) in EXPORTERS.items():
            path = paths[name] = workdir / f"minilm_l3_{name}.onnx"
            started = time.perf_counter()
            export(module, example, path)
            exported = onnx.load(str(path))
            info = {
                "how": how, "export_seconds": round(time.perf_counter() - started, 2),
                "opset": next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")),
                "inputs": {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                           for i in exported.graph.input},
                "outputs": {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                            for o in exported.graph.output},
                "ops": dict(collections.Counter(n.op_type for n in exported.graph.node).most_common()),
            }
            del exported
            diffs = []  # the export against the original ONNX model, real tokens only
            for key, feed in [("eval", eval_feed), *((f"calib{i}", f) for i, f in enumerate(calib))]:
                out = tokens_of(path, feed, "last_hidden_state")
                real = feed["attention_mask"].astype(bool)
                diffs.append(float(np.abs(out[real] - onnx_tokens[key][real]).max()))
            info["vs_original_onnx_max_abs_diff"] = max(diffs)
            outcome["exports"][name] = info
            log(f"{name} export: {how}; opset {info['opset']}, {sum(info['ops'].values())} nodes; "
                f"vs the original ONNX: max abs diff {info['vs_original_onnx_max_abs_diff']:.2e}")
            if save_exports is not None:
                save_exports.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, save_exports / path.name)
        del module, bert, original, onnx_tokens
        gc.collect()
        for name, path in paths.items():
            log(f"== {name} export")
            outcome["exports"][name].update(run_export(Export(name, path, eval_feed, calib, config,
                                                              large_calib=large_calib)))
            gc.collect()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    outcome["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return outcome


# ---- the markdown -----------------------------------------------------------------------------

def fmt_list(values) -> str:
    return "/".join(str(v) for v in values) if values else "none"


def all_rows(outcome: dict):
    for name, info in outcome["exports"].items():
        for target, rows in info["targets"].items():
            for row in rows:
                yield name, float(target), row


def table(outcome: dict) -> list[str]:
    heads, ffn = outcome["config"]["num_attention_heads"], outcome["config"]["intermediate_size"]
    lines = [f"| export | target MACs kept | method | MACs kept | heads kept per layer (of {heads}) | "
             f"FFN kept per layer (of {ffn}) | held-out cosine mean / min | calibration cosine mean | prune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, target, r in all_rows(outcome):
        if "cos_mean" not in r:
            lines.append(f"| {name} | {target} | {r['method']} | failed: {r['error'][:200]} | | | | | "
                         f"{r.get('seconds', '')} |")
            continue
        seconds = f"{r['seconds']:.1f}"
        if r.get("sensitivity_seconds") is not None:
            seconds += f" (+{r['sensitivity_seconds']:.0f} analysis)"
        macs = f"{r['macs_kept']:.3f}"
        if r["rolled_back"]:
            macs += f" ({len(r['rolled_back'])} groups rolled back)"
        lines.append(f"| {name} | {target} | {r['method']} | {macs} | {fmt_list(r['heads_kept'])} | "
                     f"{fmt_list(r['ffn_kept'])} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | "
                     f"{r['calib_cos_mean']:.4f} | {seconds} |")
    return lines


def qualifies(row: dict) -> bool:
    """A row that counts for the issue's target: MACs reached, heads pruned."""
    return usable(row) and row["heads_pruned"] > 0


def base_method(row: dict) -> str:
    return row["method"].replace(", verify off", "")


def recovery_text(row: dict) -> str:
    """What recovery did in one row, from its report."""
    rec = row.get("recovery") or {}
    fitted = rec.get("layers_refitted", 0)
    skipped = sum(int(m.group(1)) for n in rec.get("notes", []) for m in [re.search(r"skipped for (\d+) layer", n)] if m)
    if row["recover"] == "lsq":
        compensated = rec.get("layers_compensated", 0)
        if not skipped:
            return f"{compensated} layers compensated, all by lsq"
        return f"{compensated} layers compensated, lsq skipped for {skipped} of them (bias instead)"
    return f"{fitted} layers refitted, {skipped} skipped"


def reading(outcome: dict) -> list[str]:
    """What the numbers show, from this run's numbers only."""
    exports = outcome["exports"]
    rows = list(all_rows(outcome))
    paragraphs = []

    # The same function, pruned by the same method: the same numbers?
    pairs = []
    for target in TARGETS:
        for label in dict.fromkeys(base_method(r) for _, _, r in rows):
            found = [r for _, t, r in rows if t == target and base_method(r) == label and usable(r)]
            if len(found) == len(exports) > 1:
                pairs.append(max(r["cos_mean"] for r in found) - min(r["cos_mean"] for r in found))
    text = (f"Both exports compute the original's function (within "
            f"{max(i['vs_original_onnx_max_abs_diff'] for i in exports.values()):.0e} on every real token).")
    if pairs:
        text += (f" Wherever both exports were pruned to the target by the same method ({len(pairs)} method/target "
                 f"pairs, 'verify off' rows included), the two mean cosines differ by at most {max(pairs):.4f}: the "
                 "tool makes the same cuts and fits on both graphs.")
    paragraphs.append(text)

    rolled = [(n, t, r) for n, t, r in rows if r.get("rolled_back") and not r.get("reached")]
    if rolled:
        reasons = sorted({x["reason"][:140] for _, _, r in rolled for x in r["rolled_back"]})
        skipped = [(n, t, r) for n, t, r in rows if r.get("verified_run_skipped")]
        paragraphs.append(
            f"**Tool issue: verification with calibration data rolls everything back.** {len(rolled)} verified "
            f"run(s) with calibration data on the {', '.join(sorted({n for n, _, _ in rolled}))} export ended with "
            f"all {len(rolled[0][2]['rolled_back'])} groups rolled back and nothing pruned (MACs kept "
            f"{', '.join(sorted({format(r['macs_kept'], '.3f') for _, _, r in rolled}))}) while the report says "
            f"verification passed; reason given: {'; '.join(reasons)}. (The verification runs the candidate on the first "
            "calibration batch while the candidate's inputs are still pinned at the measuring dims.) The same prunes with `verify=False` (rows "
            "marked 'verify off') give models that run here at the held-out batch's dims; their numbers are shown"
            + (f", and the {len(skipped)} later calibrated rows of that export were run only that way." if skipped
               else "."))
    for name, info in exports.items():
        planned = max((r["summary"]["groups_prunable"] for n, _, r in rows if n == name and r.get("summary")
                       and r.get("reached")), default=None)
        for scan in info.get("sensitivity", {}).values():
            if planned and scan.get("groups_total") is not None and scan["groups_total"] < planned:
                kinds = sorted({t["kind"] for t in scan["trials"]})
                paragraphs.append(
                    f"**Tool issue: the sensitivity analysis sees fewer groups.** On the {name} export "
                    f"`analyze_sensitivity` found {scan['groups_total']} groups ({', '.join(kinds)} only) where "
                    f"`prune` plans {planned}; the allocation keeps the unmeasured ones whole, so a target that needs "
                    "them fails (see the table).")

    means = {}
    for target in TARGETS:
        for label, *_ in METHODS:
            values = [r["cos_mean"] for _, t, r in rows if t == target and usable(r) and base_method(r) == label]
            if values:
                means[(target, label)] = float(np.mean(values))
    if means:
        paragraphs.append("With one ratio for heads and neurons, the mean held-out cosine (the same on both exports) "
                          "is " + "; ".join(
                              f"at {1 - target:.0%} of the MACs removed " + ", ".join(
                                  f"{label} {means[(target, label)]:.3f}" for label, *_ in METHODS
                                  if (target, label) in means) for target in TARGETS) + ".")
    recovered = [(n, t, r) for n, t, r in rows if usable(r) and r["recover"] in ("lsq", "refit")
                 and not r["sensitivity"] and r.get("calibration", "small") == "small"]
    if recovered:
        first = {}
        for n, t, r in recovered:
            first.setdefault((t, base_method(r)), r)
        paragraphs.append(
            f"The calibration set has {outcome['sentences']['calibration_tokens']} real tokens, fewer than the tool's "
            "4 rows per input for most layers, and recovery says so: " + "; ".join(
                f"{1 - t:.0%} {label}: {recovery_text(r)}" for (t, label), r in first.items())
            + ". The 'recon + lsq' rows are therefore recon with bias compensation only.")
        for target in TARGETS:
            lsq, refit = first.get((target, "recon + lsq")), first.get((target, "recon + refit"))
            if lsq and refit and (refit.get("recovery") or {}).get("layers_refitted"):
                paragraphs[-1] += (
                    f" At {1 - target:.0%} of the MACs removed, where refit did refit "
                    f"{refit['recovery']['layers_refitted']} layers, it raised the calibration sentences' mean cosine "
                    f"from {lsq['calib_cos_mean']:.3f} (lsq) to {refit['calib_cos_mean']:.3f} and "
                    f"{'lowered' if refit['cos_mean'] < lsq['cos_mean'] else 'raised'} the held-out one from "
                    f"{lsq['cos_mean']:.3f} to {refit['cos_mean']:.3f}"
                    + (": it fitted the calibration sentences." if refit["cos_mean"] < lsq["cos_mean"] else "."))
    large = [(n, t, r) for n, t, r in rows if r.get("calibration") == "large" and usable(r)]
    if large:
        sent = outcome["sentences"]
        paragraphs.append(
            f"With the larger calibration set ({sent['large_calibration_tokens']} real tokens), recovery fits: "
            + "; ".join(f"{n} {1 - t:.0%} {base_method(r)}: {recovery_text(r)}, held-out {r['cos_mean']:.4f} / "
                        f"{r['cos_min']:.4f}, calibration {r['calib_cos_mean']:.4f}" for n, t, r in large)
            + ". The calibration sentences (documentation prose) are further from the held-out ones (everyday "
              "sentences) than the 64 hand-written ones, so the calibration cosine overstates the held-out one.")
    sens = [(n, t, r) for n, t, r in rows if r.get("sensitivity") and usable(r)]
    if sens:
        paragraphs.append(
            "Sensitivity allocation (per-group ratios): " + "; ".join(
                f"{n} {1 - t:.0%}: {r['cos_mean']:.4f}, {r['heads_pruned']} head(s) pruned (kept "
                f"{fmt_list(r['heads_kept'])}), FFN kept {fmt_list(r['ffn_kept'])}" for n, t, r in sens)
            + ". Its gain over one ratio for all comes from taking the MACs out of the FFN neurons of the layers "
              "whose curves are flattest and pruning few or no heads.")
    verdicts, all_met, met_at = [], True, []
    for target in TARGETS:
        goal = GOALS[target]
        parts, met_here = [], True
        for name in exports:
            cands = [r for n, t, r in rows if n == name and t == target and qualifies(r)]
            if not cands:
                parts.append(f"{name}: no row with heads pruned reached the MACs")
                all_met = met_here = False
                continue
            best = max(cands, key=lambda r: r["cos_mean"])
            met = best["cos_mean"] >= goal
            all_met &= met
            met_here &= met
            parts.append(f"{name} {best['cos_mean']:.4f} ({best['method']}, {best['heads_pruned']} head(s) pruned): "
                         f"{'met' if met else 'not met'}")
        verdicts.append(f"{1 - target:.0%} of the MACs removed, goal >= {goal:.2f}: " + "; ".join(parts))
        if met_here:
            met_at.append(f"{1 - target:.0%}")
    headline = ("Target met" if all_met else f"Target met at {', '.join(met_at)} of the MACs removed, not at the rest"
                if met_at else "Target not met")
    paragraphs.append(f"**{headline}.** Best mean held-out cosine among the rows that "
                      "reached the MACs with at least one head pruned, without training: " + ". ".join(verdicts) + ".")
    return paragraphs


def markdown(outcome: dict) -> str:
    s, c = outcome["sentences"], outcome["config"]
    exports = outcome["exports"]
    rows = list(all_rows(outcome))
    notes = sorted({n for _, _, r in rows for n in r.get("notes", []) if not n.startswith("target macs")})
    verification = collections.Counter(
        ("passed" if r["verification"].get("checker") == "passed" and r["verification"].get("onnxruntime") == "passed"
         else f"checker {r['verification'].get('checker')}, onnxruntime {r['verification'].get('onnxruntime')}")
        for _, _, r in rows if "cos_mean" in r and r["verify"])
    shapes = next((r["input_shapes"] for _, _, r in rows if r.get("input_shapes")), {})
    lines = [
        TITLE, "",
        f"{outcome['date']}, onnxprune at {outcome['commit']} plus the uncommitted working tree. Machine: "
        f"{outcome['machine']}, Python {outcome['python']}, torch {outcome['torch']}, transformers "
        f"{outcome['transformers']}, onnxruntime {outcome['onnxruntime']}. Wall time {outcome['wall_seconds']:.0f} s.",
        "",
        f"Command: `{COMMAND}` (all numbers in benchmarks/results/bert_fidelity.json).", "",
        f"The legacy export of paraphrase-MiniLM-L3-v2 ({MINILM}) was rebuilt as a `transformers.BertModel` "
        f"({c['num_hidden_layers']} layers, {c['num_attention_heads']} heads, hidden {c['hidden_size']}, FFN "
        f"{c['intermediate_size']}, vocabulary {c['vocab_size']}, all read from the graph; weights "
        + ", ".join(f"{v} {k}" for k, v in outcome["weight_mapping"].items())
        + f"); it reproduces the ONNX model's token outputs within {outcome['torch_vs_onnx_max_abs_diff']:.1e} "
        "(max abs, real tokens of all the sentences below). It was exported twice, batch and sequence dynamic: "
        + "; ".join(f"{name}: {info['how']} ({sum(info['ops'].values())} nodes, within "
                    f"{info['vs_original_onnx_max_abs_diff']:.1e} of the original)" for name, info in exports.items())
        + ". Each export is pruned without `--input-shape` by `prune(target_macs=T, heads=0.0, ...)`: whole heads and "
        "FFN neurons share one ratio found by bisection, or get per-group ratios from sensitivity curves; the "
        f"384-wide residual stream is not a target. MACs are counted by the tool at its default dims "
        f"({', '.join(f'{k} {v}' for k, v in shapes.items())}), where the attention score products are a small "
        "share.", "",
        f"Sentences: the {s['calibration']} of benchmarks/calibration_data.py calibrate, in "
        f"{s['calibration_batches']} batches of {CALIB_BATCH} padded to their longest ({s['calibration_tokens']} real "
        f"tokens in {s['calibration_positions_padded']} positions; the tool leaves padding out of its statistics). "
        f"The {s['evaluation']} of benchmarks/real_fidelity.py, disjoint from them ({s['evaluation_lengths'][0]} to "
        f"{s['evaluation_lengths'][1]} tokens), are held out. Metric: cosine between the pruned and the unpruned "
        "export's mean-pooled (attention-mask weighted) sentence embeddings, mean / min over the held-out sentences; "
        "the same mean over the calibration sentences is given as a check for overfitting. Vocabulary check on the "
        f"original: its 4 paraphrase pairs among the held-out sentences sit at a cosine of "
        f"{outcome['vocabulary_check']['paraphrase_pairs']:.2f}, all other pairs at "
        f"{outcome['vocabulary_check']['other_pairs']:.2f}.", "",
        f"Larger calibration set (rows marked 'pydoc calibration'): the {s['large_calibration_from_pydoc']} "
        "plain-English sentences that benchmarks/calibration_text.py cuts from Python's own documentation "
        "(`pydoc_data.topics`, shipped with CPython) plus the 64, sorted by length into "
        f"{s['large_calibration_batches']} batches of {CALIB_BATCH} ({s['large_calibration_tokens']} real tokens in "
        f"{s['large_calibration_positions_padded']} positions), disjoint from the held-out sentences. "
        "'1 head/layer + sensitivity FFN' rows: `prune(target_macs=T, heads=1/12, sensitivity=curves, "
        "importance='recon', recover='lsq')`: one head in twelve is cut in every layer (a heads ratio given "
        "with a target is cut as given), and the FFN widths that make up the rest of the target come from "
        "sensitivity curves measured with lsq on every sentence of the larger set "
        f"(ratios {'/'.join(map(str, LARGE_SENSITIVITY_RATIOS))}), with the default `min_keep` 0.25 and with "
        "0.05; nothing in them is chosen on the held-out sentences.", ""
        "Methods: `l2` (no data, no recovery); `recon + lsq` (`importance='recon', recover='lsq'`); `recon + refit` "
        "(`recover='refit'`, the sequential refit); `sensitivity, X`: `analyze_sensitivity` on the calibration data "
        "with heads (ratios 0.25/0.5/0.75, X's criterion and recovery applied in every trial), then "
        "`prune(..., sensitivity=result)` with X, where X is the best of the rows above at that target. Prune seconds "
        "include the tool's verification; the analysis time is shared by the targets that use the same X.", "",
        *table(outcome), "",
        *[p + "\n" for p in reading(outcome)],
        "Verification of the verified rows: " + ", ".join(f"{n} {k}" for k, n in verification.items())
        + ". Notes the tool gave (all rows): " + ("; ".join(notes) if notes else "none") + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true",
                        help="print only: leave benchmarks/results/bert_fidelity.json and docs/fidelity.md alone")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write the docs section again from benchmarks/results/bert_fidelity.json")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the measurements to FILE (with --no-write too)")
    parser.add_argument("--save-exports", type=Path, default=None, metavar="DIR",
                        help="keep the two torch exports in DIR")
    args = parser.parse_args()
    if args.render:
        outcome = json.loads(RESULTS.read_text())
    else:
        import torch
        import transformers

        outcome = {"date": dt.date.today().isoformat(), "commit": commit(), "machine": machine(),
                   "python": platform.python_version(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "onnxruntime": ort.__version__, "command": COMMAND,
                   "targets_macs_kept": list(TARGETS), "goals": {str(k): v for k, v in GOALS.items()}}
        outcome.update(measure(args.save_exports))
        if args.json is not None:
            args.json.write_text(json.dumps(outcome, indent=1, default=str) + "\n")
            log(f"wrote {args.json}")
        if not args.no_write:  # the measurements first: they are what took the time
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(outcome, indent=1, default=str) + "\n")
            log(f"wrote {RESULTS.relative_to(ROOT)}")
    text = markdown(outcome)
    print(text)
    if not args.no_write:
        write_section(DOC, TITLE, text)
        log(f"wrote the section {TITLE[3:]!r} of {DOC.relative_to(ROOT)}")
    log(f"wall time of the measurements {outcome['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
