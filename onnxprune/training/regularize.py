"""Sparsity-inducing regularization during fine-tuning, so that the network chooses what to remove.

Applied as a proximal step after every optimizer step, with the step's learning rate: unlike
a penalty added to the loss, it sets values exactly to zero, which is what lets the channels
be removed afterwards without changing the function.

- group-lasso: each channel of every prunable group is one group of the lasso: every trained
  value coupled to it (producer filters and biases, normalization scales and shifts, consumer
  input weights: the channel masks' members, onnxprune/training/masks.py) shrinks together,
  v <- v * max(0, 1 - lr * strength / ||v||), so whole channels reach zero (Wen et al. 2016,
  on dependency groups as DepGraph groups them). `onnxprune MODEL --zero-channels` then
  removes exactly those.
- l1: network slimming (Liu et al. 2017): the BatchNormalization scales, soft-thresholded,
  v <- sign(v) * max(0, |v| - lr * strength). Prune afterwards with `--importance bn`.
"""
from __future__ import annotations

import numpy as np

from ..core.criteria import channel_totals
from ..core.dependency import Analysis, Group
from ..core.plan import candidate_groups, group_key

REGULARIZERS = ("l1", "group-lasso")
# Roles whose values carry a channel's output: zero them all and the channel computes nothing.
# (Running means and variances, divisors and quantization parameters are not among them.)
CHANNEL_ROLES = ("weight_out", "weight_in", "bias", "bn_scale", "bn_bias", "scale", "offset", "operand")


class Regularizer:
    """`kind` over the groups of `analysis` (of the model being trained: its tensor names are
    the training copy's parameter names)."""

    def __init__(self, analysis: Analysis, kind: str, strength: float) -> None:
        self.analysis, self.kind, self.strength = analysis, kind, strength
        groups, _ = candidate_groups(analysis)
        self.groups: list[Group] = groups
        self.scales = sorted({att.tensor.name for g in groups for att in g.members if att.role == "bn_scale"})
        self.untrained: set[str] = set()  # coupled tensors that are not trained parameters
        self.steps = 0

    def apply(self, parameters, lr: float) -> None:
        threshold = lr * self.strength
        if threshold <= 0:
            return
        self.steps += 1
        if self.kind == "l1":
            for name in self.scales:
                if name not in parameters:
                    self.untrained.add(name)
                    continue
                value = np.asarray(parameters[name].data)
                parameters[name] = (np.sign(value) * np.maximum(np.abs(value) - threshold, 0)).astype(value.dtype)
            return
        edits: dict[str, np.ndarray] = {}
        for group in self.groups:
            members = [att for att in group.members if att.role in CHANNEL_ROLES]
            norms = np.zeros(group.channels)
            views = []
            for att in members:
                name = att.tensor.name
                if name not in parameters:
                    self.untrained.add(name)
                    continue
                if name not in edits:
                    edits[name] = np.array(parameters[name].data, copy=True)
                moved = np.moveaxis(edits[name], att.axis, 0)
                views.append((att, moved))
                squares = np.square(moved.reshape(len(moved), -1), dtype=np.float64).sum(axis=1)
                norms += channel_totals(self.analysis, att, group, squares)
            norms = np.sqrt(norms)
            factor = np.where(norms > 0, np.maximum(0.0, 1.0 - threshold / np.maximum(norms, 1e-30)), 0.0)
            for att, moved in views:  # views into `edits`: scaled in place
                for offset, exp, n in self.analysis.positions(att, group):
                    per_row = np.repeat(factor, exp).reshape((n * exp,) + (1,) * (moved.ndim - 1))
                    moved[offset:offset + n * exp] *= per_row.astype(moved.dtype)
        for name, value in edits.items():
            parameters[name] = value

    def summary(self, parameters) -> dict:
        """How many channels (group-lasso) or BatchNorm scales (l1) are exactly zero now."""
        if self.kind == "l1":
            values = [np.asarray(parameters[n].data) for n in self.scales if n in parameters]
            return {"kind": "l1", "strength": self.strength, "scales": int(sum(v.size for v in values)),
                    "scales_zero": int(sum((v == 0).sum() for v in values))}
        zero = zero_channels(self.analysis, lambda name: np.asarray(parameters[name].data)
                             if name in parameters else None, keep_one=False)
        return {"kind": "group-lasso", "strength": self.strength, "groups": len(self.groups),
                "channels": int(sum(g.channels for g in self.groups)),
                "channels_zero": int(sum(len(v) for v in zero.values())),
                "groups_with_zeros": sum(1 for v in zero.values() if len(v))}


def zero_channels(analysis: Analysis, value_of=None, exclude=(), keep_one: bool = True) -> dict[str, np.ndarray]:
    """{group key: channels whose coupled values (CHANNEL_ROLES) are all exactly zero}, for
    every prunable group; `value_of(name)` reads a tensor (default: the analysed graph's
    constants). With `keep_one` a fully zero group keeps its first channel (a plan must leave
    every group one)."""
    groups, _ = candidate_groups(analysis, exclude)
    found = {}
    for group in groups:
        alive = np.zeros(group.channels, dtype=bool)
        seen = False
        for att in group.members:
            if att.role not in CHANNEL_ROLES:
                continue
            value = value_of(att.tensor.name) if value_of is not None else analysis.graph.evaluate(att.tensor)
            if value is None:
                alive[:] = True  # a value we cannot read: nothing of this group is known to be zero
                break
            seen = True
            moved = np.moveaxis(np.asarray(value), att.axis, 0)
            nonzero = (moved.reshape(moved.shape[0], -1) != 0).any(axis=1)
            alive |= channel_totals(analysis, att, group, nonzero) > 0
        dead = np.flatnonzero(~alive) if seen else np.zeros(0, np.int64)
        if keep_one and len(dead) == group.channels:
            dead = dead[1:]
        found[group_key(analysis, group)] = dead
    return found
