"""Shapes and channel dependencies: which tensor axes must shrink together (the groups),
and what must not be touched (barriers). The model is not changed, except that its input
dims are fixed as given and inferred shapes are stored (on a copy unless the run owns it)."""
from __future__ import annotations

import onnx

from onnxprune.core.dependency import analyze, with_input_shapes
from onnxprune.core.graph import Graph
from onnxprune.core.plan import candidate_groups
from onnxprune.core.shapes import complete_shapes
from onnxprune.pipeline import Context, Pass, PassResult, note_shapes


class Analyze(Pass):
    """`heads=True` analyses attention heads as whole-head groups (with --heads, or for a plan
    or sensitivity table made that way); `hidden=True` follows the model width through
    normalizations and embedding tables (with --hidden, or for a plan made that way)."""

    name = "analyze"

    def __init__(self, heads: bool = False, hidden: bool | str | None = False) -> None:
        self.heads = heads
        self.hidden = hidden

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        working = complete_shapes(with_input_shapes(model, context.input_shapes, copy=not context.owned))
        context.owned = True
        note_shapes(context, working)
        context.analysis, note = analyze_dynamic(working, context.shapes if context.guessed else None, self.heads,
                                                   self.hidden)
        if note:
            context.notes.append(note)
        if context.reference is None:
            context.reference = working  # its weights stay as they are: plans edit the graphsurgeon copy
        return PassResult(working, {"input_shapes": context.shapes, "barriers": context.analysis.barriers})


def analyze_dynamic(working: onnx.ModelProto, measuring: dict | None, heads: bool = False,
                    hidden: bool | str | None = False):
    """(analysis, note) of `working` (shapes completed); with `measuring` (concrete dims for the
    inputs whose dims are dynamic), analysed again at those dims when dynamic dims hold groups.

    Some exports merge the batch into another axis (SDPA's [B*H, S, D]) or size a reshape by a
    product of dynamic dims: with dynamic dims the channels cannot be followed there, with
    concrete ones they can. The second analysis is kept if it frees groups; the pruned model
    keeps its dynamic interface, and verification runs it at a second set of dims too, rolling
    back any group that would tie it to the first (see core.verify.Checker)."""
    analysis = analyze(Graph(working), heads=heads, hidden=hidden)
    if not measuring or not _held_by_dynamic_dims(analysis):
        return analysis, None
    fixed = complete_shapes(with_input_shapes(working, measuring, copy=True))
    retry = analyze(Graph(fixed), heads=heads, hidden=hidden)
    before, after = (len(candidate_groups(a)[0]) for a in (analysis, retry))
    if after <= before:
        return analysis, None
    return retry, (f"channel groups were followed at the measuring dims: {after} prunable groups against {before} "
                   "with the input dims dynamic; the pruned model keeps its dynamic dims and is checked at a second "
                   "set of them")


# what an analysis says when dynamic dims stop it from following channels
_DYNAMIC_REASONS = ("needs static shapes", "split across output axes", "of unknown size", "unknown rank",
                    "batch axis of channels meets an axis that keeps its size")


def _held_by_dynamic_dims(analysis) -> bool:
    return any(reason in barrier for barrier in analysis.barriers for reason in _DYNAMIC_REASONS)
