"""Gradients of the loss with respect to the weights, sample by sample, through
onnxruntime-training: what the gradient criteria (onnxprune/criteria/gradient.py) score with.

The model gets the training copy fine-tuning uses (prepare.py, BatchNorm in inference form,
its scale and shift trainable) and a cross-entropy loss on its class scores. The labels are
the data's where given, else the model's own predictions (argmax): the "empirical Fisher" on
predicted labels, so unlabelled data works. No optimizer step is ever taken: each sample's
forward and backward run leaves the gradients of every weight in the checkpoint state, which
`visit` receives (name -> array of the weight's shape) and reduces to what it needs.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import OnnxPruneError
from ..core.progress import progress
from ..core.runtime import import_training_api
from .losses import LABELS_INPUT, LossSpec
from .prepare import prepare


def require_gradients(what: str) -> None:
    """RuntimeMissing, naming `what` asked for gradients, unless onnxruntime-training is usable."""
    from ..core.errors import RuntimeMissing

    try:
        import_training_api()
    except RuntimeMissing as exc:
        raise RuntimeMissing(f"{what} takes gradients: {str(exc).replace('fine-tuning needs', 'it needs')}") from None


@dataclass
class GradientRun:
    samples: int = 0
    labels: str = "predicted"  # or "given"
    seconds: float = 0.0
    weights: list[str] = field(default_factory=list)  # the weights gradients were taken for
    notes: list[str] = field(default_factory=list)


def per_sample_gradients(model: onnx.ModelProto, feeds: Iterable[dict], visit: Callable[[dict], None],
                         labels: np.ndarray | None = None, limit: int | None = None,
                         output: str | None = None) -> GradientRun:
    """Run every sample of `feeds` (dicts of batched inputs) through forward and backward, one
    at a time, and call `visit({weight: gradient})` for each; at most `limit` samples.
    `labels` (one class id per sample, in order) replaces the predicted labels."""
    from .trainer import TrainingConfig, generate_artifacts, probe_step, unlabelled_class_axis

    started = time.perf_counter()
    artifacts_api, api = import_training_api()
    samples = list(_samples(feeds, limit))
    if not samples:
        raise OnnxPruneError("gradient criteria: the calibration data holds no samples")
    model = _at_sample_dims(model, samples[0])
    graph = prepare(model, output, logits=True, batchnorm="frozen")
    scores_of = _scores_session(model, graph.loss_input)
    first = scores_of(samples[0])
    rank = first.ndim
    class_axis = unlabelled_class_axis(model, graph.loss_input, rank)
    if rank < 2:
        raise OnnxPruneError(f"gradient criteria need class scores to take a cross-entropy of; output "
                             f"{graph.loss_input!r} has rank {rank}")
    run = GradientRun(labels="given" if labels is not None else "predicted", weights=list(graph.trainable))
    if labels is not None and len(labels) < len(samples):
        raise OnnxPruneError(f"gradient criteria: {len(labels)} labels for {len(samples)} calibration samples")
    spec = LossSpec("ce", labels=True, teacher=False, rank=rank, class_axis=class_axis)
    with tempfile.TemporaryDirectory(prefix="onnxprune-grad-") as tmp:
        folder = Path(tmp)
        generate_artifacts(artifacts_api, graph, spec, folder, TrainingConfig(weight_decay=0.0))
        feed = dict(samples[0])
        feed[LABELS_INPUT] = _label(labels, 0, first, class_axis)
        probe_step(folder, feed)  # a crash in onnxruntime-training becomes a one-line error
        state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
        module = api.Module(str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"))
        module.train()
        names = module.input_names()
        for index, sample in enumerate(progress(samples, "gradients", unit="sample")):
            values = dict(sample)
            values[LABELS_INPUT] = _label(labels, index, scores_of(sample) if labels is None else None, class_axis)
            module.lazy_reset_grad()
            module(*[values[name] for name in names])
            visit({name: state.parameters[name].grad for name in graph.trainable})
            run.samples += 1
    run.notes = list(graph.notes)
    run.seconds = round(time.perf_counter() - started, 2)
    return run


def _samples(feeds: Iterable[dict], limit: int | None):
    """One-sample feeds ([1, ...] each) from batched feeds."""
    count = 0
    for feed in feeds:
        batch = len(next(iter(feed.values())))
        for i in range(batch):
            if limit is not None and count >= limit:
                return
            yield {name: np.asarray(value)[i:i + 1] for name, value in feed.items()}
            count += 1


def _label(labels, index: int, scores, class_axis: int) -> np.ndarray:
    """The label tensor of one sample: the given class id, or the argmax of its scores over the
    class axis (per position for [1, C, ...] or [1, ..., C] scores)."""
    if labels is not None:
        return np.asarray(labels[index:index + 1], np.int64)
    return np.asarray(np.argmax(scores, axis=class_axis), np.int64)


def _scores_session(model: onnx.ModelProto, tensor: str):
    """The original model's `tensor` (the class scores) for a feed, from one onnxruntime session."""
    from .trainer import tensor_session

    session = tensor_session(model, tensor)
    return lambda feed: session.run([tensor], feed)[0]


def _at_sample_dims(model: onnx.ModelProto, sample: dict) -> onnx.ModelProto:
    """A structure-only-changed copy taking one sample: the inputs at the sample's dims, the
    outputs' and intermediate dims left to inference (an analysed model holds them at its
    analysis batch)."""
    from ..core.modelio import copy_without_initializers

    copy = copy_without_initializers(model)
    copy.graph.initializer.extend(model.graph.initializer)  # shares nothing: extend copies
    del copy.graph.value_info[:]
    for value in copy.graph.input:
        if value.name in sample:
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for size in np.shape(sample[value.name]):
                shape.dim.add().dim_value = int(size)
    for value in copy.graph.output:
        value.type.tensor_type.ClearField("shape")
    return copy
