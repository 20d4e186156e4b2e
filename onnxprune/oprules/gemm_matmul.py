"""Gemm and MatMul with a constant weight: fully connected layers, NHWC 1x1 projections."""
from onnxprune.core.rules import OpRule, Refuse, register


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
        if not ctx.is_weight(1) and not ctx.is_weight(0):
            if ctx.any_tracked():
                self._activations(node, ctx)
            return
        if b_shape is None or len(b_shape) != 2 or not ctx.is_weight(1):
            if ctx.any_tracked():
                raise Refuse("B is not a 2-D constant weight")
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

    @staticmethod
    def _activations(node, ctx):
        """Activation x activation (attention scores, context): batch axes such as heads pass
        through and must agree on both sides; the contracted axis must agree too."""
        sa, sb = ctx.shape(ctx.input(0)), ctx.shape(ctx.input(1))
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            raise Refuse("activation x activation with unknown or vector ranks")
        la, lb = ctx.input_layouts(0), ctx.input_layouts(1)
        rank = max(len(sa), len(sb))
        y = node.outputs[0]
        # contracted: A's last axis with B's second to last
        ka, kb = la.get(len(sa) - 1), lb.get(len(sb) - 2)
        if ka is not None and kb is not None:
            ctx.unify(ka, kb)
            ctx.consume(ka)
        elif ka is not None or kb is not None:
            # One side's channels meet a fixed axis (multi-query attention: every query head
            # against one shared key head): those channels stay; the other axes go on as usual.
            kept = ka if ka is not None else kb
            ctx.fix(kept, "contracted with an axis that keeps its size")
            ctx.consume(kept)
        if len(sa) - 2 in la:
            ctx.set_layout(y, rank - 2, la[len(sa) - 2])
        if len(sb) - 1 in lb:
            ctx.set_layout(y, rank - 1, lb[len(sb) - 1])
        for k in range(rank - 2):  # batch axes, broadcast from the right
            ia, ib = k - (rank - len(sa)), k - (rank - len(sb))
            sides = [(la.get(ia), sa[ia] if ia >= 0 else 1), (lb.get(ib), sb[ib] if ib >= 0 else 1)]
            tracked = [lay for lay, _ in sides if lay is not None]
            if not tracked:
                continue
            for lay, dim in sides:
                if lay is None and dim != 1:
                    raise Refuse("batch axis of channels meets an axis that keeps its size")
            if len(tracked) == 2:
                ctx.unify(tracked[0], tracked[1])
            ctx.set_layout(y, k, tracked[0])
