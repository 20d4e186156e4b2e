"""Gemm and MatMul with a constant weight: fully connected layers, NHWC 1x1 projections."""
from onnxprune.rules import OpRule, Refuse, register


@register
class GemmRule(OpRule):
    ops = ("Gemm",)

    def propagate(self, node, ctx):
        b = ctx.input(1)
        b_shape = ctx.shape(b)
        if b is None or b_shape is None or len(b_shape) != 2 or not ctx.is_weight(1):
            if ctx.any_tracked():
                raise Refuse("weight B is not a 2-D constant")
            return
        trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
        a = ctx.input_layouts(0)
        k_axis_a = 0 if trans_a else 1
        for axis in a:
            if axis != k_axis_a:
                raise Refuse("channels on the rows (M axis) of A")
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        if k_axis_a in a:
            ctx.attach(1, k_axis, a[k_axis_a], "weight_in")
        out = ctx.new_channels(b_shape[n_axis])
        ctx.attach(1, n_axis, out, "weight_out")
        c = ctx.input(2)
        if c is not None:
            c_shape = ctx.shape(c)
            if c_shape is None:
                raise Refuse("bias C of unknown shape")
            if len(c_shape) >= 1 and c_shape[-1] == b_shape[n_axis] and c_shape[-1] != 1:
                ctx.attach(2, len(c_shape) - 1, out, "bias")
        ctx.set_layout(node.outputs[0], 1, out)


@register
class MatMulRule(OpRule):
    ops = ("MatMul",)

    def propagate(self, node, ctx):
        a, b = ctx.input(0), ctx.input(1)
        b_shape = ctx.shape(b)
        if b_shape is None or len(b_shape) != 2 or not ctx.is_weight(1):
            if ctx.any_tracked():
                raise Refuse("B is not a 2-D constant weight (activation x activation is handled by head rules)")
            return
        if ctx.is_weight(0):
            if ctx.input_layouts(1):
                raise Refuse("constant weight on the left of a tracked activation")
            return
        rank = ctx.rank(a)
        if rank is None:
            raise Refuse("input of unknown rank")
        y = node.outputs[0]
        for axis, layout in ctx.input_layouts(0).items():
            if axis == rank - 1:
                ctx.attach(1, 0, layout, "weight_in")
            else:
                ctx.set_layout(y, axis, layout)
        out = ctx.new_channels(b_shape[1])
        ctx.attach(1, 1, out, "weight_out")
        ctx.set_layout(y, rank - 1, out)
