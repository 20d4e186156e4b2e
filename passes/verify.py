"""Verify the result against the unpruned model, and roll back what breaks it.

The pruned model must pass the onnx checker and run in onnxruntime on the same input as the
original (the first calibration samples when there is calibration data, random ones
otherwise, with integer inputs below the rows of the tables they index), with the same output
shapes and no NaN/inf where the original has numbers; where input dims were left dynamic and
guessed, also at a second set of dims (with the user's interface), so that it still takes any.
If it does not, the groups responsible are found by bisection (each try a fresh analysis of
the unpruned model with part of the plan applied), undone, and listed under `rolled_back`;
the others are kept. The graph inputs and outputs then get back the types the user's model
declared. A model that still fails raises VerificationError: nothing broken is handed on.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune.core.dependency import analyze_model
from onnxprune.core.errors import VerificationError
from onnxprune.core.plan import plan_from_removed
from onnxprune.core.shapes import concrete_input_shapes, restore_interface
from onnxprune.core.verify import Checker
from onnxprune.pipeline import Context, Pass, PassResult, require
from onnxprune.settings import setting, switch

from .channels import group_json

VERIFY_SAMPLES = 8  # calibration samples the result is compared on, when there are any


@dataclass
class VerifySettings:
    # The onnxruntime run and comparison (the onnx checker always runs); --no-verify turns it off.
    verify: bool = setting(True, check=switch)


class Verify(Pass):
    name = "verify"

    def __init__(self, settings: VerifySettings | None = None) -> None:
        self.settings = settings or VerifySettings()

    def requires(self, model, context: Context) -> None:
        require(context.reference is not None, self.name, "a reference model (run an analysis or layer removal first)")

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        alternate = None
        if context.guessed:  # dims the user left dynamic: the result must still take other ones
            alternate, _ = concrete_input_shapes(context.reference, context.input_shapes, alternate=True)
        feeds = None
        if context.calibration is not None and self.settings.verify:  # real inputs, where the user gave some
            feeds = context.calibration.limited(VERIFY_SAMPLES).first()
        checker = Checker(context.reference, context.shapes, context.seed if self.settings.verify else None,
                          guessed=bool(context.guessed), alternate=alternate, interface=context.interface,
                          feeds=feeds)
        context.checker = checker
        report: dict = {"rolled_back": []}
        plan = context.plan
        failure = checker.failure(model) if plan is not None and plan.removed_by_atom() else None
        if failure:
            model, report["rolled_back"] = self._roll_back(context, failure)
            report["groups"] = [group_json(d) for d in context.plan.decisions]
        restore_interface(model, context.interface, context.keep_value_info)
        context.notes.extend(checker.notes)
        context.verification = checker.verification(model)
        report["verification"] = context.verification.to_json()
        return PassResult(model, report, modified=bool(report["rolled_back"]))

    def ensures(self, result: PassResult, context: Context) -> None:
        v = context.verification
        if not v.ok:
            raise VerificationError(f"the pruned model failed verification ({v.checker}; onnxruntime {v.ort})",
                                    result)

    def _roll_back(self, context: Context, failure: str):
        """Bisection over the planned groups, each try a fresh analysis of the unpruned model
        with a subset of the plan. Leaves the final analysis and plan in the context; returns
        their model and what was rolled back."""
        require(context.remover is not None, self.name, "channel removal (to re-apply part of the plan)")
        plan, unpruned = context.plan, context.analysis.graph.model
        heads, hidden = context.analysis.heads, context.analysis.hidden
        removed = {d.key: d.removed for d in plan.decisions if len(d.removed)}
        failures: dict[str, str] = {}

        def attempt(keys):
            analysis = analyze_model(unpruned, context.input_shapes, heads=heads, hidden=hidden)
            sub = plan_from_removed(analysis, {k: removed[k] for k in keys})
            model = context.remover.apply(analysis, sub, context)
            return analysis, sub, model, context.checker.failure(model)

        def search(keys, known_failure=None):
            if not keys:
                return []
            failure = known_failure if known_failure is not None else attempt(keys)[3]
            if failure is None:
                return list(keys)
            if len(keys) == 1:
                failures[keys[0]] = failure
                return []
            half = len(keys) // 2
            return search(keys[:half]) + search(keys[half:])

        good = search(list(removed), known_failure=failure)
        analysis, sub, model, failure = attempt(good)
        if failure is not None:  # groups that only fail together: give up on all of them
            failures.update({k: f"fails together with other groups: {failure}" for k in good})
            analysis, sub, model, failure = attempt([])
        by_key = {d.key: d for d in plan.decisions}
        sub.criterion, sub.notes = plan.criterion, plan.notes
        sub.skipped = plan.skipped + [
            {"key": k, "channels": by_key[k].group.channels, "reason": f"rolled back: {why}",
             "nodes": sorted(by_key[k].group.node_names())} for k, why in failures.items()]
        context.analysis, context.plan = analysis, sub
        return model, [{"key": k, "reason": why} for k, why in failures.items()]
