"""Shapes and channel dependencies: which tensor axes must shrink together (the groups),
and what must not be touched (barriers). The model is not changed, except that its input
dims are fixed as given and inferred shapes are stored (on a copy unless the run owns it)."""
from __future__ import annotations

import onnx

from onnxprune.core.dependency import analyze, with_input_shapes
from onnxprune.core.graph import Graph
from onnxprune.core.shapes import complete_shapes
from onnxprune.pipeline import Context, Pass, PassResult, note_shapes


class Analyze(Pass):
    """`heads=True` analyses attention heads as whole-head groups (with --heads, or for a plan
    or sensitivity table made that way)."""

    name = "analyze"

    def __init__(self, heads: bool = False) -> None:
        self.heads = heads

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        working = complete_shapes(with_input_shapes(model, context.input_shapes, copy=not context.owned))
        context.owned = True
        context.analysis = analyze(Graph(working), heads=self.heads)
        note_shapes(context, working)
        if context.reference is None:
            context.reference = working  # its weights stay as they are: plans edit the graphsurgeon copy
        return PassResult(working, {"input_shapes": context.shapes, "barriers": context.analysis.barriers})
