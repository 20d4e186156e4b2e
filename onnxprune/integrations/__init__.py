"""onnxprune inside other pipelines: an onnx-ir pass (`onnx_ir.PrunePass`) and an Olive pass
(`olive.OnnxPrune`). Each takes the same keyword options as `onnxprune.prune()`; each module
imports its host library only when used."""
