"""Why a run removed nothing, in one line for the table: a run that exits 0 with an unchanged
model must never leave the user guessing."""
from __future__ import annotations

import math
from collections import Counter

from .allocation.ratio import rounding_label

# Ops of onnxruntime's QOperator format: integer kernels with quantization built in. They have
# no pruning rule, so every channel that reaches them keeps its size.
QOPERATOR_OPS = frozenset({"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
                           "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
                           "DynamicQuantizeMatMul", "QAttention"})


def nothing_removed_reason(options, plan, analysis) -> str:
    """Why `plan` removes no channel (and no block was removed either)."""
    if options.plan is not None:
        return "the plan given with --apply-plan removes nothing"
    if options.heads and not any(g.kind == "heads" for g in analysis.groups):
        return ("--heads: no attention heads found (a Reshape of a projection into heads x head_dim feeding "
                "the score MatMul, or a fused attention op)")
    if options.hidden and not any(d.group.kind == "hidden" for d in plan.decisions):
        held = [s for s in plan.skipped if s.get("kind") == "hidden"]
        if not held:
            return ("--hidden: no model width found (channels normalized across by LayerNorm/RMSNorm, or an "
                    "embedding table's columns)")
        reason, count = Counter(short_reason(s["reason"]) for s in held).most_common(1)[0]
        return f"--hidden: the model width cannot be pruned; {count} of {len(held)} width group(s) held by: {reason}"
    qop = sorted({node.op for node in analysis.graph.gs.nodes} & QOPERATOR_OPS)
    if not plan.decisions:
        if qop:
            return (f"the model is quantized in QOperator format ({', '.join(qop)}), which has no pruning rule: "
                    "prune the float model, then quantize it")
        if not plan.skipped:
            return "the model has no channel groups (no Conv, Gemm or MatMul with constant weights)"
        reasons = Counter(short_reason(s["reason"]) for s in plan.skipped)
        reason, count = reasons.most_common(1)[0]
        return f"no group can be pruned; {count} of {len(plan.skipped)} skipped for: {reason}"
    if getattr(options, "zero_channels", False):
        return ("--zero-channels: no channel has all its coupled weights, biases and norm parameters at zero "
                "(fine-tune with --regularize group-lasso to make some)")
    ratios = {"filters": options.filters, "neurons": options.neurons if options.neurons is not None
              else options.filters, "heads": options.heads if options.heads is not None else options.filters,
              "head_dim": options.head_dim or 0.0, "hidden": options.hidden or 0.0}
    if options.target_macs is not None or options.target_params is not None:
        return "the target is met without removing channels"
    asked = [d for d in plan.decisions if ratios.get(d.group.kind, options.filters)]
    if not asked:
        return "every ratio that applies to the model's groups is 0"
    largest = max(asked, key=lambda d: d.group.channels)  # among the groups a non-zero ratio applies to
    kind = largest.group.kind
    ratio = ratios.get(kind, options.filters)
    would_remove = math.floor(ratio * largest.group.channels)
    if would_remove and options.round_to > 1:
        label = rounding_label(getattr(options, "round_to_source", "--round-to"), options.round_to)
        return (f"{label}: the multiple of {options.round_to} nearest to the kept width asked "
                f"is the full width (largest group: {largest.group.channels})")
    if not would_remove:
        unit = "heads" if kind == "heads" else "channels"
        return (f"--{kind.replace('_', '-')} {ratio:g} removes floor({ratio:g} x {largest.group.channels}) = 0 "
                f"{unit} even from the largest {kind.replace('_', ' ')} group")
    return "every group keeps all its channels"


def short_reason(reason: str) -> str:
    """"Op 'name': why" -> "Op: why", so one cause on many nodes counts once."""
    head, sep, tail = reason.partition(": ")
    op = head.split(" ")[0]
    return f"{op}: {tail}" if sep else reason
