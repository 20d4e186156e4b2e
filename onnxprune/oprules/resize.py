"""Resize / Upsample: the channel axis must not be scaled; an explicit size for it is rewritten."""
import numpy as np

from onnxprune.core.rules import OpRule, Refuse, register

from ._common import int_list, passthrough


@register
class ResizeRule(OpRule):
    ops = ("Resize", "Upsample")

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        axes = int_list(ctx.attr("axes")) or list(range(rank))
        axes = [a + rank if a < 0 else a for a in axes]
        if node.op == "Upsample" or ctx.opset < 11:
            scales_index, sizes_index = (1 if "scales" not in node.attrs else None), None
        else:
            scales_index, sizes_index = 2, 3
        if "scales" in node.attrs:
            self._check_scales(node.attrs["scales"], axes, layouts)
        if scales_index is not None and ctx.input(scales_index) is not None:
            scales = ctx.const(ctx.input(scales_index))
            if scales is None:
                raise Refuse("scales are not a constant")
            self._check_scales(scales, axes, layouts)
        sizes_t = ctx.input(sizes_index) if sizes_index is not None else None
        if sizes_t is not None:
            sizes = int_list(ctx.const(sizes_t))
            if sizes is None:
                raise Refuse("sizes are not a constant")

            def rewrite(ap):
                new = list(sizes)
                for j, axis in enumerate(axes):
                    if axis in layouts:
                        new[j] = ap.new_size(layouts[axis])
                if new != sizes:
                    ap.set_const_input(node, sizes_index, np.array(new, dtype=np.int64))

            ctx.on_apply(rewrite)
        passthrough(ctx)

    @staticmethod
    def _check_scales(scales, axes, layouts):
        values = np.asarray(scales, dtype=np.float64).reshape(-1)
        if values.size == 0:
            return
        for j, axis in enumerate(axes):
            if axis in layouts and j < values.size and values[j] != 1.0:
                raise Refuse("scales the channel axis")
