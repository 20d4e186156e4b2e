"""Check the input and record what later passes must preserve.

Structural faults (a cycle, a dangling or doubly produced tensor, weights shorter than their
shape) are refused in one line (core/validate.py); nodes merely out of order are sorted.
Recorded before anything changes: the declared types of the graph inputs and outputs (the
pruned model keeps them), whether the model stores inferred shapes, its params and file size.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxprune.core import cost
from onnxprune.core.modelio import model_bytes
from onnxprune.core.shapes import parse_input_shapes
from onnxprune.core.validate import (
    UNSORTED_NOTE,
    check_graph,
    refuse_unsupported,
    sort_nodes,
)
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import Flag, choice, integer, setting, shapes_dict
from onnxprune.sparsity.storage import densify

WEIGHT_MODES = ("auto", "memory", "disk")


@dataclass
class InputSettings:
    input_shapes: dict = setting(default_factory=dict, check=shapes_dict, cli=Flag(
        "--input-shape", "Fix an input's dims (repeatable).", metavar="NAME:D1,D2,...", multiple=True,
        parse=parse_input_shapes))
    seed: int = setting(0, check=integer(0, 2**32 - 1), cli=Flag(
        "--seed", "Seed for random inputs and the random criterion.", parse=int, show_default=True))
    # Where external-data weights live while the model is pruned (read by load_input and the CLI
    # before the pipeline starts): 'disk' streams them tensor by tensor (models larger than
    # memory; no onnxruntime run), 'memory' loads them, 'auto' keeps them on disk only when
    # loading them would not fit (modelio.weights_fit_in_memory).
    weights: str = setting("auto", check=choice(WEIGHT_MODES), cli=Flag(
        "--weights", "Where external-data weights stay while pruning: 'disk' streams them tensor by tensor "
        "(models larger than memory; skips the onnxruntime check), 'memory' loads them, 'auto' keeps them on "
        "disk only when they would not fit in memory.", choices=lambda: WEIGHT_MODES, show_default=True))


class ValidateInput(Pass):
    """Checks the model, and records the run's input dims and seed for the passes after it."""

    name = "validate"

    def __init__(self, settings: InputSettings | None = None) -> None:
        self.settings = settings or InputSettings()

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        context.input_shapes = dict(self.settings.input_shapes)
        context.seed = self.settings.seed
        refuse_unsupported(model)
        file_bytes = model_bytes(model)  # as given (sparse initializers count as stored)
        modified = False
        if len(model.graph.sparse_initializer):
            model = context.own(model)
            count = densify(model)
            modified = True
            context.notes.append(f"{count} sparse initializer(s) read as dense tensors, as onnxruntime loads them "
                                 "(--sparse-storage writes sparse weights sparse again)")
        order = check_graph(model)
        if order is not None:
            model = context.own(model)
            modified = True
            sort_nodes(model, order)
            context.notes.append(UNSORTED_NOTE)
        context.interface = interface(model)
        context.keep_value_info = len(model.graph.value_info) > 0
        context.before = {"params": cost.count_params(model), "file_bytes": file_bytes}
        return PassResult(model, modified=modified)


def interface(model: onnx.ModelProto) -> dict:
    """The declared types of the graph inputs and outputs, as the user's model has them."""
    copy = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        kept = onnx.ValueInfoProto()
        kept.CopyFrom(vi)
        copy[vi.name] = kept
    return copy
