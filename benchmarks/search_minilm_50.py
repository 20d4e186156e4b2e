"""paraphrase-MiniLM-L3-v2 at 50% of the MACs removed: a small configuration search chosen on
validation sentences, never on the held-out ones.

The starting point is bench_bert_fidelity.py's best row at target_macs=0.5 (held-out mean cosine
0.9273 on both exports): one head in twelve cut per layer, the FFN widths from sensitivity curves
measured with lsq on the larger calibration set (calibration_text.py's pydoc sentences plus the
64 of calibration_data.py), min_keep 0.05, importance recon, recover lsq.

1. The larger calibration set (pydoc sentences + the 64, deduplicated, in that order) is split
   deterministically: every 5th sentence (index % 5 == 4) is validation, the rest fit. The 24
   held-out sentences of real_fidelity.py are in neither.
2. A fixed grid of configurations is pruned on the legacy export only, calibrated (statistics,
   recovery and sensitivity curves) on the fitting part, and scored by the mean cosine of the
   mean-pooled sentence embeddings on the validation part. Curves are measured once per
   criterion (with lsq in every trial) and reused by every configuration with that criterion.
3. The configuration with the best validation mean (among those that reach the MACs with at
   least one head pruned; ties go to the earlier in the grid) is run again calibrated on the
   whole calibration set (curves measured again on it, for each export), and its held-out
   mean / min cosine is measured on the legacy and the dynamo export, as bench_bert_fidelity does.

Curves: with the heads cut as given (heads=k/12 with the target), the allocation reads only the
curves of the FFN groups (the heads groups are fixed, onnxprune/allocation/target.py), so the
curves are measured for the 3 groups holding the most MACs (max_groups=3: the three FFN groups,
checked below), each trial the same as in a full analysis. --round-to 1 is the tool's default
and holds for every configuration. "lsq,bias" does what "lsq" does where lsq fits (bias
compensation is lsq's fallback for layers it skips; onnxprune/recovery/compensate.py): it is in
the grid as a check. refit configurations use the lsq curves (refit in every trial is too slow).

Writes benchmarks/results/minilm_50_search.json and /tmp/minilm_50_section.md; prints the summary.

    nice -n 10 .venv/bin/python benchmarks/search_minilm_50.py [--quick] [--json FILE] [--section FILE]
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_bert_fidelity as bbf  # noqa: E402
import calibration_data  # noqa: E402
import calibration_text  # noqa: E402
import real_fidelity  # noqa: E402
from machine_info import machine  # noqa: E402
from real_fidelity import MINILM, commit, cosine  # noqa: E402

from onnxprune.sensitivity import analyze_sensitivity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minilm_50_search.json"
SECTION = Path("/tmp/minilm_50_section.md")
COMMAND = "nice -n 10 .venv/bin/python benchmarks/search_minilm_50.py"
TARGET = 0.5  # fraction of the MACs kept
GOAL = 0.93  # mean held-out sentence cosine asked for
VALIDATION_EVERY = 5  # every 5th sentence of the larger set (index % 5 == 4) validates
RATIOS = bbf.LARGE_SENSITIVITY_RATIOS  # 0.25/0.5/0.65/0.75/0.85/0.95, as bench_bert_fidelity
CURVE_GROUPS = 3  # the FFN groups (the heads are cut as given, their curves are not read)
CURVE_RECOVER = "lsq"  # recovery applied in every sensitivity trial
ONE, TWO = 1 / 12, 2 / 12


class Config:
    def __init__(self, label: str, importance: str, recover: str, heads: float, min_keep: float) -> None:
        self.label, self.importance, self.recover, self.heads, self.min_keep = (
            label, importance, recover, heads, min_keep)

    def as_dict(self) -> dict:
        return {"label": self.label, "importance": self.importance, "recover": self.recover,
                "heads_ratio": self.heads, "heads_cut_per_layer": round(self.heads * 12), "min_keep": self.min_keep,
                "round_to": 1, "curves": f"{self.importance}, {CURVE_RECOVER}"}


# The grid, fixed before any run. The first row is bench_bert_fidelity's best at 50%.
GRID = [
    Config("recon, lsq, 1 head/layer, min_keep 0.05", "recon", "lsq", ONE, 0.05),
    Config("recon, lsq, 1 head/layer, min_keep 0.0", "recon", "lsq", ONE, 0.0),
    Config("recon, lsq, 1 head/layer, min_keep 0.1", "recon", "lsq", ONE, 0.1),
    Config("recon, lsq, 2 heads/layer, min_keep 0.05", "recon", "lsq", TWO, 0.05),
    Config("recon, lsq+bias, 1 head/layer, min_keep 0.05", "recon", "lsq,bias", ONE, 0.05),
    Config("recon, refit, 1 head/layer, min_keep 0.05", "recon", "refit", ONE, 0.05),
    Config("act, lsq, 1 head/layer, min_keep 0.05", "act", "lsq", ONE, 0.05),
    Config("wanda, lsq, 1 head/layer, min_keep 0.05", "wanda", "lsq", ONE, 0.05),
]


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---- data ------------------------------------------------------------------------------------

def split_sentences(quick: bool, offset: int = VALIDATION_EVERY - 1
                    ) -> tuple[list[str], list[str], list[str], list[str]]:
    """(whole larger calibration set, fitting part, validation part, held-out 24): the sentences
    whose index % VALIDATION_EVERY is `offset` validate (the search's fold: the last)."""
    held_out = list(real_fidelity.SENTENCES)
    small = list(calibration_data.SENTENCES)
    whole = list(dict.fromkeys(calibration_text.pydoc_sentences() + small))  # as bench_bert_fidelity
    if quick:
        whole = whole[::8]
    assert not set(whole) & set(held_out), "calibration and held-out sentences overlap"
    fit = [s for i, s in enumerate(whole) if i % VALIDATION_EVERY != offset]
    val = [s for i, s in enumerate(whole) if i % VALIDATION_EVERY == offset]
    assert not set(fit) & set(val)
    return whole, fit, val, held_out


def batches(tokenizer, texts: list[str]) -> list[dict]:
    """Sorted by token length, batches of 8 padded to their longest (bench_bert_fidelity's larger set)."""
    lengths = {t: len(tokenizer(t)["input_ids"]) for t in texts}
    ordered = sorted(texts, key=lambda t: lengths[t])
    return [bbf.feeds(tokenizer, ordered[i:i + bbf.CALIB_BATCH]) for i in range(0, len(ordered), bbf.CALIB_BATCH)]


def tokens(feeds: list[dict]) -> int:
    return int(sum(f["attention_mask"].sum() for f in feeds))


def build_exports(workdir: Path, example_feed: dict, check_feeds: list[dict]) -> tuple[dict, dict]:
    """The legacy and dynamo exports of the rebuilt BertModel (bench_bert_fidelity's code, traced on
    the same 2 x 16 example), each checked against the original ONNX model on `check_feeds`."""
    import onnx
    import torch

    torch.set_num_threads(2)
    original = onnx.load(str(bbf.SHARED if bbf.SHARED.is_file() else real_fidelity.fetch(MINILM)))
    bert, config, _ = bbf.rebuild(original)
    module = bbf.encoder(bert)
    example = (torch.from_numpy(example_feed["input_ids"][:2, :16].copy()),
               torch.from_numpy(example_feed["attention_mask"][:2, :16].copy()))
    paths, info = {}, {}
    for name, (how, export) in bbf.EXPORTERS.items():
        path = paths[name] = workdir / f"minilm_l3_{name}.onnx"
        export(module, example, path)
        diffs = []
        for feed in check_feeds:
            ref = bbf.tokens_of(original, feed, real_fidelity.TOKEN_OUTPUT)
            out = bbf.tokens_of(path, feed, "last_hidden_state")
            real = feed["attention_mask"].astype(bool)
            diffs.append(float(np.abs(out[real] - ref[real]).max()))
        info[name] = {"how": how, "vs_original_onnx_max_abs_diff": max(diffs)}
        log(f"{name} export: {how}; vs the original ONNX (validation sentences): max abs diff {max(diffs):.1e}")
        if max(diffs) > 1e-4:
            raise RuntimeError(f"the {name} export does not reproduce the original model")
    del original, bert, module
    gc.collect()
    return paths, {"config": config, "exports": info}


# ---- curves and the grid -----------------------------------------------------------------------

def curves(path: Path, calib: list[dict], importance: str, quick: bool) -> tuple[object, dict]:
    started = time.perf_counter()
    scan = analyze_sensitivity(str(path), calibration=calib, importance=importance, heads=True,
                               recover=CURVE_RECOVER, ratios=RATIOS if not quick else (0.5, 0.85),
                               calib_limit=sum(len(f["input_ids"]) for f in calib), max_groups=CURVE_GROUPS)
    seconds = round(time.perf_counter() - started, 1)
    kinds = sorted({t.kind for t in scan.rows})
    info = {"importance": importance, "recover": CURVE_RECOVER, "seconds": seconds, "data": scan.data,
            "groups_total": scan.groups_total, "groups_measured": len({t.key for t in scan.rows}), "kinds": kinds,
            "notes": list(scan.notes),
            "trials": [{"key": t.key, "kind": t.kind, "channels": t.channels, "ratio": t.ratio, "removed": t.removed,
                        "rel_error": t.rel_error, "cosine_drop": t.cosine_drop, "error": t.error} for t in scan.rows]}
    if kinds != ["neurons"] or any(t.channels != 1536 for t in scan.rows):
        raise RuntimeError(f"the {CURVE_GROUPS} widest groups are not the FFN groups: {kinds}")
    log(f"  curves {importance}, {CURVE_RECOVER}: {len(scan.rows)} trials over {info['groups_measured']} of "
        f"{scan.groups_total} groups, {seconds}s")
    return scan, info


def curves_against_bench(name: str, importance: str, info: dict) -> dict | None:
    """The FFN trials measured here on the whole set against bench_bert_fidelity's stored ones
    (all 6 groups, the same data, recon with lsq), where it has them: the same trials should
    give the same numbers."""
    try:
        stored = json.loads(bbf.RESULTS.read_text())["exports"][name]["sensitivity"][f"{importance}, lsq, large"]
    except (OSError, KeyError, ValueError):
        return None
    theirs = {(t["key"], t["ratio"]): t["rel_error"] for t in stored["trials"]}
    diffs = [abs(t["rel_error"] - theirs[(t["key"], t["ratio"])]) for t in info["trials"]
             if (t["key"], t["ratio"]) in theirs]
    return {"trials_compared": len(diffs), "max_abs_diff_rel_error": max(diffs) if diffs else None}


def embeddings(model, feeds: list[dict]) -> np.ndarray:
    return bbf.embeddings_of(model, feeds)


def grid_row(cfg: Config, path: Path, order: dict, config: dict, fit: list[dict], val: list[dict],
             val_reference: np.ndarray, fit_reference: np.ndarray, scan) -> dict:
    """One configuration calibrated on the fitting part, scored on the validation part."""
    row = cfg.as_dict()
    started = time.perf_counter()
    result = bbf.attempt(path, row, target_macs=TARGET, heads=cfg.heads, importance=cfg.importance, calib=fit,
                         recover=cfg.recover, sensitivity=scan, min_keep=cfg.min_keep, round_to=1, latency_runs=0,
                         verify=True)
    row["prune_seconds"] = round(time.perf_counter() - started, 1)
    if result is None or "error" in row:
        log(f"  {cfg.label:46s} {row['error']}")
        return row
    val_cos = cosine(val_reference, embeddings(result.model, val))
    fit_cos = cosine(fit_reference, embeddings(result.model, fit))
    row.update(val_cos_mean=float(val_cos.mean()), val_cos_min=float(val_cos.min()),
               fit_cos_mean=float(fit_cos.mean()), **pruned_row(result, order, config))
    heads_kept = row["heads_kept"]
    row["seconds"] = round(time.perf_counter() - started, 1)
    log(f"  {cfg.label:46s} MACs {row['macs_kept']:.3f} heads {heads_kept} FFN {row['ffn_kept']} "
        f"validation {row['val_cos_mean']:.4f}/{row['val_cos_min']:.4f} (fit {row['fit_cos_mean']:.4f}) "
        f"{row['seconds']:.0f}s")
    return row


def pruned_row(result, order: dict, config: dict) -> dict:
    """What a configuration's table row records of its prune: MACs and params kept, heads and FFN
    neurons kept per layer, verification, and whether it qualifies (the MACs reached, a head pruned)."""
    report = result.report
    heads_kept = bbf.kept_per_layer(result.plan, "heads", order)
    heads_total = int(sum(d.group.channels for d in result.plan.decisions if d.group.kind == "heads"))
    row = dict(macs_kept=report["macs"]["after"] / report["macs"]["before"],
               params_kept=report["params"]["after"] / report["params"]["before"],
               heads_kept=heads_kept, heads_pruned=heads_total - int(sum(heads_kept)),
               ffn_kept=bbf.kept_per_layer(result.plan, "neurons", order, config["intermediate_size"]),
               verification={k: report["verification"].get(k) for k in ("checker", "onnxruntime")},
               rolled_back=len(report.get("rolled_back", [])),
               recovery_notes=(report.get("recovery") or {}).get("notes", []))
    row["qualifies"] = row["macs_kept"] <= TARGET + 0.005 and row["heads_pruned"] > 0
    return row


# ---- the run -----------------------------------------------------------------------------------

def measure(quick: bool) -> dict:
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    tokenizer = real_fidelity.minilm_tokenizer()
    whole_text, fit_text, val_text, held_text = split_sentences(quick)
    whole, fit, val = batches(tokenizer, whole_text), batches(tokenizer, fit_text), batches(tokenizer, val_text)
    held_feed = bbf.feeds(tokenizer, held_text)
    small = [bbf.feeds(tokenizer, list(calibration_data.SENTENCES)[i:i + bbf.CALIB_BATCH])
             for i in range(0, len(calibration_data.SENTENCES), bbf.CALIB_BATCH)]
    outcome = {"sentences": {
        "whole": len(whole_text), "whole_tokens": tokens(whole), "whole_batches": len(whole),
        "fit": len(fit_text), "fit_tokens": tokens(fit), "validation": len(val_text), "validation_tokens": tokens(val),
        "validation_rule": f"index % {VALIDATION_EVERY} == {VALIDATION_EVERY - 1} in the deduplicated list "
                           "pydoc_sentences() + calibration_data.SENTENCES",
        "validation_from_calibration_data": len(set(val_text) & set(calibration_data.SENTENCES)),
        "held_out": len(held_text)}}
    log(f"sentences: whole {len(whole_text)}, fit {len(fit_text)} ({tokens(fit)} tokens), "
        f"validation {len(val_text)} ({tokens(val)} tokens), held out {len(held_text)}")
    workdir = Path(tempfile.mkdtemp(prefix="search-minilm-50-"))
    try:
        paths, built = build_exports(workdir, small[0], val)
        outcome.update(built)
        config = built["config"]
        legacy = paths["legacy"]
        order = bbf.node_order(legacy)
        val_reference, fit_reference = embeddings(legacy, val), embeddings(legacy, fit)

        # -- the grid: legacy export, fitting part, validation score
        log("== grid (legacy export, calibrated on the fitting part)")
        scans, curve_info, rows = {}, {}, []
        for cfg in GRID if not quick else GRID[:2] + GRID[6:7]:
            if cfg.importance not in scans:
                scans[cfg.importance], curve_info[cfg.importance] = curves(legacy, fit, cfg.importance, quick)
            row = grid_row(cfg, legacy, order, config, fit, val, val_reference, fit_reference, scans[cfg.importance])
            row["curve_seconds"] = curve_info[cfg.importance]["seconds"]
            rows.append(row)
            gc.collect()
        outcome["grid"] = rows
        outcome["grid_curves"] = curve_info
        del scans
        gc.collect()
        candidates = [(i, r) for i, r in enumerate(rows) if r.get("qualifies")]
        if not candidates:
            raise RuntimeError("no configuration reached the MACs with a head pruned")
        index, best = max(candidates, key=lambda c: (c[1]["val_cos_mean"], -c[0]))
        chosen = GRID[[c.label for c in GRID].index(best["label"])]
        outcome["chosen"] = {"grid_index": index, **chosen.as_dict(), "val_cos_mean": best["val_cos_mean"],
                             "val_cos_min": best["val_cos_min"]}
        log(f"chosen on validation: {chosen.label} ({best['val_cos_mean']:.4f})")

        # -- the chosen configuration, calibrated on the whole set, held-out on both exports
        final = {}
        for name, path in paths.items():
            log(f"== {name} export, chosen configuration calibrated on the whole set")
            scan, info = curves(path, whole, chosen.importance, quick)
            export = bbf.Export(name, path, held_feed, small, config, large_calib=whole)
            rows_ = export.method_rows(TARGET, chosen.label, chosen.importance, chosen.recover, sensitivity=scan,
                                       calib_set="large", heads=chosen.heads, min_keep=chosen.min_keep)
            row = next((r for r in reversed(rows_) if bbf.usable(r)), rows_[-1])
            row = {k: v for k, v in row.items() if k not in ("summary", "input_shapes")}
            row["curves"] = info
            if not quick:
                row["curves_vs_bench_bert_fidelity"] = curves_against_bench(name, chosen.importance, info)
            final[name] = row
            del export, scan
            gc.collect()
        outcome["final"] = final
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    outcome["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return outcome


# ---- the summary -------------------------------------------------------------------------------

def fmt(values) -> str:
    return "/".join(str(v) for v in values) if values else "none"


def previous_best() -> float | None:
    """bench_bert_fidelity's best at 50% (the starting point), from its results file."""
    try:
        rows = json.loads(bbf.RESULTS.read_text())["exports"]["legacy"]["targets"]["0.5"]
    except (OSError, KeyError, ValueError):
        return None
    values = [r["cos_mean"] for r in rows if bbf.qualifies(r)]
    return max(values) if values else None


def summary(outcome: dict) -> str:
    s, chosen, final = outcome["sentences"], outcome["chosen"], outcome["final"]
    met = {n: r.get("cos_mean") is not None and r["cos_mean"] >= GOAL for n, r in final.items()}
    before = previous_best()
    held = "; ".join(f"{n} {r['cos_mean']:.4f} / {r['cos_min']:.4f} (MACs kept {r['macs_kept']:.3f}, heads "
                     f"{fmt(r['heads_kept'])}, FFN {fmt(r['ffn_kept'])})" if "cos_mean" in r else
                     f"{n} failed: {r.get('error')}" for n, r in final.items())
    lines = [
        "## paraphrase-MiniLM-L3-v2 at 50% of the MACs: configuration chosen on validation sentences", "",
        f"{outcome['date']}, onnxprune at {outcome['commit']} plus the uncommitted working tree. Machine: "
        f"{outcome['machine']}, Python {outcome['python']}, onnxruntime {outcome['onnxruntime']}. Wall time "
        f"{outcome['wall_seconds']:.0f} s. Command: `{outcome['command']}` (numbers in "
        "benchmarks/results/minilm_50_search.json).",
        "",
        f"The larger calibration set ({s['whole']} sentences: pydoc prose + the 64) is split deterministically: "
        f"every {VALIDATION_EVERY}th sentence validates ({s['validation']}, {s['validation_from_calibration_data']} "
        f"of them from the 64), the other {s['fit']} fit. Each configuration below is pruned to "
        f"target_macs={TARGET} on the legacy export, calibrated (statistics, recovery, sensitivity curves with lsq, "
        "FFN groups only since the heads are cut as given) on the fitting part, and scored by the mean cosine of "
        "the mean-pooled sentence embeddings on the validation part; --round-to 1 (the default) throughout. The 24 "
        "held-out sentences are used only for the chosen configuration, calibrated again on the whole set.", "",
        "| # | configuration | MACs kept | heads kept | FFN kept | validation cos mean / min | fit cos mean | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(outcome["grid"]):
        if "val_cos_mean" not in r:
            lines.append(f"| {i + 1} | {r['label']} | failed: {r.get('error', '')[:120]} | | | | | |")
            continue
        mark = " **(chosen)**" if i == chosen["grid_index"] else ""
        lines.append(f"| {i + 1} | {r['label']}{mark} | {r['macs_kept']:.3f} | {fmt(r['heads_kept'])} | "
                     f"{fmt(r['ffn_kept'])} | {r['val_cos_mean']:.4f} / {r['val_cos_min']:.4f} | "
                     f"{r['fit_cos_mean']:.4f} | {r['seconds']:.0f} (+{r['curve_seconds']:.0f} curves) |")
    lines += [
        "",
        f"Chosen (best validation mean): {chosen['label']}. Calibrated on the whole set, held-out mean / min cosine: "
        f"{held}.",
        f"Goal >= {GOAL}: " + ("reached on both exports" if all(met.values()) else "reached on "
                               + ", ".join(n for n, m in met.items() if m) if any(met.values())
                               else "not reached") + "."
        + (f" Best before this search: {before:.4f}." if before is not None else ""),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: an eighth of the sentences, 2 ratios, 3 configurations (not a result)")
    parser.add_argument("--json", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}; "
                                                                 "with --quick, none unless given)")
    parser.add_argument("--section", type=Path, default=None, help=f"summary file (default {SECTION}; with --quick, "
                                                                    "none unless given)")
    args = parser.parse_args()
    import torch
    import transformers

    outcome = {"date": dt.date.today().isoformat(), "commit": commit(), "machine": machine(),
               "python": platform.python_version(), "torch": torch.__version__,
               "transformers": transformers.__version__, "onnxruntime": ort.__version__,
               "command": COMMAND + (" --quick" if args.quick else ""), "quick": args.quick, "target_macs_kept": TARGET,
               "goal": GOAL, "grid_definition": [c.as_dict() for c in GRID]}
    outcome.update(measure(args.quick))
    outcome["goal_reached"] = {n: r.get("cos_mean", 0.0) >= GOAL for n, r in outcome["final"].items()}
    json_path = args.json if args.json is not None else (None if args.quick else RESULTS)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(outcome, indent=1, default=str) + "\n")
        log(f"wrote {json_path}")
    text = summary(outcome)
    print(text)
    section = args.section if args.section is not None else (None if args.quick else SECTION)
    if section is not None:
        section.write_text(text)
        log(f"wrote {section}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
