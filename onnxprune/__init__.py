"""onnxprune: structured pruning of ONNX models.

    from onnxprune import prune
    result = prune("model.onnx", filters=0.3)
    onnx.save(result.model, "model.pruned.onnx"); print(result.report["macs"])
"""
from .errors import OnnxPruneError
from .modelio import load_model, save_model
from .pipeline import PruneOptions, PruneResult, prune

__version__ = "0.1.0"
__all__ = ["prune", "PruneOptions", "PruneResult", "load_model", "save_model", "OnnxPruneError"]
