"""The main job as a function: analyse, plan, apply, verify, measure."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from . import metrics
from .apply import apply_plan
from .dependency import Analysis, analyze
from .graph import Graph
from .importance import criterion
from .modelio import load_model
from .plan import Plan, make_plan, plan_from_json
from .runtime import has_runtime, runtime_description
from .shapes import complete_shapes, concrete_input_shapes, fix_input_shapes, infer_shapes, static_copy
from .verify import Verification, check, session, verify


@dataclass
class PruneOptions:
    filters: float = 0.0
    importance: str = "l2"
    round_to: int = 1
    global_rank: bool = False
    exclude: tuple[str, ...] = ()
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    plan: dict | None = None  # a plan file's contents: apply it instead of planning
    seed: int = 0
    verify: bool = True  # run in onnxruntime, compare outputs, time it (the checker always runs)
    latency_runs: int = 20  # 0: do not measure latency


@dataclass
class PruneResult:
    model: onnx.ModelProto
    plan: Plan
    analysis: Analysis
    verification: Verification
    report: dict


def prune(model: onnx.ModelProto | str | Path, options: PruneOptions | None = None, **kwargs) -> PruneResult:
    """Prune `model` (a ModelProto or a path) and return the pruned model with its report.

    Keyword arguments override fields of `options`, e.g. prune("m.onnx", filters=0.3).
    """
    options = options or PruneOptions()
    for key, value in kwargs.items():
        if not hasattr(options, key):
            raise TypeError(f"unknown option {key!r}")
        setattr(options, key, value)
    started = time.perf_counter()
    original = load_model(model) if isinstance(model, (str, Path)) else model
    _refuse_unsupported(original)

    analysis = analyze_model(original, options.input_shapes)
    graph, working = analysis.graph, analysis.graph.model
    if options.plan is not None:
        plan = plan_from_json(analysis, options.plan)
    else:
        plan = make_plan(analysis, options.filters, criterion(options.importance, options.seed),
                         round_to=options.round_to, global_rank=options.global_rank,
                         exclude=options.exclude)
    apply_plan(analysis, plan)
    pruned = graph.to_model()
    if original.graph.value_info:  # keep the input's convention: shapes stored or not
        pruned = infer_shapes(pruned)
    prune_seconds = time.perf_counter() - started

    concrete, guessed = concrete_input_shapes(working, options.input_shapes)
    report = {
        "tool": "onnxprune",
        "runtime": runtime_description(),
        "criterion": plan.criterion,
        "ratio": options.filters,
        "input_shapes": concrete,
        "notes": list(plan.notes),
    }
    if guessed:
        report["notes"].append(
            f"dynamic dims {', '.join(guessed)} were set to defaults for measuring; pass --input-shape to choose")
    report["params"] = {"before": metrics.count_params(original), "after": metrics.count_params(pruned)}
    report["macs"] = {"before": metrics.count_macs(static_copy(working, concrete)),
                      "after": metrics.count_macs(static_copy(pruned, concrete))}
    report["file_bytes"] = {"before": metrics.model_bytes(original), "after": metrics.model_bytes(pruned)}

    if options.verify:
        verification = _verify(working, pruned, concrete, options, report)
    else:
        verification = Verification(checker=check(pruned))
    report["verification"] = verification.to_json()
    report["groups"] = [_group_json(d) for d in plan.decisions]
    report["summary"] = {
        "groups_pruned": sum(1 for d in plan.decisions if len(d.removed)),
        "groups_prunable": len(plan.decisions),
        "groups_skipped": len(plan.skipped),
        "channels_removed": int(sum(len(d.removed) for d in plan.decisions)),
    }
    report["skipped"] = plan.skipped
    report["barriers"] = analysis.barriers
    report["seconds"] = {"prune": round(prune_seconds, 3), "total": round(time.perf_counter() - started, 3)}
    return PruneResult(pruned, plan, analysis, verification, report)


def analyze_model(model: onnx.ModelProto, input_shapes: dict | None = None) -> Analysis:
    """Dependency analysis of a copy of `model` (input dims fixed as given, shapes completed)."""
    working = onnx.ModelProto()
    working.CopyFrom(model)
    if input_shapes:
        fix_input_shapes(working, input_shapes)
    return analyze(Graph(complete_shapes(working)))


def _verify(working, pruned, shapes, options, report) -> Verification:
    feeds, original_session, original_outputs = None, None, None
    if not has_runtime():
        report["notes"].append("no onnxruntime installed: checked with the onnx checker only")
    else:
        try:
            original_session = session(working)
            feeds = metrics.random_inputs(working, shapes, options.seed)
            original_outputs = original_session.run(None, feeds)
        except Exception as exc:  # custom ops, unsupported opsets: nothing to compare against
            feeds, original_session = None, None
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            report["notes"].append(f"onnxruntime cannot run the input model ({first}): "
                                   "checked with the onnx checker only")
    if feeds is None:
        result, pruned_session = Verification(checker=check(pruned)), None
    else:
        result, pruned_session = verify(original_session, pruned, feeds, original_outputs)
    if options.latency_runs and original_session is not None and pruned_session is not None:
        report["latency_ms"] = {
            "before": round(metrics.measure_latency(original_session, feeds, options.latency_runs), 4),
            "after": round(metrics.measure_latency(pruned_session, feeds, options.latency_runs), 4),
        }
    return result


def _group_json(decision) -> dict:
    g = decision.group
    return {
        "key": decision.key,
        "channels_before": g.channels,
        "channels_after": g.channels - len(decision.removed),
        "removed": [int(i) for i in decision.removed],
        "members": [m.describe() for m in g.members],
    }


def _refuse_unsupported(model: onnx.ModelProto) -> None:
    if model.ir_version > 11:
        raise OnnxPruneError(f"IR version {model.ir_version} is newer than this onnx package supports")
