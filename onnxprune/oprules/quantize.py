"""QuantizeLinear / DequantizeLinear on activations (QDQ graphs).

Per-tensor scales make them elementwise. Per-channel scales along a channel axis are
sliced with the channels. (Quantized *weights* are followed by onnxprune.core.weight_paths.)
"""
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import norm_axis, passthrough


@register
class QuantizeDequantizeRule(OpRule):
    ops = ("QuantizeLinear", "DequantizeLinear")

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        if int(ctx.attr("block_size", 0) or 0):
            raise Refuse("blocked quantization is not supported")
        scale_shape = ctx.shape(ctx.input(1))
        if scale_shape is None:
            raise Refuse("scale of unknown shape")
        if len(scale_shape) and scale_shape != (1,):
            rank = ctx.rank(ctx.input(0))
            if rank is None:
                raise Refuse("input of unknown rank")
            axis = norm_axis(ctx.attr("axis", 1), rank)
            if axis in layouts:
                ctx.attach(1, 0, layouts[axis], "quant_scale")
                ctx.attach(2, 0, layouts[axis], "quant_zero_point")
        passthrough(ctx)
