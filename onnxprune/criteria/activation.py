"""Criteria from calibration activations, measured where a group's channels enter a layer.

For every consumer site (a layer's weight and the activation it multiplies, see
core.criteria.consumer_sites) the activation's per-position statistics are collected in one
streaming pass over the calibration data. Per channel:

- act:    mean |x|, averaged over the sites;
- apoz:   1 - the fraction of exact zeros (average percentage of zeros, after ReLU-like ops);
- wanda:  sum over sites of rms(x) * sum |W| over the weights that read the channel
          (Wanda's |W| * ||X|| for whole input channels);
- recon:  sum over sites of E[x^2] * ||W||^2: the expected squared change of the layer's
          output when the channel alone is removed (its variance instead of E[x^2] when the
          removed channels' mean is compensated in the bias, --recover bias).

A group with no measurable site is scored by l2 magnitude, and a note says how many. Ties
(channels the data never activates) are broken by l2 magnitude.
"""
from __future__ import annotations

import numpy as np

from onnxprune.core.criteria import (
    Criterion,
    consumer_sites,
    criterion,
    register_criterion,
    weight_per_position,
)


class ActivationCriterion(Criterion):
    needs_data = True
    weight_kind: str | None = None  # "l1" / "l2sq": multiply by the consumer weights

    def __init__(self, seed: int = 0, compensated: bool = False) -> None:
        super().__init__(seed, compensated)
        self.sites: dict[int, list] = {}
        self._fallbacks = 0

    def prepare(self, analysis, groups, calibration) -> None:
        from onnxprune.calibration import collect_channel_stats

        self.sites = {g.id: consumer_sites(analysis, g) for g in groups}
        tensors = {site.tensor: site.axis for sites in self.sites.values() for site in sites}
        self.stats = collect_channel_stats(analysis.graph.model, calibration, tensors) if tensors else {}

    def measure(self, stats) -> np.ndarray:  # pragma: no cover - interface
        """One value per position of the site's axis."""
        raise NotImplementedError

    def scores(self, analysis, group):
        sites = [s for s in self.sites.get(group.id, []) if s.tensor in self.stats]
        total = np.zeros(group.channels)
        used = 0
        for site in sites:
            per_position = self.measure(self.stats[site.tensor])
            runs = analysis.layout_positions(site.layout, group)
            weights = None
            if self.weight_kind:
                weights = weight_per_position(analysis, site.weight, self.weight_kind)
                weight_runs = analysis.positions(site.weight, group)
                if weights is None:
                    continue
                if [(e, n) for _, e, n in weight_runs] != [(e, n) for _, e, n in runs]:
                    # Grouped convolutions: the weight holds one group's channels, the activation all.
                    runs = runs[:len(weight_runs)] if len(runs) % len(weight_runs) == 0 else []
                    if [(e, n) for _, e, n in weight_runs] != [(e, n) for _, e, n in runs]:
                        continue
            for i, (offset, exp, n) in enumerate(runs):
                block = per_position[offset:offset + n * exp].reshape(n, exp)
                if weights is not None:
                    w_offset = weight_runs[i][0]
                    block = block * weights[w_offset:w_offset + n * exp].reshape(n, exp)
                total += self.combine(block)
                used += 1
        magnitude = criterion("l2").scores(analysis, group)
        if not used:
            self._fallbacks += 1
            self._note_fallback()
            return magnitude
        return _break_ties(self.finish(total, used), magnitude)

    def combine(self, block: np.ndarray) -> np.ndarray:
        return block.sum(axis=1)

    def finish(self, total: np.ndarray, used: int) -> np.ndarray:
        return total

    def _note_fallback(self):
        self.notes[:] = [n for n in self.notes if not n.startswith("no activation measured")]
        self.notes.append(f"no activation measured for {self._fallbacks} group(s): scored by l2 magnitude")


# Channels that calibration data never activates all score 0 (after ReLU, say); among
# them, the ones with the smallest weights go first. The nudge is far below any real gap.
_TIE_BREAK = 1e-6


def _break_ties(scores: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    top = float(np.max(scores)) if scores.size and np.max(scores) > 0 else 1.0
    biggest = float(np.max(magnitude)) if magnitude.size and np.max(magnitude) > 0 else 1.0
    return scores + _TIE_BREAK * top * magnitude / biggest


class _AveragedActivation(ActivationCriterion):
    """A per-position activation statistic, averaged over a channel's positions and its sites."""

    def combine(self, block):
        return block.mean(axis=1)

    def finish(self, total, used):
        return total / used


@register_criterion
class MeanAbsActivation(_AveragedActivation):
    name = "act"

    def measure(self, stats):
        return stats.mean_abs


@register_criterion
class APoZ(_AveragedActivation):
    name = "apoz"

    def measure(self, stats):
        return 1.0 - stats.apoz


@register_criterion
class Wanda(ActivationCriterion):
    name = "wanda"
    weight_kind = "l1"

    def measure(self, stats):
        return stats.rms


@register_criterion
class Reconstruction(ActivationCriterion):
    name = "recon"
    weight_kind = "l2sq"

    def measure(self, stats):
        return stats.variance if self.compensated else stats.rms ** 2
