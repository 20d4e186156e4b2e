"""Passes and pipelines: the contract every stage of onnxprune follows.

A pass is one stage (check the input, load calibration data, remove layers, analyse, plan,
recover, remove channels, verify, measure, ...). Its settings are its constructor's
arguments. `pass_(model, context)` runs `requires` (what must hold before: a plan exists, the
model has constant weights), then `run`, then `ensures` (what it promises after), and returns
a PassResult: the model (the same object or a new one) and the pass's part of the report,
which is also merged into `context.report`.

A Pipeline is a list of passes run in order on one Context. `onnxprune.prune`, the CLI and
`onnxprune sensitivity` do nothing but build pipelines; adding a stage means writing one
Pass (a file in passes/) and putting it in a list.

The Context is what passes share beyond the model: the calibration data, the artefacts
earlier passes leave for later ones (the dependency analysis, the plan, the reference model
outputs are compared with), caches that save repeated measurements, and the report being
built. Every field is declared here, so what one pass hands to another is visible.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx

from .core.errors import OnnxPruneError
from .core.progress import log

if TYPE_CHECKING:  # only for annotations: the core never depends on the passes
    from .calibration import CalibrationData
    from .core.dependency import Analysis
    from .core.plan import Plan
    from .core.verify import Checker, Verification

class PassError(OnnxPruneError):
    """A pass was run where its requirements do not hold (a programming error in a pipeline)."""


@dataclass
class PassResult:
    """What a pass gives back: the model and its part of the report."""

    model: onnx.ModelProto
    report: dict = field(default_factory=dict)
    modified: bool = True  # whether the model is different from the one the pass was given


@dataclass
class Caches:
    """Measurements on the original model that every plan tried in one run can reuse
    (roll-back, latency search, sensitivity trials)."""

    # Activation statistics by tensor: a data criterion's, then recovery's bias compensation.
    stats: dict = field(default_factory=dict)
    # Gram matrices by (tensor, geometry): recovery's least-squares refits.
    grams: dict = field(default_factory=dict)


@dataclass
class Context:
    """What the passes of one pipeline run share besides the model."""

    # The model given to the run may be changed in place (it was loaded for this run alone);
    # otherwise a pass that edits it works on a copy.
    owned: bool = False
    seed: int = 0
    calibration: CalibrationData | None = None
    # Facts about the user's model, recorded before any pass changes it.
    interface: dict = field(default_factory=dict)  # declared types of graph inputs and outputs
    keep_value_info: bool = False  # the user's model stores inferred shapes: so does the output
    before: dict = field(default_factory=dict)  # params and file bytes of the user's model
    # Input dims fixed for analysis (--input-shape), the dims every input was measured at,
    # and which of them were guessed.
    input_shapes: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    guessed: list = field(default_factory=list)
    # The unpruned model, at the analysed input dims: what outputs are compared with.
    reference: onnx.ModelProto | None = None
    analysis: Analysis | None = None
    plan: Plan | None = None
    # Set by the recovery pass; channel removal calls it around applying the plan.
    compensation: Any = None
    # Set by channel removal: verification re-applies part of a plan with it to roll back.
    remover: Any = None
    checker: Checker | None = None
    # Set by the sparsity pass: {weight name: True where a weight stays}; fine-tuning keeps the zeros.
    weight_masks: dict | None = None
    verification: Verification | None = None
    caches: Caches = field(default_factory=Caches)
    report: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    # Files to write beside the output model, {suffix: bytes} (--target ort-mobile's .ort model).
    files: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def own(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The model to change in place: `model` when this run owns it, else a copy (which the
        run then owns). The caller's model is never changed."""
        if self.owned:
            return model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        self.owned = True
        return copy


class Pass:
    """One stage. Subclasses set `name` and implement `run`; `requires` and `ensures` raise
    PassError (or OnnxPruneError for the user's input) when a condition does not hold."""

    name = "pass"

    def requires(self, model: onnx.ModelProto, context: Context) -> None:
        """What must hold before the pass runs."""

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def ensures(self, result: PassResult, context: Context) -> None:
        """What holds after the pass ran."""

    def __call__(self, model: onnx.ModelProto, context: Context) -> PassResult:
        self.requires(model, context)
        started = time.perf_counter()
        result = self.run(model, context)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name!r} returned {type(result).__name__}, not a PassResult")
        context.report.update(result.report)
        self.ensures(result, context)
        log.info("%s: %.2f s%s", self.name, time.perf_counter() - started, "" if result.modified else " (model unchanged)")
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Pipeline(Pass):
    """Passes run in order on one context; itself a pass, so pipelines nest."""

    name = "pipeline"

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = list(passes)

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        modified = False
        report: dict = {}
        for stage in self.passes:
            log.debug("%s ...", stage.name)
            result = stage(model, context)
            model, modified = result.model, modified or result.modified
            report.update(result.report)
        return PassResult(model, report, modified)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(p) for p in self.passes)}])"


def require(condition: bool, pass_name: str, what: str) -> None:
    """For `requires`: a pipeline that runs a pass before what it needs is a programming error."""
    if not condition:
        raise PassError(f"{pass_name}: needs {what} (put the pass that provides it earlier in the pipeline)")


def note_shapes(context: Context, model: onnx.ModelProto) -> None:
    """Record the dims every input is measured at, and say which were guessed."""
    from .core.shapes import concrete_input_shapes

    context.shapes, context.guessed = concrete_input_shapes(model, context.input_shapes)
    note = (f"dynamic dims {', '.join(context.guessed)} were set to defaults for measuring; pass --input-shape "
            "to choose")
    if context.guessed and note not in context.notes:
        context.notes.append(note)
