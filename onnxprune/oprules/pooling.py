"""Pooling keeps batch and channel axes; the spatial axes change size."""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import only_axes, passthrough, used


@register
class PoolRule(OpRule):
    ops = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

    def propagate(self, node, ctx):
        only_axes(ctx, 0, {0, 1}, "are pooled over")
        if len(node.outputs) > 1 and used(node.outputs[1]):
            raise Refuse("MaxPool indices are used (they count across channels)")
        passthrough(ctx)
