"""L1 / L2 magnitude of every coupled weight of a channel (producers and consumers)."""

import numpy as np

from onnxprune.core.criteria import (
    SCORED_ROLES,
    Criterion,
    per_channel,
    register_criterion,
)


@register_criterion
class L2(Criterion):
    name = "l2"

    def scores(self, analysis, group):
        squares, _ = per_channel(analysis, group, SCORED_ROLES, "l2sq")
        return np.sqrt(squares)


@register_criterion
class L1(Criterion):
    name = "l1"

    def scores(self, analysis, group):
        sums, _ = per_channel(analysis, group, SCORED_ROLES, "l1")
        return sums
