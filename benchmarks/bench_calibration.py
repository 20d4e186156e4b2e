"""Benchmark: magnitude vs activation criteria vs sensitivity allocation, with and without recovery.

Four real models on real inputs (benchmarks/calibration_data.py; calibration and evaluation
inputs disjoint), every variant of a model pruned to the same MAC target:

- fashion: the Fashion-MNIST CNN trained here (benchmarks/fashion_mnist.py);
- cls: the PP-OCR text-angle classifier on page()/text() crops, upright and turned 180 degrees;
- rec: the PP-OCRv4 recognizer on page()/text() crops (CTC probabilities, greedy readings);
- minilm: paraphrase-MiniLM-L3-v2 on English sentences (mean-pooled embeddings), heads included.

Variants: `target_macs=T` with one ratio for every group, for each criterion (l2, act, wanda,
recon) and recovery; then per-group ratios from analyze_sensitivity() on the calibration data
with l2 and with the best data criterion, without and with the best recovery. Prints
markdown and, unless --no-write, replaces the "## Calibration" section of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_calibration.py [--models fashion,cls,rec,minilm] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import calibration_data as cd  # noqa: E402
import fashion_mnist as fm  # noqa: E402
from machine_info import machine  # noqa: E402
from real_fidelity import MINILM, OCR_REC, TOKEN_OUTPUT, cosine, ctc_text, mean_pool, minilm_tokenizer  # noqa: E402
from real_models import fetch  # noqa: E402

from onnxprune import prune  # noqa: E402
from onnxprune.sensitivity import analyze_sensitivity  # noqa: E402

OCR_CLS = "rapidocr_cls_ppocr_mobile_v2.onnx"
CRITERIA = ("l2", "act", "wanda", "recon")
DATA_CRITERIA = CRITERIA[1:]
SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results" / "calibration.json"


@dataclass
class Metric:
    key: str
    header: str
    fmt: str  # format spec of one value


@dataclass
class Case:
    """One model with its data, its target and how a pruned copy is scored."""

    key: str
    title: str
    model: Path | onnx.ModelProto
    target: float  # fraction of MACs kept by every variant
    recoveries: tuple[str, ...]
    calib: list[dict]  # calibration feeds (batches)
    evaluate: Callable[[onnx.ModelProto | Path], dict]  # metrics of a model on the evaluation set
    metrics: list[Metric]
    primary: str  # the metric (higher is better) that picks the best criterion and recovery
    data: str  # what the inputs are, for the doc
    input_shapes: dict = field(default_factory=dict)
    heads: bool = False
    max_groups: int | None = None  # sensitivity: measure only the groups holding most MACs


def session(model) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def as_source(model):
    """What prune() takes: a path as a string, a ModelProto as it is (prune copies it)."""
    return model if isinstance(model, onnx.ModelProto) else str(model)


def batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def distinct_dims(path: Path) -> onnx.ModelProto:
    """The model with its inputs' dims named '?' renamed apart.

    Paddle's exporter writes '?' for every unknown dim; read as a symbol, it says that height
    equals width, and onnxprune's calibration check then refuses any non-square input (onnxruntime
    does not check it). Renaming keeps the dims dynamic.
    """
    model = onnx.load(str(path))
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param == "?":
                dim.dim_param = f"{value.name}_dim{axis}"
    return model


# ---- the models and their data --------------------------------------------------------------

def fashion_case() -> Case:
    model = fm.trained_cnn()
    train_x, _ = fm.load("train")
    test_x, test_y = fm.load("t10k")
    chosen = np.random.default_rng(0).choice(len(train_x), 512, replace=False)

    def logits(m):
        run = session(m)
        return np.concatenate([run.run(None, {"images": b})[0] for b in batches(test_x, 1000)])

    reference = logits(model)

    def evaluate(m):
        out = reference if m is model else logits(m)
        return {"accuracy": float((out.argmax(1) == test_y).mean()), "cosine": float(cosine(out, reference).mean())}

    return Case("fashion", "Fashion-MNIST CNN", model, 0.5, ("none", "bias", "bias,bn", "lsq,bn"),
                [{"images": b} for b in batches(train_x[chosen], 64)], evaluate,
                [Metric("accuracy", "accuracy", ".4f"), Metric("cosine", "logit cosine", ".4f")], "cosine",
                "benchmarks/fashion_mnist.py's CNN (conv 32/64/128 with BatchNorm, linear 128, 10 classes; "
                "2 epochs, seed 0). Calibration: 512 training images (random, seed 0); evaluation: the 10,000 "
                "test images, top-1 accuracy and the mean cosine of the logits to the original's.")


def cls_case() -> Case:
    model = distinct_dims(fetch(OCR_CLS))
    crops = cd.ocr_crops(aspect=4.0, stride=1.0)  # 4:1 windows fill the 48x192 input

    def inputs(half):
        upright = np.stack([cd.paddle_input(c, 48, 192)[0] for c in crops[half]])
        turned = np.stack([cd.paddle_input(c[::-1, ::-1], 48, 192)[0] for c in crops[half]])
        return np.concatenate([upright, turned]), np.r_[np.zeros(len(upright)), np.ones(len(turned))]

    calib_x, _ = inputs("calib")
    eval_x, eval_y = inputs("eval")

    def probs(m):
        run = session(m)
        return np.concatenate([run.run(None, {"x": b})[0] for b in batches(eval_x, 32)])

    reference = probs(model)

    def evaluate(m):
        out = reference if m is model else probs(m)
        return {"accuracy": float((out.argmax(1) == eval_y).mean()),
                "agree": float((out.argmax(1) == reference.argmax(1)).mean()),
                "prob_diff": float(np.abs(out[:, 1] - reference[:, 1]).mean())}

    return Case("cls", f"PP-OCR text-angle classifier ({OCR_CLS})", model, 0.8,
                ("none", "bias", "bias,bn", "lsq,bn"), [{"x": b} for b in batches(calib_x, 1)], evaluate,
                [Metric("accuracy", "accuracy", ".3f"), Metric("agree", "same class as original", ".3f"),
                 Metric("prob_diff", "mean abs. change of p(180)", ".4f")], "agree",
                f"Windows 4 line heights wide (stride 1 height) over page()'s text lines, plus text()'s "
                f"handwritten boxes: {len(crops['calib'])} calibration crops (title, body lines 2 and 4, code "
                f"line, 2 text() boxes) and {len(crops['eval'])} evaluation crops (body lines 1, 3, 5, 2 text() "
                "boxes), each upright (label 0) and turned 180 degrees (label 1), so "
                f"{len(calib_x)} / {len(eval_x)} inputs. PaddleOCR's cls preprocessing: height 48 keeping the "
                "aspect ratio, width capped at 192, (x/255-0.5)/0.5, zero padding. The input dims that Paddle "
                "names '?' are renamed apart first (`distinct_dims`), and calibration feeds one crop per "
                "batch: see the notes below the tables.",
                input_shapes={"x": [1, 3, 48, 192]})


def rec_case() -> Case:
    model = distinct_dims(fetch(OCR_REC))
    crops = cd.ocr_crops(aspect=6.0, stride=1.0)  # 6:1 windows nearly fill the 48x320 input
    metadata = {p.key: p.value for p in model.metadata_props}
    characters = ["<blank>", *metadata["character"].split("\n"), " "]

    def inputs(half):
        pairs = [cd.paddle_input(c, 48, 320) for c in crops[half]]
        return np.stack([x for x, _ in pairs]), [w for _, w in pairs]

    calib_x, _ = inputs("calib")
    eval_x, widths = inputs("eval")

    def probs(m):
        run = session(m)
        return np.concatenate([run.run(None, {"x": b})[0] for b in batches(eval_x, 8)])

    reference = probs(model)
    steps = reference.shape[1]
    covered = [int(np.ceil(steps * w / 320)) for w in widths]  # steps past the crop see padding only
    readings = [ctc_text(p, characters) for p in reference]

    def evaluate(m):
        out = reference if m is model else probs(m)
        crop_cos = [cosine(a[:n].ravel(), b[:n].ravel()) for a, b, n in zip(reference, out, covered)]
        same = sum(ctc_text(p, characters) == r for p, r in zip(out, readings))
        return {"cos_mean": float(np.mean(crop_cos)), "cos_min": float(np.min(crop_cos)), "same": same}

    return Case("rec", f"PP-OCRv4 recognizer ({OCR_REC})", model, 0.7, ("none", "bias", "lsq"),
                [{"x": b} for b in batches(calib_x, 1)], evaluate,
                [Metric("cos_mean", "CTC prob. cosine mean", ".4f"), Metric("cos_min", "min", ".4f"),
                 Metric("same", f"same reading (of {len(eval_x)})", "d")], "cos_mean",
                f"Windows 6 line heights wide (stride 1 height) over page()'s text lines, plus text()'s "
                f"handwritten boxes, split by line as for cls: {len(calib_x)} calibration crops, {len(eval_x)} "
                "evaluation crops. PaddleOCR's rec preprocessing at 48x320. Cosine of the CTC probabilities over "
                "the steps the crop covers; 'same reading': greedy CTC decoding unchanged. Inputs prepared as for "
                "cls.",
                input_shapes={"x": [1, 3, 48, 320]})


def minilm_case() -> Case:
    model = fetch(MINILM)
    tokenizer = minilm_tokenizer()
    calib_text, eval_text = cd.SENTENCES[0::2], cd.SENTENCES[1::2]

    def feeds(sentences):
        batch = tokenizer(sentences, padding=True, return_tensors="np")
        return {"input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64)}

    # One sentence per calibration batch: no padding tokens in the activation statistics.
    calib = [feeds([s]) for s in calib_text]
    eval_feeds = feeds(eval_text)
    mask = eval_feeds["attention_mask"]

    def embeddings(m):
        (tokens,) = session(m).run([TOKEN_OUTPUT], eval_feeds)
        return mean_pool(tokens, mask)

    reference = embeddings(model)

    def evaluate(m):
        sentence_cos = cosine(reference if m is model else embeddings(m), reference)
        return {"cos_mean": float(sentence_cos.mean()), "cos_min": float(sentence_cos.min())}

    return Case("minilm", f"paraphrase-MiniLM-L3-v2 ({MINILM})", model, 0.75, ("none", "bias", "lsq"), calib,
                evaluate, [Metric("cos_mean", "sentence cosine mean", ".4f"), Metric("cos_min", "min", ".4f")],
                "cos_mean",
                f"{len(cd.SENTENCES)} English sentences written for this benchmark (benchmarks/calibration_data.py), "
                f"alternating: {len(calib)} for calibration (one per batch, so no padding), {len(eval_text)} for "
                "evaluation (one padded batch). Tokens from the uncased WordPiece vocabulary as in "
                "real_fidelity.py. Compared: mean-pooled sentence embeddings (padding excluded). Heads are "
                "prunable groups here (`heads=0.0` switches head analysis on; the MAC target then spreads one "
                "ratio over heads and MLP neurons alike); MACs at batch 1, sequence 64.",
                heads=True)


CASES = {"fashion": fashion_case, "cls": cls_case, "rec": rec_case, "minilm": minilm_case}


# ---- running the variants -------------------------------------------------------------------

def run_variant(case: Case, allocation: str, crit: str, recover: str, sensitivity=None, target=None) -> dict:
    needs_data = crit != "l2" or recover != "none"
    started = time.perf_counter()
    result = prune(as_source(case.model), target_macs=target or case.target, importance=crit, recover=recover,
                   calib=case.calib if needs_data else None, sensitivity=sensitivity,
                   heads=0.0 if case.heads else None, input_shapes=case.input_shapes,
                   latency_runs=0, verify=False)
    seconds = time.perf_counter() - started
    macs = result.report["macs"]
    row = {"allocation": allocation, "criterion": crit, "recover": recover,
           "macs": macs["after"] / macs["before"], "seconds": seconds, **case.evaluate(result.model),
           "notes": [n for n in result.report["notes"] if re.search("lsq|bias|BatchNorm|fall", n)]}
    print(f"  {allocation:11s} {crit:6s} {recover:8s} MACs {row['macs']:.3f} "
          + " ".join(f"{m.key}={row[m.key]:{m.fmt}}" for m in case.metrics) + f"  {seconds:.1f}s", flush=True)
    for note in row["notes"]:
        print(f"      note: {note}", flush=True)
    return row


def run_case(case: Case) -> dict:
    print(f"== {case.title}: target MACs {case.target}", flush=True)
    base = case.evaluate(case.model)
    rows = [run_variant(case, "uniform", crit, recover) for crit in CRITERIA for recover in case.recoveries]
    # The best data criterion and recovery, judged on the uniform rows (on the evaluation set).
    best = {}
    for group_by, choices in (("criterion", DATA_CRITERIA), ("recover", case.recoveries[1:])):
        best[group_by] = max(choices, key=lambda c: np.mean([r[case.primary] for r in rows if r[group_by] == c]))
    # Curves measured plainly, and measured with the best recovery applied in every trial.
    scans = {}
    for recover in ("none", best["recover"]):
        started = time.perf_counter()
        scans[recover] = analyze_sensitivity(as_source(case.model), calibration=case.calib,
                                             ratios=SENSITIVITY_RATIOS, importance="l2",
                                             input_shapes=case.input_shapes or None, heads=case.heads,
                                             max_groups=case.max_groups,
                                             recover=() if recover == "none" else recover)
        scans[recover].wall = time.perf_counter() - started
        print(f"  sensitivity ({recover}): {len(scans[recover].rows)} trials, {scans[recover].groups_total} groups, "
              f"{scans[recover].wall:.1f}s; {scans[recover].data}; {scans[recover].notes}", flush=True)
    sens = scans["none"]
    # One uniform ratio cannot hit T exactly (channel counts are whole): the sensitivity rows aim
    # at the MACs the uniform rows reached, so that every row of the table costs the same.
    reached = float(np.median([r["macs"] for r in rows]))
    for crit in ("l2", best["criterion"]):
        for allocation, recover, scan in (("sensitivity", "none", "none"), ("sensitivity", best["recover"], "none"),
                                          ("sensitivity+rec", best["recover"], best["recover"])):
            rows.append(run_variant(case, allocation, crit, recover, sensitivity=scans[scan], target=reached))
    measured = len({t.key for t in sens.rows})
    return {"case": case, "base": base, "rows": rows, "best": best,
            "sensitivity": f"{measured} of {sens.groups_total} groups x ratios {', '.join(map(str, SENSITIVITY_RATIOS))}, "
                           f"{sens.data}; {scans['none'].wall:.0f} s plain, {scans[best['recover']].wall:.0f} s "
                           f"with {best['recover']} in every trial"}


# ---- the markdown -----------------------------------------------------------------------------

def table(outcome: dict) -> list[str]:
    case, rows = outcome["case"], outcome["rows"]
    headers = ["allocation", "criterion", "recovery", "MACs kept", *(m.header for m in case.metrics), "prune s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    base = outcome["base"]
    lines.append("| original | | | 1.000 | " + " | ".join(f"{base[m.key]:{m.fmt}}" for m in case.metrics) + " | |")
    for r in rows:
        cells = [r["allocation"], r["criterion"], r["recover"], f"{r['macs']:.3f}",
                 *(f"{r[m.key]:{m.fmt}}" for m in case.metrics), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(outcome: dict) -> str:
    """The measured facts of a table in one sentence: the best row against plain magnitude."""
    case, rows = outcome["case"], outcome["rows"]
    key = case.primary
    plain = next(r for r in rows if r["allocation"] == "uniform" and r["criterion"] == "l2" and r["recover"] == "none")
    winner = max(rows, key=lambda r: r[key])
    header = next(m.header for m in case.metrics if m.key == key)
    macs = [r["macs"] for r in rows]
    return (f"Best {header}: {winner['allocation']} / {winner['criterion']} / {winner['recover']} at "
            f"{winner[key]:.4f}, against {plain[key]:.4f} for plain magnitude (uniform / l2 / none). Best data "
            f"criterion over the uniform rows: {outcome['best']['criterion']}; best recovery: "
            f"{outcome['best']['recover']}. MACs kept across rows: {min(macs):.3f} to {max(macs):.3f}.")


def markdown(outcomes: list[dict], command: str, findings: dict, date: str, machine_text: str) -> str:
    lines = [f"## Calibration: criteria, allocation and recovery on real models ({date})", "",
             f"Machine: {machine_text}. Command: `{command}`.", "",
             "Every row of a table is pruned to the same MAC target with `prune(target_macs=T)`. `uniform`: "
             "one ratio for every group (found by bisection), channels chosen by the criterion. "
             "`sensitivity`: per-group ratios from `analyze_sensitivity()` (each group pruned alone at "
             f"{', '.join(map(str, SENSITIVITY_RATIOS))} by l2, relative output error on the calibration data), "
             "then the criterion picks the channels. `sensitivity+rec`: the same, with the curves measured with "
             "the row's recovery applied in every trial (`analyze_sensitivity(recover=...)`). "
             "Criteria and recovery as in the README's \"Calibration data\". "
             "The best data criterion and recovery used in the sensitivity rows are picked on the uniform rows' "
             "evaluation scores, which favours them slightly. Calibration and evaluation inputs never overlap. "
             "No fine-tuning anywhere.", ""]
    for outcome in outcomes:
        case = outcome["case"]
        lines += [f"### {case.title}, MACs target {case.target}", "", case.data,
                  f" Sensitivity: {outcome['sensitivity']}.", "", *table(outcome), "",
                  "**Reading it.** " + summary(outcome) + (" " + findings[case.key] if case.key in findings else ""),
                  ""]
    return "\n".join(lines + NOTES)


# Why the tables look as they do. Written after reading this run's tables and the checks named in
# the text (benchmarks/calibration_checks.py, same data); rerun those checks if the tables change.
FINDINGS: dict[str, str] = {
    "fashion": (
        "Recovery is the lever and the criterion matters little next to it: lsq,bn lifts every criterion to "
        "82.4-83.9% accuracy (the original has 85.5%) and a logit cosine of 0.994-0.998. lsq now refits all "
        "four consumer layers, the 3x3 convolutions through their input patches; when it could refit only the "
        "Gemm and the 1x1-shaped layers (the previous run of this benchmark), the same rows reached 66.7-74.0% "
        "and 0.93-0.95. `bias` alone lowers the accuracy of wanda and recon while it raises their cosine (the "
        "two metrics disagree); `bn` on top of it adds 0.13 to 0.42 of accuracy. A check of the BatchNorm fits "
        "shows why it pays here: the pruned channels still follow the original ones (median correlation "
        "0.85-0.90) at a shifted scale (median gain 1.01-1.10), which a per-channel affine map can undo. "
        "Sensitivity allocation without recovery is the worst row: the plan keeps conv1 23/32, conv2 64/64, "
        "the Gemm 128/128 and cuts conv3 to 34/128, near the 25% floor, where uniform keeps about 69% "
        "everywhere; conv3 measured alone looked cheap per MAC, but not that far. With lsq,bn every "
        "allocation lands at 82-84%: once every layer is refitted, where the channels come from matters "
        "little on this model, and curves measured with recovery do not change that."),
    "cls": (
        "Uniform allocation breaks this classifier unless lsq runs: agreement stays between 0.44 and 0.64 "
        "(chance is 0.5) for every criterion with none, bias or bias,bn. One ratio takes about 12% of each of "
        "the 26 groups, including the narrow early ones (1 of 8 channels) and the 32-channel expansion conv "
        "that the sensitivity scan finds worst (25% removed alone: relative output error 0.35). lsq, which "
        "rebuilds a layer's output from all its remaining inputs, brings uniform rows to 0.77-0.81. "
        "BatchNorm correction helps little here and not reliably (bias -> bias,bn: the mean change of p(180) "
        "drops for three criteria of four; agreement falls by 0.12 for act and moves by under 0.04 for the "
        "others), and a check shows why: the fitted per-channel gains are "
        "close to 1 (median 1.02), so scale and mean are not what is wrong; the pruned channels have lost "
        "information (median correlation with the original channel 0.71, 0.3-0.4 at the last BatchNorms), and "
        "no per-channel affine map brings that back. On the calibration crops themselves bias,bn is no better "
        "than bias either (mean change of p(180) 0.46 vs 0.43 with l2; with act 0.35 vs 0.37 but agreement 0.63 vs "
        "0.71), so this is not a calibration/evaluation mismatch. The earlier form of `bn` (matching the pruned input's variance to the original's) did worse "
        "still, lowering agreement for every criterion in the previous run of this table: it rescales the whole "
        "pruned channel, error included, to the original's variance. Sensitivity allocation keeps every early group whole and takes the "
        "MACs from the three 200-channel convs at the end; with the curves measured with lsq,bn in every "
        "trial, act gives the best row of the table: agreement 0.845, accuracy 0.929 against the original's "
        "0.917, and a mean change of p(180) of 0.08. lsq is skipped for 11 layers that see one row per image "
        "(after global pooling, squeeze-excite) and fall back to bias."),
    "rec": (
        "Data plus recovery beats plain magnitude by a wide margin, and the recovery is the lever: lsq lifts "
        "every criterion to 0.93-0.96, l2 included; the data criteria add a little on top and read more crops "
        "the same. Without recovery plain l2 wipes the readings out, and every data criterion roughly triples "
        "its cosine. Sensitivity curves measured without recovery mislead the allocation once lsq runs: with "
        "l2 they take all the MACs from three groups cut to the 25% floor (conv groups 48/128, 60/240, 121/480; "
        "every other group whole), and the result, 0.770, is well below uniform's 0.934; a layer that lost "
        "three quarters of its inputs cannot be refitted back as well as many that lost a sixth. Measured with "
        "lsq in every trial (`sensitivity+rec`), the curves see that, and the same criterion gives 0.937, level "
        "with uniform; with recon, 0.957. Measuring with lsq in every trial took 217 s, the plain scan 160 s. "
        "lsq falls back to bias for 6 layers with fewer than 4 calibration rows per input (45 crops)."),
    "minilm": (
        "Data criteria beat magnitude clearly even without recovery (+0.06 to +0.07 mean cosine), and "
        "sensitivity allocation is the larger lever: it lifts plain l2 by about 0.1, level with the best "
        "uniform row, and with recon and bias it gives the best row. `lsq` rows equal `bias` rows exactly: the "
        "refit was skipped for all 6 consumer layers for lack of rows (the 32 calibration sentences hold 443 "
        "tokens; a refit needs 4 per input, 1,536 tokens for the 384-wide attention output and 6,144 for the "
        "1,536-wide FFN output). Refitting anyway overfits (check few-rows: sentence cosine 0.79 with the "
        "usual ridge, 0.92 and 0.95 with ridges 100 and 1,000 times stronger, 0.960 at 10,000 times, barely "
        "above bias's 0.956; on the classifier every such refit lowers agreement, 0.63-0.75 against 0.77), so "
        "the 4-rows rule stays. Curves measured with bias in every trial gave slightly lower scores "
        "(0.957 and 0.972 against 0.961 and 0.983). A check of the two plans: both cut the last FFN to 384 of "
        "1,536 neurons and then take 624 neurons from one more FFN; the plain curves pick layer 0's, the "
        "bias curves layer 1's, whose curves differ by under 0.01 (0.145 vs 0.146 at half removed). The "
        "evaluation sentences prefer layer 0: on 32 calibration sentences that choice is a coin toss."),
}


# What running it taught about onnxprune (both fixed in onnxprune since the first run).
NOTES = [
    "### Notes on running it", "",
    "- Paddle's exporter names every unknown input dim `?`; the calibration check first read that as one "
    "symbol (height had to equal width). `?` is now anonymous. The script still renames the dims apart in a "
    "copy of the model (`distinct_dims`), which changes nothing now.",
    "- With `input_shapes` fixing batch 1, calibration batches of more than one sample failed inside "
    "onnxruntime, because statistics were collected on the shape-fixed model. The inputs are now left free "
    "while statistics are collected; the script still feeds one crop per batch.",
    "- The measurements are saved in benchmarks/results/calibration.json; `--render` rewrites this section "
    "from them without measuring again. The checks the text cites (BatchNorm fits, the classifier on its "
    "calibration crops, the MiniLM plans, the plans' group widths) are in benchmarks/calibration_checks.py.", "",
]


def write_section(text: str) -> None:
    """Replace every section whose title starts with '## Calibration' (or append one)."""
    old = DOC.read_text() if DOC.exists() else ""
    parts = re.split(r"(?m)^(?=## )", old)
    kept = [p for p in parts if not p.startswith("## Calibration")]
    body = "".join(kept).rstrip("\n")
    DOC.write_text(body + "\n\n" + text.rstrip("\n") + "\n")


def to_record(outcome: dict) -> dict:
    """An outcome as JSON: the measurements and what the markdown needs of its case."""
    case = outcome["case"]
    return {"case": {"key": case.key, "title": case.title, "target": case.target, "data": case.data,
                     "primary": case.primary, "metrics": [vars(m) for m in case.metrics]},
            **{k: outcome[k] for k in ("base", "rows", "best", "sensitivity")}}


def from_record(record: dict) -> dict:
    c = record["case"]
    case = SimpleNamespace(**{**c, "metrics": [Metric(**m) for m in c["metrics"]]})
    return {**record, "case": case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the measurements are saved as JSON")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the section from --results (after editing FINDINGS)")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.results.read_text())
        outcomes, command = [from_record(r) for r in saved["outcomes"]], saved["command"]
        date, machine_text = saved["date"], saved["machine"]
    else:
        chosen = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in CASES]
        if unknown:
            parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        started = time.perf_counter()
        outcomes = [run_case(CASES[m]()) for m in chosen]
        command = ".venv/bin/python benchmarks/bench_calibration.py" + \
            ("" if chosen == list(CASES) else f" --models {','.join(chosen)}")
        date, machine_text = dt.date.today().isoformat(), machine()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"command": command, "date": date, "machine": machine_text,
                                            "outcomes": [to_record(o) for o in outcomes]},
                                           indent=1, default=float) + "\n")
        print(f"total {time.perf_counter() - started:.0f} s; measurements in {args.results}")
    text = markdown(outcomes, command, FINDINGS, date, machine_text)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
