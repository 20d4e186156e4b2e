"""|gamma| of the normalization layers in the group (network slimming); L2 where there is none."""

from onnxprune.core.criteria import (
    Criterion,
    criterion,
    per_channel,
    register_criterion,
)


@register_criterion
class BNScale(Criterion):
    name = "bn"

    def scores(self, analysis, group):
        gammas, used = per_channel(analysis, group, ("bn_scale",), "l1")
        if used:
            return gammas
        note = "groups without a normalization layer were scored by l2"
        if note not in self.notes:
            self.notes.append(note)
        return criterion("l2").scores(analysis, group)
