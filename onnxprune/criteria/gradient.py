"""Gradient criteria: what removing a channel does to the loss, from gradients on calibration data.

For every sample, g is the gradient of the cross-entropy (labels from the data, else the
model's own predictions) with respect to each weight (onnxprune/training/gradients.py, through
onnxruntime-training: needs the [training] extra). Over the coupled weights of a channel (the
members magnitude sums over: producer filters, consumer input weights, BatchNorm scales):

- taylor: the first-order change of the loss when the channel goes, per sample, as an
  absolute value: mean over samples of |sum g * w| (Molchanov et al. 2017, on weights);
- fisher: its square, the Fisher information of a mask on the channel: mean over samples of
  (sum g * w)^2 / 2 (Theis et al. 2018; Molchanov et al. 2019);
- obd: Optimal Brain Damage's saliency with the diagonal Hessian estimated by the empirical
  Fisher: sum over the weights of E[g^2] * w^2 / 2 (LeCun et al. 1990).

A channel whose weights are all zero scores zero under each. Scores are measured once, on the
model as the analysis holds it (at the calibration samples, one at a time).
"""
from __future__ import annotations

import numpy as np

from onnxprune.core.criteria import SCORED_ROLES, Criterion, channel_totals, register_criterion
from onnxprune.core.progress import log


class GradientCriterion(Criterion):
    needs_data = True
    needs_gradients = True
    # how many calibration samples the gradients are taken on (one forward and backward each)
    samples = 256

    def prepare(self, analysis, groups, calibration) -> None:
        from onnxprune.training.gradients import per_sample_gradients, require_gradients

        require_gradients(f"--importance {self.name}")

        sites: dict[tuple[str, int], np.ndarray] = {}  # (weight, axis) -> the weight, that axis first
        members: dict[int, list] = {}
        for group in groups:
            chosen = []
            for att in group.members:
                if att.role not in SCORED_ROLES:
                    continue
                node, index, axis = att.layer_input
                key = (node.inputs[index].name, axis)
                if key not in sites:
                    value = analysis.graph.evaluate(node.inputs[index])
                    if value is None:
                        continue
                    sites[key] = np.moveaxis(np.asarray(value, np.float64), axis, 0)
                chosen.append((att, key))
            members[group.id] = chosen
        absolute = {g.id: np.zeros(g.channels) for g in groups}
        squared = {g.id: np.zeros(g.channels) for g in groups}
        curvature = {g.id: np.zeros(g.channels) for g in groups}
        lookup = {g.id: g for g in groups}
        missing: set[str] = set()

        def visit(gradients: dict) -> None:
            products, diagonal = {}, {}
            for (name, axis), weight in sites.items():
                grad = gradients.get(name)
                if grad is None:
                    missing.add(name)
                    continue
                g = np.moveaxis(np.asarray(grad, np.float64), axis, 0)
                products[(name, axis)] = (g * weight).reshape(len(g), -1).sum(axis=1)
                diagonal[(name, axis)] = (g * g * weight * weight).reshape(len(g), -1).sum(axis=1)
            for gid, chosen in members.items():
                group = lookup[gid]
                total = np.zeros(group.channels)
                for att, key in chosen:
                    if key not in products:
                        continue
                    total += channel_totals(analysis, att, group, products[key])
                    curvature[gid] += channel_totals(analysis, att, group, diagonal[key])
                absolute[gid] += np.abs(total)
                squared[gid] += total * total

        labels = getattr(calibration, "labels", None)
        run = per_sample_gradients(analysis.graph.model, calibration, visit, labels=labels, limit=self.samples)
        count = max(run.samples, 1)
        self._scores = {
            "taylor": {gid: absolute[gid] / count for gid in members},
            "fisher": {gid: squared[gid] / (2 * count) for gid in members},
            "obd": {gid: curvature[gid] / (2 * count) for gid in members},
        }
        self.unscored = {gid for gid, chosen in members.items()
                         if not any(key[0] not in missing for _, key in chosen)}
        self.run = run
        source = "the data's labels" if run.labels == "given" else "the model's own predictions (no labels given)"
        self.notes.append(f"--importance {self.name}: gradients of the cross-entropy against {source} on "
                          f"{run.samples} calibration sample(s), one at a time, in {run.seconds:.1f} s")
        if self.unscored:
            self.notes.append(f"--importance {self.name}: {len(self.unscored)} group(s) have no trained weight to "
                              "take gradients of and are scored by l2")
        log.info("%s: gradients on %d samples in %.1f s", self.name, run.samples, run.seconds)

    def scores(self, analysis, group):
        if group.id in self.unscored:
            from onnxprune.core.criteria import per_channel

            squares, _ = per_channel(analysis, group, SCORED_ROLES, "l2sq")
            return np.sqrt(squares)
        return self._scores[self.name][group.id]


@register_criterion
class Taylor(GradientCriterion):
    name = "taylor"


@register_criterion
class Fisher(GradientCriterion):
    name = "fisher"


@register_criterion
class OBD(GradientCriterion):
    name = "obd"
