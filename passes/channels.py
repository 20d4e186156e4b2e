"""Remove the planned channels: slice every constant the groups touch, rewrite shape
constants and attributes (apply.py), export. Recovery, when installed, runs around it."""
from __future__ import annotations

import onnx

from onnxprune.core.apply import apply_plan
from onnxprune.core.dependency import Analysis
from onnxprune.core.plan import Plan
from onnxprune.pipeline import Context, Pass, PassResult, require


class RemoveChannels(Pass):
    name = "channels"

    def requires(self, model, context: Context) -> None:
        require(context.analysis is not None and context.plan is not None, self.name, "an analysis and a plan")

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        context.remover = self  # verification re-applies parts of the plan through it
        pruned = self.apply(context.analysis, context.plan, context)
        return PassResult(pruned, {"groups": [group_json(d) for d in context.plan.decisions]},
                          modified=bool(context.plan.removed_by_atom()))

    def apply(self, analysis: Analysis, plan: Plan, context: Context) -> onnx.ModelProto:
        """The model `analysis` was made from, without the channels `plan` removes (the
        analysis's graph is edited: analyse again to apply another plan)."""
        original = analysis.graph.model
        compensation = context.compensation
        if compensation is not None:
            compensation.prepare(analysis, plan, context)
        apply_plan(analysis, plan)
        if compensation is not None:
            compensation.finish(analysis, plan)
        pruned = analysis.graph.to_model()
        if compensation is not None:
            compensation.after_export(pruned, original, context)
        return pruned


def group_json(decision) -> dict:
    g = decision.group
    return {
        "key": decision.key,
        "channels_before": g.channels,
        "channels_after": g.channels - len(decision.removed),
        "removed": [int(i) for i in decision.removed],
        "kind": g.kind,
        "members": [m.describe() for m in g.members],
        **({"costs": [str(cost) for cost in g.costs]} if g.costs else {}),
    }
