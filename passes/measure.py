"""Measure what the run changed: params, MACs and file size before and after, onnxruntime
latency of both models (within a time budget), what was pruned and skipped, and, when
nothing was removed, why. The model is not changed."""
from __future__ import annotations

import time
from dataclasses import dataclass

import onnx

from onnxprune.core import cost
from onnxprune.core.metrics import timed_runs
from onnxprune.core.modelio import model_bytes
from onnxprune.core.runtime import runtime_description
from onnxprune.core.shapes import static_copy
from onnxprune.explain import nothing_removed_reason
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import integer, optional_seconds, setting


@dataclass
class MeasureSettings:
    latency_runs: int = setting(20, check=integer(0))  # timed runs per model; 0: no latency (--no-verify)
    latency_budget_s: float | None = setting(10.0, check=optional_seconds)  # seconds per model for timing it


SLOWER = 1.1  # latency after / before above which the report says the result is slower ...
NOISE_MS = 0.05  # ... by more than timing noise on a tiny model


class Measure(Pass):
    """`options` (the run's settings, for saying why nothing was removed) is optional."""

    name = "measure"

    def __init__(self, settings: MeasureSettings | None = None, options=None) -> None:
        self.settings = settings or MeasureSettings()
        self.options = options

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        prune_seconds = time_since(context)
        reference, plan = context.reference, context.plan
        report = {
            "tool": "onnxprune",
            "runtime": runtime_description(),
            "params": {"before": context.before["params"], "after": cost.count_params(model)},
            "macs": {"before": cost.count_macs(static_copy(reference, context.shapes)),
                     "after": cost.count_macs(static_copy(model, context.shapes))},
            "file_bytes": {"before": context.before["file_bytes"], "after": model_bytes(model)},
        }
        report.update(self._latency(context))
        latency = report.get("latency_ms")
        if latency and latency["after"] > SLOWER * latency["before"] and latency["after"] - latency["before"] > NOISE_MS:
            advice = ("channel counts off the multiples of 8 that onnxruntime's blocked kernels take can cost more "
                      "than the MACs save; try --round-to 8 or --target cpu" if getattr(self.options, "round_to", 1) < 8
                      else "measure on the target; the timing here may be disturbed")
            context.notes.append(f"the pruned model runs slower than the original here ({latency['after']:g} against "
                                 f"{latency['before']:g} ms): {advice}")
        decisions = plan.decisions if plan is not None else []
        report["summary"] = {
            "groups_pruned": sum(1 for d in decisions if len(d.removed)),
            "groups_prunable": len(decisions),
            "groups_skipped": len(plan.skipped) if plan is not None else 0,
            "channels_removed": int(sum(len(d.removed) for d in decisions)),
        }
        layers_removed = (context.report.get("layers") or {}).get("removed")
        if not report["summary"]["channels_removed"] and not layers_removed and self.options is not None \
                and plan is not None:
            report["summary"]["nothing_removed"] = nothing_removed_reason(self.options, plan, context.analysis)
        report["skipped"] = plan.skipped if plan is not None else []
        # The same keys whichever passes ran (whole blocks only: no analysis, no channel plan).
        defaults = {"groups": [], "barriers": [], "input_shapes": context.shapes, "criterion": "",
                    "ratio": getattr(self.options, "filters", None), "heads_ratio": getattr(self.options, "heads", None),
                    "neurons_ratio": getattr(self.options, "neurons", None)}
        report.update({key: value for key, value in defaults.items() if key not in context.report})
        compensation = context.compensation
        if compensation is not None and compensation.result is not None:
            context.notes.extend(n for n in compensation.result.notes if n not in context.notes)
        report["notes"] = list(context.notes)
        report["seconds"] = {"prune": round(prune_seconds, 3), "total": round(time_since(context), 3)}
        return PassResult(model, report, modified=False)

    def _latency(self, context: Context) -> dict:
        checker = context.checker
        runs = self.settings.latency_runs
        if not runs or checker is None or context.verification is None or context.verification.ort != "passed":
            return {}
        budget = self.settings.latency_budget_s
        before, runs_before = timed_runs(checker.session, checker.feeds, runs, budget_s=budget)
        after, runs_after = timed_runs(checker.last_session, checker.feeds, runs, budget_s=budget)
        return {"latency_ms": {"before": round(before, 4), "after": round(after, 4)},
                "latency_measured": {"runs": {"before": runs_before, "after": runs_after}, "input_shapes": context.shapes,
                                     "guessed_dims": list(context.guessed)}}


def time_since(context: Context) -> float:
    return time.perf_counter() - context.started
