"""Losses written as graph nodes on top of the training copy.

- ce: softmax cross-entropy of the logits against integer labels.
- mse: mean squared difference from a target: the labels when they are given (regression),
  else the teacher's output for the same batch, so unlabelled data can still recover a pruned
  model by matching the original.
- kd: distillation, T^2 * KL(softmax(teacher / T) || softmax(student / T)) averaged over
  samples (and positions), mixed with (1 - alpha) * cross-entropy when labels are given.

The class axis is axis 1, or the last axis when the labels match the output without it
(token classification: logits [batch, seq, classes], labels [batch, seq]).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .builder import Builder

LOSSES = ("ce", "mse", "kd")
LABELS_INPUT = "onnxprune_labels"
TEACHER_INPUT = "onnxprune_teacher"


@dataclass(frozen=True)
class LossSpec:
    kind: str
    labels: bool  # labels are fed
    teacher: bool  # the teacher's tensor is fed
    rank: int  # of the tensor the loss reads
    class_axis: int = 1  # 1, or -1 for the last axis
    temperature: float = 2.0
    alpha: float = 0.5  # kd: weight of the distillation term

    def inputs(self) -> list[str]:
        """Graph inputs the loss adds, in the order they are added."""
        return ([LABELS_INPUT] if self.labels else []) + ([TEACHER_INPUT] if self.teacher else [])


def build_loss(b: Builder, spec: LossSpec, scores: str) -> str:
    """Append the loss nodes for `scores` to the builder's graph; returns the loss tensor."""
    graph = b.model.graph
    dims = [f"onnxprune_d{i}" for i in range(spec.rank)]
    if spec.labels:
        if spec.kind == "mse":
            graph.input.append(helper.make_tensor_value_info(LABELS_INPUT, onnx.TensorProto.FLOAT, dims))
        else:
            label_dims = [d for i, d in enumerate(dims) if i != (spec.rank - 1 if spec.class_axis == -1 else 1)]
            graph.input.append(helper.make_tensor_value_info(LABELS_INPUT, onnx.TensorProto.INT64, label_dims))
    if spec.teacher:
        graph.input.append(helper.make_tensor_value_info(TEACHER_INPUT, onnx.TensorProto.FLOAT, dims))
    if spec.kind == "ce":
        return _cross_entropy(b, spec, scores)
    if spec.kind == "mse":
        target = LABELS_INPUT if spec.labels else TEACHER_INPUT
        difference = b.node("Sub", [scores, target])
        return b.reduce("ReduceMean", b.node("Mul", [difference, difference]), None, keepdims=False)
    distillation = _distillation(b, spec, scores)
    if not spec.labels or spec.alpha >= 1.0:
        return distillation
    weighted = b.node("Mul", [distillation, b.scalar(spec.alpha)])
    label_term = b.node("Mul", [_cross_entropy(b, spec, scores), b.scalar(1.0 - spec.alpha)])
    return b.node("Add", [weighted, label_term])


def _class_first(b: Builder, spec: LossSpec, scores: str) -> str:
    """Scores with the class axis at 1, where SoftmaxCrossEntropyLoss wants it."""
    if spec.class_axis == 1 or spec.rank <= 2:
        return scores
    perm = [0, spec.rank - 1] + list(range(1, spec.rank - 1))
    return b.node("Transpose", [scores], perm=perm)


def _cross_entropy(b: Builder, spec: LossSpec, scores: str) -> str:
    loss, _ = b.node("SoftmaxCrossEntropyLoss", [_class_first(b, spec, scores), LABELS_INPUT], 2, reduction="mean")
    return loss


def _distillation(b: Builder, spec: LossSpec, scores: str) -> str:
    axis = spec.rank - 1 if spec.class_axis == -1 else 1
    inverse_t = b.scalar(1.0 / spec.temperature)
    student = b.node("LogSoftmax", [b.node("Mul", [scores, inverse_t])], axis=axis)
    teacher_scaled = b.node("Mul", [TEACHER_INPUT, inverse_t])
    teacher_log = b.node("LogSoftmax", [teacher_scaled], axis=axis)
    teacher = b.node("Softmax", [teacher_scaled], axis=axis)
    pointwise = b.node("Mul", [teacher, b.node("Sub", [teacher_log, student])])
    per_sample = b.reduce("ReduceSum", pointwise, [axis], keepdims=False)
    mean = b.reduce("ReduceMean", per_sample, None, keepdims=False)
    return b.node("Mul", [mean, b.scalar(spec.temperature ** 2)])


def loss_block(spec: LossSpec, onnxblock):
    """An onnxblock Block that builds the loss (onnxblock comes from onnxruntime.training,
    importable only in the training flavour)."""

    class OnnxPruneLoss(onnxblock.Block):
        def build(self, scores: str) -> str:
            b = Builder(self.base, prefix="onnxprune_loss")
            loss = build_loss(b, spec, scores)
            self.base.graph.node.extend(b.nodes)
            self.base.graph.initializer.extend(b.initializers)
            return loss

    return OnnxPruneLoss()


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def loss_terms(spec: LossSpec, scores: np.ndarray, labels, teacher) -> np.ndarray:
    """The loss of each sample, in numpy, as the graph computes it (the graph's loss is their
    mean): validation uses it on the rows of a padded batch that are real."""
    scores = scores.astype(np.float64)
    n = len(scores)
    axis = scores.ndim - 1 if spec.class_axis == -1 else 1

    def cross_entropy():
        log_probs = np.moveaxis(_log_softmax(scores, axis), axis, -1)
        picked = np.take_along_axis(log_probs, np.asarray(labels, np.int64)[..., None], axis=-1)[..., 0]
        return -picked.reshape(n, -1).mean(axis=1)

    if spec.kind == "ce":
        return cross_entropy()
    if spec.kind == "mse":
        target = np.asarray(labels if spec.labels else teacher, np.float64)
        return ((scores - target) ** 2).reshape(n, -1).mean(axis=1)
    t = spec.temperature
    teacher_log = _log_softmax(np.asarray(teacher, np.float64) / t, axis)
    kl = (np.exp(teacher_log) * (teacher_log - _log_softmax(scores / t, axis))).sum(axis=axis)
    distillation = kl.reshape(n, -1).mean(axis=1) * t * t
    if not spec.labels or spec.alpha >= 1.0:
        return distillation
    return spec.alpha * distillation + (1 - spec.alpha) * cross_entropy()
