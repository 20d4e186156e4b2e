"""Training-free recovery: make up, inside the graph, for what the removed channels gave
(onnxprune/recovery/ has the methods: bias, lsq, refit, bn).

Compensation is measured on the original weights before the plan is applied and written
after it, so this pass installs itself in the context (`context.compensation`) and channel
removal calls it around applying a plan: `prepare` before slicing, `finish` after slicing,
`after_export` on the exported model (sequential refit and BatchNorm correction need both
models). Verification re-applies part of a plan when it rolls groups back, and recovery runs
again then, with the statistics measured the first time (`context.caches`). Its part of the report (`recovery`)
describes the last application.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune import recovery
from onnxprune.core.errors import OptionError, first_line
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import Flag, setting


def _methods(name, value):
    return recovery.parse_methods(value)


@dataclass
class RecoverySettings:
    recover: tuple = setting((), check=_methods, cli=Flag(
        "--recover", "Training-free recovery with --calib: bias, lsq, refit and/or bn (comma-separated), or none.",
        metavar="METHODS"))


class Recover(Pass):
    name = "recovery"

    def __init__(self, settings: RecoverySettings) -> None:
        self.methods = tuple(settings.recover)
        self.result = None  # recovery.Recovery of the last application

    def requires(self, model, context: Context) -> None:
        if self.methods and context.calibration is None:
            raise OptionError("recover", ",".join(self.methods), "needs calibration data ({calib})")

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        context.compensation = self if self.methods else None
        return PassResult(model, modified=False)

    # -- called by channel removal --------------------------------------------------------------
    def prepare(self, analysis, plan, context: Context) -> None:
        """Work out every layer's compensation from the original weights and calibration data."""
        self.result = None
        if plan.removed_by_atom():
            self.result = recovery.prepare(analysis, plan, self.methods, context.calibration, context.caches.stats,
                                           context.caches.grams)

    def finish(self, analysis, plan) -> None:
        """Write the compensations into the sliced graph."""
        if self.result is not None:
            recovery.finish(analysis, plan, self.result)

    def after_export(self, pruned: onnx.ModelProto, original: onnx.ModelProto, context: Context) -> None:
        """Correct BatchNorms on the exported model, and report what was done."""
        result = self.result
        if result is None:
            return
        if result.refit:
            try:
                result.refitted = recovery.refit_layers(pruned, original, result.refit, context.calibration,
                                                        notes=result.notes)
            except Exception as exc:  # a model that does not run is the safety net's business
                result.notes.append(f"sequential refit skipped: {first_line(exc)}")
        if result.bn_nodes:
            try:
                recovery.reestimate_batchnorm(pruned, original, result.bn_nodes, context.calibration)
            except Exception as exc:  # a model that does not run is the safety net's business
                result.notes.append(f"BatchNorm re-estimation skipped: {first_line(exc)}")
        context.report["recovery"] = result.to_json()
