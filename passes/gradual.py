"""Gradual pruning: the plan's channels are not cut at once but masked during fine-tuning, more
and more on the cubic schedule (onnxprune/training/masks.py), then removed physically.

In the pipeline it takes the place of channel removal's first half: after planning (which
gives every group's final count), it fine-tunes the unpruned model with growing masks, chosen
again by weight norm at each update, then analyses the trained model and leaves the plan of
the masked channels for channel removal. Those channels carry nothing by then, so removing
them changes nothing: what verification checks afterwards is the trained model's function.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune.core.dependency import analyze, with_input_shapes
from onnxprune.core.errors import OnnxPruneError, OptionError
from onnxprune.core.graph import Graph
from onnxprune.core.plan import plan_from_removed
from onnxprune.core.shapes import complete_shapes
from onnxprune.pipeline import Context, Pass, PassResult, require
from onnxprune.settings import Flag, choice, setting

from .finetune import FineTune, FineTuneSettings

SCHEDULES = ("oneshot", "cubic")
MASK_BY = ("magnitude", "movement")


@dataclass
class GradualSettings:
    schedule: str = setting("oneshot", check=choice(SCHEDULES), cli=Flag(
        "--schedule", "oneshot: remove the channels (or zero the weights), then fine-tune; cubic: mask them during "
        "fine-tuning, more and more on Zhu & Gupta's cubic schedule (full by 3/4 of the steps): channels are "
        "removed at the end; with --sparsity, weights zeroed by magnitude at each update.",
        choices=lambda: SCHEDULES, show_default=True))
    mask_by: str = setting("magnitude", check=choice(MASK_BY), cli=Flag(
        "--mask-by", "With --schedule cubic, what each update masks: the smallest weights now (magnitude: a "
        "channel's producer weights by L2 norm) or the least movement away from zero over the training so far "
        "(movement pruning, Sanh et al. 2020: the sum of -gradient x weight over the steps).",
        choices=lambda: MASK_BY, show_default=True))

    def cross_check(self) -> None:
        if self.mask_by != "magnitude" and self.schedule != "cubic":
            raise OptionError("mask_by", self.mask_by, "chooses what gradual masks take: give {schedule} cubic")


class GradualPruning(Pass):
    name = "gradual"

    def __init__(self, finetune: FineTuneSettings, image_spec: str | None = None, mask_by: str = "magnitude") -> None:
        self.finetune = finetune
        self.image_spec = image_spec
        self.mask_by = mask_by

    def requires(self, model, context: Context) -> None:
        require(context.plan is not None and context.analysis is not None, self.name, "a plan")
        FineTune.check_runtime()

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        from onnxprune.training.masks import ChannelMasker

        final = {d.key: len(d.removed) for d in context.plan.decisions if len(d.removed)}
        if not final:
            raise OnnxPruneError("schedule cubic: the plan removes nothing to mask")
        working = context.analysis.graph.model  # the unpruned model the plan was made on (shapes fixed as asked)
        masker = ChannelMasker(context.analysis, final, mask_by=self.mask_by)
        tuned = FineTune(self.finetune, image_spec=self.image_spec, masker=masker)
        result = tuned(working, context)
        trained = result.model
        if masker.unwritable:
            context.notes.append(f"gradual: {len(masker.unwritable)} coupled tensor(s) are not trained parameters "
                                 "and were not masked; removing the channels may change the output a little")
        # the trained model, analysed afresh (same groups, same keys), with the masked channels as the plan
        analysed = complete_shapes(with_input_shapes(trained, context.input_shapes, copy=True))
        context.analysis = analyze(Graph(analysed), heads=context.analysis.heads, hidden=context.analysis.hidden)
        plan = plan_from_removed(context.analysis, masker.removed())
        plan.criterion, plan.notes = context.plan.criterion, context.plan.notes
        context.plan = plan
        report = {"gradual": {"schedule": "cubic", "mask_by": self.mask_by, "updates": masker.history,
                              "masked": {key: len(v) for key, v in masker.removed().items()}}}
        return PassResult(analysed, report)

