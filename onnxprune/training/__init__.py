"""Fine-tuning through onnxruntime-training, on the ONNX graph itself.

- `data`: (feeds, labels) batches from .npz files, image class folders or Python.
- `prepare`: the training copy of a graph (versions, Constant weights, BatchNorm, outputs,
  which weights train).
- `lowerings`: ops without a gradient in onnxruntime-training, rewritten for training only
  (`builder` writes their nodes).
- `losses`: cross-entropy, mse and distillation as graph nodes.
- `schedule`: learning-rate warm-up and decay.
- `masks`: gradual pruning's channel masks on the cubic schedule.
- `trainer`: the loop (AdamW, validation, best weights, checkpoints and resume) and writing
  the trained weights back into the model as it came.

Needs the onnxruntime-training-cpu flavour (`pip install 'onnxprune[training]'`); everything
but the trainer itself imports without it.
"""
from .data import TrainingData, load_training_data
from .prepare import NotTrainable, TrainingGraph, prepare
from .trainer import FineTuneOutcome, FineTuner, TrainingConfig, write_back

__all__ = ["FineTuneOutcome", "FineTuner", "NotTrainable", "TrainingConfig", "TrainingData", "TrainingGraph",
           "load_training_data", "prepare", "write_back"]
