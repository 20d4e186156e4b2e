"""Train a tiny Llama-shaped byte-level decoder on Python's own documentation, offline, on CPU.

No trained decoder can be downloaded here, so this builds one: a `transformers.LlamaConfig`
decoder (hidden 256, 4 layers, 8 query heads sharing 4 key/value heads (GQA), SwiGLU MLP of
688, RMSNorm, RoPE, untied embeddings, vocabulary 256: the UTF-8 bytes, no tokenizer) trained
with AdamW on the text of `pydoc_data.topics`, which ships with every CPython (the corpus of
benchmarks/calibration_text.py: the language reference's chapters, about 465,000 characters).

Data splits (`splits()`, also used by bench_decoder_fidelity.py): the topics are joined in
sorted order (as calibration_text.py does), cut into paragraphs at blank lines, and consecutive
paragraphs are grouped into chunks of at least CHUNK_BYTES bytes. Chunk i goes to calibration
when i % 10 == CALIB_SLOT, to held-out when i % 10 == HELDOUT_SLOT, else to train (about
80/10/10, interleaved so that every split sees every part of the reference). The three are
disjoint text spans; in addition, a calibration or held-out paragraph whose exact text also
occurs in train (the topics repeat some boilerplate) is dropped, and so is a held-out paragraph
that occurs in calibration. Each split is the UTF-8 bytes of its paragraphs joined by blank lines.

Training: random windows of SEQ+1 bytes from the train split, batch BATCH, a fixed number of
steps (STEPS, sized for about 10 minutes on one thread), linear warm-up then cosine decay,
gradient clipping, fixed seed. Evaluation: next-byte cross-entropy (nats per byte) on the
held-out split cut into non-overlapping windows of SEQ bytes, every position after the first
predicted from the window's bytes before it (`heldout_windows()`).

Artifacts in ~/.cache/onnxprune-bench/tiny_decoder/ (override with ONNXPRUNE_BENCH_CACHE):
model.pt (state_dict), meta.json (config, splits, training log, held-out cross-entropy) and
tiny_decoder.onnx: torch.onnx.export(dynamo=True), inputs input_ids and attention_mask
[batch, sequence] (int64, both dims dynamic), output logits [batch, sequence, 256], no kv cache.
Training is skipped when model.pt is there (unless --retrain); the export is redone when the
ONNX file is missing or with --reexport.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/train_tiny_decoder.py [--retrain] [--reexport]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

CACHE = Path(os.environ.get("ONNXPRUNE_BENCH_CACHE", Path.home() / ".cache" / "onnxprune-bench")) / "tiny_decoder"
ONNX_NAME = "tiny_decoder.onnx"

CONFIG = dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=688, hidden_act="silu", max_position_embeddings=512, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
              attention_dropout=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)

CHUNK_BYTES = 2048
CALIB_SLOT, HELDOUT_SLOT = 3, 7  # of every 10 chunks
SEQ = 128
BATCH = 16
STEPS = 800
LR, MIN_LR_FRACTION, WARMUP = 3e-3, 0.1, 60
WEIGHT_DECAY, CLIP = 0.1, 1.0
SEED = 0
MAX_MINUTES = 12.0  # hard wall-clock cap on the training loop (stops early, and says so)


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---- data -----------------------------------------------------------------------------------

def splits() -> dict:
    """{'train', 'calibration', 'heldout'}: bytes, plus 'info' (sizes, how they were cut)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p.strip()]
    chunks, current, size = [], [], 0
    for p in paragraphs:
        current.append(p)
        size += len(p.encode("utf-8")) + 2
        if size >= CHUNK_BYTES:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    parts = {"train": [], "calibration": [], "heldout": []}
    for i, chunk in enumerate(chunks):
        slot = i % 10
        name = "calibration" if slot == CALIB_SLOT else "heldout" if slot == HELDOUT_SLOT else "train"
        parts[name].extend(chunk)
    train_set = set(parts["train"])
    dropped = {}
    calib = [p for p in parts["calibration"] if p not in train_set]
    dropped["calibration"] = len(parts["calibration"]) - len(calib)
    calib_set = set(calib)
    held = [p for p in parts["heldout"] if p not in train_set and p not in calib_set]
    dropped["heldout"] = len(parts["heldout"]) - len(held)
    parts["calibration"], parts["heldout"] = calib, held
    out = {name: "\n\n".join(ps).encode("utf-8") for name, ps in parts.items()}
    out["info"] = {
        "source": "pydoc_data.topics (CPython %d.%d.%d), topics joined in sorted order" % sys.version_info[:3],
        "total_chars": len(text), "paragraphs": len(paragraphs), "chunks": len(chunks),
        "chunk_bytes_min": CHUNK_BYTES, "calibration_slot": CALIB_SLOT, "heldout_slot": HELDOUT_SLOT,
        "bytes": {name: len(out[name]) for name in parts},
        "paragraphs_per_split": {name: len(ps) for name, ps in parts.items()},
        "duplicate_paragraphs_dropped": dropped,
    }
    return out


def windows(data: bytes, seq: int = SEQ) -> np.ndarray:
    """Non-overlapping windows of `seq` bytes, [N, seq] int64 (the tail that does not fill one is left out)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    n = len(arr) // seq
    return arr[: n * seq].reshape(n, seq).astype(np.int64)


def heldout_windows(parts: dict | None = None) -> np.ndarray:
    return windows((parts or splits())["heldout"])


def cross_entropy(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Sum of next-byte cross-entropy (nats) over positions 1.., and the count; logits [B, S, V]."""
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    target = ids[:, 1:]
    picked = np.take_along_axis(logp, target[..., None], -1)[..., 0]
    return float(-picked.sum()), int(target.size)


# ---- model ----------------------------------------------------------------------------------

def build(seed: int = SEED):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()


def logits_module(model):
    """(input_ids, attention_mask) -> logits, no kv cache (as tests/test_llm_decoders.py)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits().eval()


def torch_heldout_ce(model, held: np.ndarray, batch: int = 32) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held), batch):
            ids = torch.from_numpy(held[i:i + batch])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            s, n = cross_entropy(logits.numpy(), held[i:i + batch])
            total, count = total + s, count + n
    return total / count


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(parts: dict) -> tuple[object, dict]:
    import torch

    model = build().train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95))
    data = np.frombuffer(parts["train"], dtype=np.uint8)
    held = heldout_windows(parts)
    rng = np.random.default_rng(SEED)
    history, started, steps_done, stopped_early = [], time.perf_counter(), 0, False
    for step in range(STEPS):
        starts = rng.integers(0, len(data) - SEQ - 1, BATCH)
        chunk = torch.from_numpy(np.stack([data[s:s + SEQ + 1] for s in starts]).astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        steps_done = step + 1
        elapsed = time.perf_counter() - started
        if step % 50 == 0 or step == STEPS - 1:
            entry = {"step": step, "loss": round(float(loss), 4), "lr": lr_at(step), "seconds": round(elapsed, 1)}
            if step % 200 == 0 or step == STEPS - 1:
                model.eval()
                entry["heldout_ce"] = round(torch_heldout_ce(model, held[:64]), 4)  # a quick look: 64 windows
                model.train()
            history.append(entry)
            log(f"step {step:5d}/{STEPS} loss {float(loss):.4f} lr {lr_at(step):.2e} {elapsed:6.0f}s"
                + (f"  held-out (64 windows) {entry['heldout_ce']:.4f}" if "heldout_ce" in entry else ""))
        if elapsed > MAX_MINUTES * 60:
            stopped_early = True
            log(f"stopping at step {steps_done}: past {MAX_MINUTES} minutes")
            break
    model.eval()
    info = {"steps_planned": STEPS, "steps_done": steps_done, "stopped_early": stopped_early,
            "seconds": round(time.perf_counter() - started, 1), "batch": BATCH, "seq": SEQ,
            "tokens_seen": steps_done * BATCH * SEQ, "lr": LR, "min_lr_fraction": MIN_LR_FRACTION, "warmup": WARMUP,
            "weight_decay": WEIGHT_DECAY, "betas": [0.9, 0.95], "clip_grad_norm": CLIP, "seed": SEED,
            "history": history}
    return model, info


def export(model, path: Path) -> None:
    import torch

    example = (torch.randint(0, 256, (2, SEQ)), torch.ones(2, SEQ, dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=CONFIG["max_position_embeddings"])
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(logits_module(model), example, dynamo=True,
                                    input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                    dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    program.save(str(path))


def onnx_heldout_ce(path: Path, held: np.ndarray, batch: int = 32) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    for i in range(0, len(held), batch):
        ids = held[i:i + batch]
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        s, n = cross_entropy(logits, ids)
        total, count = total + s, count + n
    return total / count


def ensure(retrain: bool = False, reexport: bool = False) -> tuple[Path, dict]:
    """The ONNX model's path and meta.json's content, training and exporting as needed."""
    import torch

    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    weights, meta_path, onnx_path = CACHE / "model.pt", CACHE / "meta.json", CACHE / ONNX_NAME
    parts = splits()
    log("splits (bytes): " + ", ".join(f"{k} {v}" for k, v in parts["info"]["bytes"].items())
        + f"; duplicate paragraphs dropped {parts['info']['duplicate_paragraphs_dropped']}")
    held = heldout_windows(parts)
    if weights.exists() and not retrain:
        log(f"trained weights found: {weights} (--retrain to train again)")
        model = build()
        model.load_state_dict(torch.load(weights, map_location="cpu"))
        model.eval()
        meta = json.loads(meta_path.read_text())
    else:
        model, info = train(parts)
        torch.save(model.state_dict(), weights)
        ce = torch_heldout_ce(model, held)
        meta = {"config": CONFIG, "splits": parts["info"], "training": info,
                "params": int(sum(p.numel() for p in model.parameters())),
                "heldout_windows": int(len(held)), "heldout_ce_torch": ce,
                "torch": torch.__version__}
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        reexport = True
    if reexport or not onnx_path.exists():
        started = time.perf_counter()
        export(model, onnx_path)
        meta["export_seconds"] = round(time.perf_counter() - started, 1)
        meta["heldout_ce_onnx"] = onnx_heldout_ce(onnx_path, held)
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        log(f"exported {onnx_path} in {meta['export_seconds']}s")
    return onnx_path, meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true", help="train again even when the weights are cached")
    parser.add_argument("--reexport", action="store_true", help="export the ONNX model again")
    args = parser.parse_args()
    path, meta = ensure(args.retrain, args.reexport)
    ce = meta["heldout_ce_torch"]
    print(f"model: {path} ({meta['params']:,} parameters)")
    print(f"training: {meta['training']['steps_done']} steps of {BATCH}x{SEQ} bytes in {meta['training']['seconds']}s")
    print(f"held-out next-byte cross-entropy ({meta['heldout_windows']} windows of {SEQ}): {ce:.4f} nats "
          f"({ce / math.log(2):.3f} bits/byte, perplexity {math.exp(ce):.2f}); ONNX export "
          f"{meta.get('heldout_ce_onnx', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
