"""Random scores: the baseline every real criterion should beat. Seeded, so runs repeat."""
import numpy as np

from onnxprune.core.criteria import Criterion, register_criterion


@register_criterion
class RandomScore(Criterion):
    name = "random"

    def scores(self, analysis, group):
        rng = np.random.default_rng([self.seed, group.id])
        return rng.random(group.channels)
