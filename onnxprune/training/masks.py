"""Masks held during training: gradual pruning's channels, on Zhu & Gupta's cubic schedule, the
fixed zeros of sparse weights (WeightMasker), and weight sparsity reached on that same schedule
(GradualWeightMasker).

A masked channel has every weight coupled to it (producer filters, biases, normalisation
scale and shift, consumers' input weights) held at zero after every optimizer step, variances
and divisors at one, as planted-dead channels are in the tests. At the end such a channel
carries nothing, and removing it physically leaves the function as it is.

The number of masked channels of a group follows the cubic schedule: at step t of a ramp of T
steps, the fraction of the final count is 1 - (1 - t/T)^3, updated `updates` times over the
ramp; each update masks, among the group's unmasked channels, those whose producer weights
have the smallest L2 norm now. Masks only grow.
"""
from __future__ import annotations

import math

import numpy as np

from ..core.dependency import Analysis, Group
from ..core.plan import candidate_groups, group_key

NEUTRAL = {"bn_var": 1.0, "divisor": 1.0}  # roles whose neutral value is one, not zero


def cubic_fraction(step: int, ramp: int) -> float:
    """Share of the final sparsity reached after `step` of `ramp` steps."""
    if ramp <= 0:
        return 1.0
    progress = min(1.0, max(0.0, step / ramp))
    return 1.0 - (1.0 - progress) ** 3


def update_steps(total: int, ramp_fraction: float, updates: int) -> list[int]:
    """The steps after which masks grow: `updates` of them over the first `ramp_fraction` of
    `total` steps, the last one at the end of the ramp (where the final count is reached)."""
    ramp = max(1, int(total * ramp_fraction))
    every = max(1, math.ceil(ramp / updates))
    return sorted({min(ramp, s) for s in range(every, ramp + every, every)})


class ChannelMasker:
    """Masks for the groups of `analysis` (of the model being trained: its tensor names are the
    training copy's parameter names), growing to `final` ({group key: channels removed})."""

    def __init__(self, analysis: Analysis, final: dict[str, int], ramp_fraction: float = 0.75,
                 updates: int = 20, mask_by: str = "magnitude") -> None:
        groups, _ = candidate_groups(analysis)
        self.analysis = analysis
        self.groups: dict[str, Group] = {group_key(analysis, g): g for g in groups
                                          if final.get(group_key(analysis, g), 0) > 0}
        self.final = {key: final[key] for key in self.groups}
        self.masked: dict[str, np.ndarray] = {key: np.zeros(0, np.int64) for key in self.groups}
        self.ramp_fraction = ramp_fraction
        self.updates = updates
        self.history: list[dict] = []
        self.unwritable: set[str] = set()  # coupled tensors that are not parameters of the training graph
        self.unfolded: dict[str, tuple[str, str]] = {}  # conv weight -> scale, shift of its unfolded BatchNorm
        # movement: the sum over steps of -gradient x weight of every producer weight
        self.movement = Movement({att.tensor.name for g in self.groups.values() for att in g.members
                                  if att.role == "weight_out"}) if mask_by == "movement" else None

    def couple(self, unfolded) -> None:
        """Mask the scale and shift of BatchNorms unfolded after convolutions (prepare.py's
        UnfoldedBatchNorm) with the convolution's output channels: a masked channel's output is
        then zero in training too (batch statistics of zeros, times a zero scale, plus a zero
        shift), and folds back to an all-zero filter and bias."""
        self.unfolded = {bn.weight: (bn.scale, bn.shift) for bn in unfolded}

    def schedule(self, total: int) -> list[int]:
        """The steps after which masks grow (the last one reaches the final counts)."""
        return update_steps(total, self.ramp_fraction, self.updates)

    def restore(self, saved: dict, parameters) -> None:
        """The masks as a checkpoint saved them (`removed()`)."""
        for key, channels in saved.items():
            self.masked[key] = np.asarray(channels, np.int64)

    def update(self, step: int, total: int, parameters) -> None:
        """Grow the masks to where the schedule is after `step`, by current producer norms."""
        ramp = max(1, int(total * self.ramp_fraction))
        share = cubic_fraction(step, ramp)
        for key, group in self.groups.items():
            wanted = min(self.final[key], math.ceil(self.final[key] * share - 1e-9))
            have = self.masked[key]
            if wanted <= len(have):
                continue
            scores = self._producer_norms(group, parameters) if self.movement is None else \
                self._producer_movement(group)
            scores[have] = np.inf
            extra = np.argsort(scores, kind="stable")[: wanted - len(have)]
            self.masked[key] = np.sort(np.concatenate([have, extra]))
        self.history.append({"step": step, "masked": int(sum(len(m) for m in self.masked.values()))})

    def apply(self, parameters) -> None:
        """Hold every masked channel's coupled weights at their neutral values."""
        if self.movement is not None:
            self.movement.accumulate(parameters)
        edits: dict[str, np.ndarray] = {}
        for key, group in self.groups.items():
            channels = self.masked[key]
            if not len(channels):
                continue
            for att in group.members:
                name = att.tensor.name
                value = self._editable(edits, parameters, name)
                if value is None:
                    continue
                index = [slice(None)] * value.ndim
                index[att.axis] = self.analysis.channel_index(att, group, channels)
                value[tuple(index)] = NEUTRAL.get(att.role, 0.0)
                if att.role == "weight_out" and name in self.unfolded:
                    for coupled in self.unfolded[name]:
                        extra = self._editable(edits, parameters, coupled)
                        if extra is not None:
                            extra[index[att.axis]] = 0.0
        for name, value in edits.items():
            parameters[name] = value

    def _editable(self, edits: dict, parameters, name: str) -> np.ndarray | None:
        """A writable copy of parameter `name`, made once per apply (None: not a parameter)."""
        if name not in parameters:
            self.unwritable.add(name)
            return None
        if name not in edits:
            edits[name] = np.array(parameters[name].data, copy=True)
        return edits[name]

    def _producer_norms(self, group: Group, parameters) -> np.ndarray:
        total = np.zeros(group.channels)
        for att in group.members:
            if att.role != "weight_out" or att.tensor.name not in parameters:
                continue
            value = np.asarray(parameters[att.tensor.name].data, np.float64)
            moved = np.moveaxis(value, att.axis, 0)
            for channel in range(group.channels):
                rows = self.analysis.channel_index(att, group, np.array([channel]))
                total[channel] += float((moved[rows] ** 2).sum())
        return total

    def _producer_movement(self, group: Group) -> np.ndarray:
        """Per channel, the movement of its producer weights so far (higher: moved away from zero)."""
        total = np.zeros(group.channels)
        for att in group.members:
            moved = self.movement.sums.get(att.tensor.name) if att.role == "weight_out" else None
            if moved is None:
                continue
            moved = np.moveaxis(moved, att.axis, 0)
            for channel in range(group.channels):
                total[channel] += float(moved[self.analysis.channel_index(att, group, np.array([channel]))].sum())
        return total

    def removed(self) -> dict[str, list[int]]:
        return {key: [int(i) for i in channels] for key, channels in self.masked.items() if len(channels)}


class WeightMasker:
    """The zeros of sparse weights ({parameter name: True where a weight stays}), held after
    every optimizer step: fine-tuning a sparse model leaves its pattern as it was. The masks
    are fixed, so they neither grow nor need saving with a checkpoint."""

    def __init__(self, masks: dict[str, np.ndarray]) -> None:
        self.masks = masks
        self.masked: dict[str, np.ndarray] = {}  # what a checkpoint restores: nothing, masks are fixed
        self.history: list[dict] = []
        self.unwritable: set[str] = set()

    def couple(self, unfolded) -> None:
        """A BatchNorm unfolded after a sparse convolution scales whole filters: zeros stay zeros."""

    def schedule(self, total: int) -> list[int]:
        return []

    def update(self, step: int, total: int, parameters) -> None:  # pragma: no cover - no schedule
        pass

    def restore(self, saved: dict, parameters) -> None:
        pass

    def apply(self, parameters) -> None:
        for name, mask in self.masks.items():
            if name not in parameters:
                self.unwritable.add(name)
                continue
            parameters[name] = np.where(mask, np.asarray(parameters[name].data), 0).astype(
                np.asarray(parameters[name].data).dtype)

    def removed(self) -> dict[str, list[int]]:
        return {}


class GradualWeightMasker:
    """Weight sparsity reached during fine-tuning: every layer's share of zeros follows the cubic
    schedule up to `target` (unstructured or blocks; N:M has no intermediate shares). Each update
    zeroes, among the weights still kept, those of smallest magnitude now, per layer or ranked
    across all layers (`global_rank`). Zeros only grow, and are held after every step."""

    def __init__(self, layers, pattern, target: float, global_rank: bool = False, ramp_fraction: float = 0.75,
                 updates: int = 20, mask_by: str = "magnitude") -> None:
        self.layers = {layer.weight: layer for layer in layers}  # onnxprune.sparsity.SparseLayer
        self.movement = Movement(set(self.layers)) if mask_by == "movement" else None
        self.pattern = pattern
        self.target = target
        self.global_rank = global_rank
        self.ramp_fraction = ramp_fraction
        self.updates = updates
        self.masks: dict[str, np.ndarray] = {}  # weight name -> True where the weight stays
        self.history: list[dict] = []
        self.unwritable: set[str] = set()

    def couple(self, unfolded) -> None:
        """A BatchNorm unfolded after a sparse convolution scales whole filters: zeros stay zeros."""

    def schedule(self, total: int) -> list[int]:
        return update_steps(total, self.ramp_fraction, self.updates)

    def update(self, step: int, total: int, parameters) -> None:
        from onnxprune.sparsity.patterns import layer_mask
        from onnxprune.sparsity.sparsify import global_masks

        share = self.target * cubic_fraction(step, max(1, int(total * self.ramp_fraction)))
        scores, layers = {}, []
        for name, layer in self.layers.items():
            if name not in parameters:
                self.unwritable.add(name)
                continue
            if self.movement is None:
                score = np.abs(layer.to_matrix(np.asarray(parameters[name].data, np.float64)))
            else:  # never below a zeroed weight's score
                score = layer.to_matrix(self.movement.sums.get(name, np.zeros(layer.shape))).astype(np.float64)
                score = score - score.min() if score.size else score
            if name in self.masks:
                score[~layer.to_matrix(self.masks[name])] = -1.0  # zeroed before: stays zeroed
            scores[name] = score
            layers.append(layer)
        chosen = global_masks(layers, scores, self.pattern, share) if self.global_rank else \
            {layer.weight: layer_mask(scores[layer.weight], self.pattern, share, per_row=False) for layer in layers}
        for layer in layers:
            self.masks[layer.weight] = layer.from_matrix(chosen[layer.weight])
        zeros = sum(int((~m).sum()) for m in self.masks.values())
        size = sum(m.size for m in self.masks.values())
        self.history.append({"step": step, "target": round(share, 6), "sparsity": round(zeros / size, 6)
                             if size else 0.0})

    def apply(self, parameters) -> None:
        if self.movement is not None:
            self.movement.accumulate(parameters)
        for name, mask in self.masks.items():
            value = np.asarray(parameters[name].data)
            parameters[name] = np.where(mask, value, 0).astype(value.dtype)

    def removed(self) -> dict[str, int]:
        """How many weights of each layer are zeroed: what a checkpoint keeps (the zeros
        themselves are in the saved weights)."""
        return {name: int((~mask).sum()) for name, mask in self.masks.items()}

    def restore(self, saved: dict, parameters) -> None:
        """Masks again from a checkpoint: a layer's `count` zeroed weights are its smallest now
        (they were held at zero when the state was saved)."""
        for name, count in saved.items():
            value = np.asarray(parameters[name].data)
            mask = np.ones(value.size, dtype=bool)
            mask[np.argsort(np.abs(value).reshape(-1), kind="stable")[:count]] = False
            self.masks[name] = mask.reshape(value.shape)


class Movement:
    """Movement pruning's scores (Sanh et al. 2020): for each weight, the sum over training steps
    of -gradient x weight, high for weights that training moves away from zero. Read after
    every optimizer step from the step's gradients (still held until the next step's
    forward run) and the weights. A masker's `movement`; checkpoints save its `sums`."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.sums: dict[str, np.ndarray] = {}

    def accumulate(self, parameters) -> None:
        for name in self.names:
            if name not in parameters:
                continue
            grad = parameters[name].grad
            if grad is None:
                continue
            change = -np.asarray(grad, np.float64) * np.asarray(parameters[name].data, np.float64)
            self.sums[name] = self.sums[name] + change if name in self.sums else change
