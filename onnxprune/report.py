"""The before/after table printed at the end of a run."""
from __future__ import annotations

from collections import Counter

from .explain import short_reason


def _fmt_count(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt_bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _change(before, after):
    if not before:
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def summary_table(report: dict) -> str:
    rows = [("", "before", "after", "change")]
    for key, label, fmt in (("params", "params", _fmt_count), ("macs", "MACs", _fmt_count),
                            ("file_bytes", "file size", _fmt_bytes)):
        if key in report:
            b, a = report[key]["before"], report[key]["after"]
            rows.append((label, fmt(b), fmt(a), _change(b, a)))
    if "latency_ms" in report:
        b, a = report["latency_ms"]["before"], report["latency_ms"]["after"]
        # Timed at dims the tool had to guess (a detector at 64x64, say), latency can mislead.
        guessed = (report.get("latency_measured") or {}).get("guessed_dims")
        label = "ORT latency (at guessed dims)" if guessed else "ORT latency"
        rows.append((label, f"{b:.3f} ms", f"{a:.3f} ms", _change(b, a)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]
    if report.get("sparsity"):
        lines.append(sparsity_line(report["sparsity"]))
    s = report.get("summary", {})
    lines.append(f"groups: {s.get('groups_pruned', 0)} pruned of {s.get('groups_prunable', 0)} prunable, "
                 f"{s.get('groups_skipped', 0)} skipped; {s.get('channels_removed', 0)} channels removed")
    if s.get("nothing_removed"):
        lines.append(f"nothing removed: {s['nothing_removed']}")
    reasons = Counter(short_reason(item["reason"]) for item in report.get("skipped", []))
    for reason, count in reasons.most_common(5):
        lines.append(f"  skipped x{count}: {reason}")
    v = report.get("verification", {})
    if v:
        check = f"checker {v.get('checker')}, onnxruntime {v.get('onnxruntime')}"
        if v.get("max_abs_diff") is not None:
            check += f", max |diff| {v['max_abs_diff']:.3g}"
            if v.get("max_abs_output") is not None:
                check += f" on outputs up to {v['max_abs_output']:.3g} in size"
            check += f" (relative {v['max_rel_diff']:.3g})"
        lines.append(check)
    if report.get("finetune"):
        lines.append(finetune_table(report["finetune"]))
    if report.get("quantization"):
        lines.append(quantization_line(report["quantization"]))
    if report.get("target"):
        lines.append(target_line(report["target"]))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def quantization_line(q: dict) -> str:
    """Original, pruned and quantized side by side, in one line."""
    sizes = q["file_bytes"]
    line = (f"quantized {q['format']}: file {_fmt_bytes(sizes['original'])} original, "
            f"{_fmt_bytes(sizes['pruned'])} pruned, {_fmt_bytes(sizes['quantized'])} quantized")
    fidelity = q.get("fidelity")
    if fidelity and fidelity["quantized"]["cosine"] is not None:
        line += (f"; cosine with the original's outputs {fidelity['pruned']['cosine']:.4f} pruned, "
                 f"{fidelity['quantized']['cosine']:.4f} quantized")
    latency = q.get("latency_ms")
    if latency:
        guessed = (q.get("latency_measured") or {}).get("guessed_dims")
        line += (f"; latency {latency['original']:.3f} / {latency['pruned']:.3f} / {latency['quantized']:.3f} ms"
                 + (" (at guessed dims)" if guessed else ""))
    top1 = (q.get("accuracy") or {}).get("top1")
    if top1:
        line += "; top-1 on --val " + " / ".join(f"{top1[k]:.4f}" for k in ("original", "pruned", "quantized")
                                                  if k in top1)
    return line


def target_line(t: dict) -> str:
    """What --target set and checked, in one line (its notes follow)."""
    parts = []
    widths = t.get("widths")
    if widths:
        parts.append(f"{widths['groups'] - len(widths['not_multiples'])} of {widths['groups']} channel groups "
                     f"multiples of {widths['multiple_of']}")
    if t.get("static_dims"):
        parts.append("static dims " + ", ".join(f"{k} {v}" for k, v in t["static_dims"].items()))
    lint = t.get("lint")
    if lint:
        parts.append(f"lint {lint['skipped'] if lint.get('skipped') else 'passed' if lint['passed'] else 'failed'}")
    if t.get("ort_format"):
        ort = t["ort_format"]
        parts.append(f".ort model {_fmt_bytes(ort['bytes'])}, {len(ort['required_operators'])} operator line(s) "
                     "in its required-operators config")
    return f"target {t['name']}: " + ("; ".join(parts) if parts else "checked")


def sparsity_line(sp: dict) -> str:
    total = sp["total"]
    how = sp["method"] + (", reached during fine-tuning on the cubic schedule" if sp.get("schedule") else "")
    line = (f"sparsity {sp['pattern']} ({how}): {total['sparsity']:.1%} of {_fmt_count(total['weights'])} "
            f"weights in {total['layers']} layer(s) are zero")
    holds = sp.get("pattern_holds")
    if holds:
        line += f"; {sp['pattern']} holds on {holds['layers']} of {holds['of']}"
    tensorrt = sp.get("tensorrt_2_4")
    if tensorrt and tensorrt["ready"]:
        line += " (ready for TensorRT's 2:4 sparse kernels)"
    if sp["skipped"]:
        first = sp["skipped"][0]
        line += f"; {len(sp['skipped'])} layer(s) left dense (e.g. {first['node']}: {first['reason']})"
    zipped = sp["compressed_weight_bytes"]
    if zipped["before"]:
        line += f"; weights zipped {_fmt_bytes(zipped['before'])} -> {_fmt_bytes(zipped['after'])}"
    storage = sp.get("sparse_storage")
    if storage and storage.get("written"):
        written = storage["written_bytes"]
        line += (f"; {storage['tensors_written']} weight(s) stored sparse, {_fmt_bytes(written['dense'])} -> "
                 f"{_fmt_bytes(written['sparse'])}")
    elif storage and storage["tensors_smaller_sparse"]:
        line += (f"; stored sparse (--sparse-storage) the weights would take {_fmt_bytes(storage['dense_bytes'])} "
                 f"-> {_fmt_bytes(storage['bytes_with_sparse'])}")
    return line


def _metrics(m: dict | None) -> str:
    if not m:
        return "-"
    parts = [f"loss {m['loss']:.4g}"] if m.get("loss") is not None else []
    if m.get("accuracy") is not None:
        parts.append(f"accuracy {m['accuracy']:.4f}")
    if m.get("cosine") is not None:
        parts.append(f"cosine {m['cosine']:.4f}")
    return ", ".join(parts) or "-"


def finetune_table(f: dict) -> str:
    """What fine-tuning did, in a few lines."""
    opt = f.get("optimizer", {})
    lines = [f"fine-tuned: {f.get('loss')} loss, {f.get('epochs')} epoch(s), {f.get('steps')} steps of batch "
             f"{f.get('batch_size') or 'as given'}, AdamW lr {opt.get('lr'):g} ({opt.get('schedule')}), "
             f"{f.get('step_ms')} ms/step, {f.get('seconds')} s"]
    for entry in f.get("history", []):
        line = f"  epoch {entry['epoch']}: train loss {entry['train_loss']}"
        if entry.get("val"):
            line += f"; val {_metrics(entry['val'])}"
        lines.append(line)
    if f.get("val"):
        lines.append(f"  validation: before {_metrics(f.get('before'))} -> after {_metrics(f.get('after'))} "
                     f"(epoch {f.get('best_epoch')} kept)")
    return "\n".join(lines)
