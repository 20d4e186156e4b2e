"""onnxprune: structured pruning of ONNX models.

    from onnxprune import prune
    result = prune("model.onnx", filters=0.3)
    onnx.save(result.model, "model.pruned.onnx"); print(result.report["macs"])

    from onnxprune import finetune   # needs the [training] extra
    tuned = finetune(result.model, "train.npz", val="val.npz", epochs=1)

Pipelines of passes (onnxprune.pipeline, passes in onnxprune.passes) are the same machinery
one level down: `onnxprune.api.pruning_pipeline(options)` is what prune() runs.
"""
from . import criteria, oprules  # noqa: F401  (registers the built-in criteria and op rules)
from .api import (
           FineTuneOptions,
           FineTuneResult,
           PruneOptions,
           PruneResult,
           finetune,
           prune,
)
from .core.errors import OnnxPruneError, OptionError, VerificationError
from .core.modelio import load_model, save_model
from .pipeline import Context, Pass, PassResult, Pipeline

__version__ = "0.1.0"
__all__ = [
           "Context",
           "FineTuneOptions",
           "FineTuneResult",
           "OnnxPruneError",
           "OptionError",
           "Pass",
           "PassResult",
           "Pipeline",
           "PruneOptions",
           "PruneResult",
           "VerificationError",
           "finetune",
           "load_model",
           "prune",
           "save_model",
]
