"""Importance criteria: a score per channel of a group (higher = keep).

Criteria are registered by name; `--importance NAME` picks one. A criterion gets the
whole analysis, so data-driven criteria (activations, gradients) fit the same slot. The
built-in criteria live in `onnxprune.criteria`, one module each; importing the `onnxprune`
package registers them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dependency import Analysis, Attachment, Group
from .errors import OptionError

_CRITERIA: dict[str, type["Criterion"]] = {}
# For the report when a data-driven criterion is asked for without data.
MAGNITUDE_FALLBACK_NOTE = "no calibration data given: channels are scored by weight magnitude"

# Roles whose values say how much a channel matters (biases and running stats do not).
SCORED_ROLES = ("weight_out", "weight_in", "bn_scale")


class Criterion:
    name = ""
    needs_data = False  # scores from calibration activations: prepare() runs first

    def __init__(self, seed: int = 0, compensated: bool = False) -> None:
        self.seed = seed
        # Removal will be followed by mean compensation (recovery): criteria that weigh a
        # channel's mean may score its variance instead.
        self.compensated = compensated
        self.notes: list[str] = []
        # Activation statistics measured by prepare(), by tensor: recovery reuses them.
        self.stats: dict = {}

    def prepare(self, analysis: Analysis, groups: list[Group], calibration) -> None:
        """Measure what scoring `groups` needs on `calibration` (feed dicts) before scores() is called."""

    def scores(self, analysis: Analysis, group: Group) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    _CRITERIA[cls.name] = cls
    return cls


def criterion(name: str, seed: int = 0, compensated: bool = False) -> Criterion:
    if name not in _CRITERIA:
        raise OptionError("importance", name, f"unknown criterion (choose from {', '.join(sorted(_CRITERIA))})")
    return _CRITERIA[name](seed=seed, compensated=compensated)


def prepared_criterion(name: str, seed: int, analysis: Analysis, groups: list[Group], calibration,
                       compensated: bool = False) -> tuple[Criterion, list[str]]:
    """Criterion `name`, prepared on `calibration` when it needs data; l2 and a note when there is none.

    compensated: removal will be followed by mean compensation (recon scores the variance then).
    """
    crit = criterion(name, seed, compensated)
    if not crit.needs_data:
        return crit, []
    if calibration is None:
        return criterion("l2", seed), [f"--importance {name}: {MAGNITUDE_FALLBACK_NOTE} (l2)"]
    crit.prepare(analysis, groups, calibration)
    return crit, []


def criteria_names() -> list[str]:
    return sorted(_CRITERIA)


_REDUCE = {
    "l1": lambda v: np.abs(v).sum(axis=1),
    "l2sq": lambda v: np.einsum("ij,ij->i", v, v, dtype=np.float64),
}


def per_channel(analysis: Analysis, group: Group, roles, kind: str) -> tuple[np.ndarray, int]:
    """Sum of |w| ("l1") or w^2 ("l2sq") over every member with one of `roles`, per channel.

    Returns the scores and how many members contributed.
    """
    total = np.zeros(group.channels, dtype=np.float64)
    used = 0
    for att in group.members:
        if att.role not in roles:
            continue
        per_position = weight_per_position(analysis, att, kind)
        if per_position is None:
            continue
        total += channel_totals(analysis, att, group, per_position)
        used += len(analysis.positions(att, group))
    return total, used


def channel_totals(analysis: Analysis, att: Attachment, group: Group, per_position: np.ndarray) -> np.ndarray:
    """Values per position of a member's axis summed onto the group's channels (a channel may
    sit at several positions: expanded, or repeated in a concatenation)."""
    total = np.zeros(group.channels, dtype=np.float64)
    for offset, exp, n in analysis.positions(att, group):
        total += per_position[offset:offset + n * exp].reshape(n, exp).sum(axis=1)
    return total


@dataclass
class Site:
    """Where a group's channels enter a weighted layer: the layer's weight (a weight_in member)
    and the activation it multiplies, `tensor` on `axis`, laid out as `layout`."""

    weight: Attachment
    tensor: str
    axis: int
    layout: tuple


def consumer_sites(analysis: Analysis, group: Group) -> list[Site]:
    """Every (weight, activation) pair through which the group's channels reach a layer."""
    sites = []
    for att in group.members:
        if att.role != "weight_in":
            continue
        node, index, _ = att.layer_input
        for i, tensor in enumerate(node.inputs):
            if i == index or not tensor.name or analysis.graph.is_const(tensor):
                continue
            for axis, layout in analysis.layouts.get(tensor.name, {}).items():
                if analysis.layout_positions(layout, group):
                    sites.append(Site(att, tensor.name, axis, layout))
    return sites


def weight_per_position(analysis: Analysis, att: Attachment, kind: str) -> np.ndarray | None:
    """Sum of |w| ("l1") or w^2 ("l2sq") of a member's weight per position of its axis."""
    node, index, axis = att.layer_input
    cache = analysis.weight_norms
    key = (node.inputs[index].name, axis, kind)
    if key not in cache:
        value = analysis.graph.evaluate(node.inputs[index])  # float values, dequantized if stored as int
        if value is None:
            return None
        value = np.moveaxis(np.asarray(value, dtype=np.float32), axis, 0)
        cache[key] = _REDUCE[kind](value.reshape(value.shape[0], -1))
    return cache[key]
