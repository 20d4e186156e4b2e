"""onnxprune as an onnx-ir pass: `PrunePass(**options)` runs in `onnx_ir.passes.PassManager`
beside the library's own passes.

    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass
    from onnxprune.integrations.onnx_ir import PrunePass

    prune = PrunePass(filters=0.3)
    result = prune(ir.load("model.onnx"))          # a PrunePassResult: .model, .modified, .report
    manager = ir.passes.PassManager([RemoveUnusedNodesPass(), PrunePass(filters=0.3), ShapeInferencePass()])
    pruned = manager(ir.load("model.onnx")).model

The pass is functional (it returns a new model and leaves its input as it was). It makes one
copy of the weights, converting the IR to the ModelProto onnxprune works on; the pruned
proto becomes the returned IR without another copy. Its result carries the report; note that
PassManager returns a plain PassResult, so call the pass itself when you want the report.
Options are checked when the pass is made; a model that fails verification raises.
"""
from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir
from onnx_ir.passes import FunctionalPass, PassResult

from ..api import options_from, run_pruning


@dataclasses.dataclass
class PrunePassResult(PassResult):
    """A PassResult with onnxprune's report (the dict `prune(...).report` gives)."""

    report: dict = dataclasses.field(default_factory=dict)


class PrunePass(FunctionalPass):
    """Structured pruning with the keyword options of onnxprune.prune()."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options_from(**options)

    def call(self, model: ir.Model) -> PrunePassResult:
        proto = ir.to_proto(model)  # the one copy of the weights
        _load_external_data(proto, model)
        result = run_pruning(proto, self.options, owned=True)
        modified = bool(result.report.get("summary", {}).get("channels_removed")) or bool(
            (result.report.get("layers") or {}).get("removed"))
        return PrunePassResult(ir.from_proto(result.model), modified, report=result.report)


def _load_external_data(proto: onnx.ModelProto, model: ir.Model) -> None:
    """ir.to_proto leaves weights stored outside the file as references: read them in."""
    base = next((value.base_dir for value in (v.const_value for v in model.graph.initializers.values())
                 if isinstance(value, ir.ExternalTensor)), None)
    if base is not None:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))
