"""Split and Slice: outputs are cuts of the input's layout; sizes and bounds are rewritten."""
import numpy as np

from onnxprune.core.layout import cut
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import int_list, norm_axis, run_time_list


@register
class SplitRule(OpRule):
    ops = ("Split",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        axis = norm_axis(ctx.attr("axis", 0), rank)
        outs = node.outputs
        for k, layout in layouts.items():
            if k != axis:
                for o in outs:
                    ctx.set_layout(o, k, layout)
        if axis not in layouts:
            return
        whole = layouts[axis]
        total = ctx.size(whole)
        sizes = self._sizes(node, ctx, total, len(outs))
        pieces, offset = [], 0
        for o, n in zip(outs, sizes):
            piece = cut(whole, offset, offset + n, ctx.atoms)
            pieces.append(piece)
            ctx.set_layout(o, axis, piece)
            offset += n

        def rewrite(ap):
            new = [ap.new_size(p) for p in pieces]
            if new == sizes:
                return
            if ctx.opset >= 13:
                ap.set_const_input(node, 1, np.array(new, dtype=np.int64))
                ap.del_attr(node, "num_outputs")
            else:
                ap.set_attr(node, "split", new)

        ctx.on_apply(rewrite)

    @staticmethod
    def _sizes(node, ctx, total, count):
        if "split" in node.attrs:
            sizes = int_list(node.attrs["split"])
        elif len(node.inputs) > 1 and node.inputs[1].name:
            sizes = int_list(ctx.const(node.inputs[1]))
            if sizes is None:
                raise Refuse("split sizes are not a constant")
        else:
            chunk = -(-total // count)  # opset 18: last chunk may be smaller
            sizes = [min(chunk, total - i * chunk) for i in range(count)]
        if sum(sizes) != total or len(sizes) != count:
            raise Refuse("split sizes do not match the input")
        return sizes


@register
class SliceRule(OpRule):
    ops = ("Slice",)

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        shape = ctx.shape(ctx.input(0))
        if shape is None:
            raise Refuse("input of unknown rank")
        rank = len(shape)
        params = self._params(node, ctx, rank)
        starts, ends, axes, steps = params
        out = node.outputs[0]
        sliced = {}
        for j, axis in enumerate(axes):
            if axis in layouts:
                if None in (starts[j], ends[j], steps[j]):
                    raise Refuse("slices channels at bounds computed at run time")
                if steps[j] != 1:
                    raise Refuse("slices channels with a step other than 1")
                dim = ctx.size(layouts[axis])
                lo, hi = _clamp(starts[j], dim), _clamp(ends[j], dim)
                hi = max(lo, hi)
                sliced[axis] = (j, lo, hi, cut(layouts[axis], lo, hi, ctx.atoms))
                ctx.consume(cut(layouts[axis], 0, lo, ctx.atoms) + cut(layouts[axis], hi, dim, ctx.atoms))
        for axis, layout in layouts.items():
            if axis in sliced:
                if sliced[axis][2] > sliced[axis][1]:
                    ctx.set_layout(out, axis, sliced[axis][3])
            else:
                ctx.set_layout(out, axis, layout)
        if not sliced:
            return

        def rewrite(ap):
            new_starts, new_ends = list(starts), list(ends)
            for axis, (j, lo, hi, _) in sliced.items():
                kept = ap.positions(layouts[axis])
                new_starts[j] = int(np.count_nonzero(kept < lo))
                new_ends[j] = new_starts[j] + int(np.count_nonzero((kept >= lo) & (kept < hi)))
            if new_starts == starts and new_ends == ends:
                return
            if ctx.opset >= 10:
                ap.set_const_input(node, 1, np.array(new_starts, dtype=np.int64))
                ap.set_const_input(node, 2, np.array(new_ends, dtype=np.int64))
            else:
                ap.set_attr(node, "starts", new_starts)
                ap.set_attr(node, "ends", new_ends)

        ctx.on_apply(rewrite)

    @staticmethod
    def _params(node, ctx, rank):
        if ctx.opset < 10:
            starts, ends = int_list(ctx.attr("starts")), int_list(ctx.attr("ends"))
            axes = int_list(ctx.attr("axes")) or list(range(len(starts)))
            steps = [1] * len(starts)
        else:
            values = []
            for i in range(1, 5):
                t = ctx.input(i)
                if t is None:
                    values.append(None)
                    continue
                v = int_list(ctx.const(t))
                if v is None and i != 3:  # bounds or steps computed at run time: known where it matters?
                    v = run_time_list(ctx, t)
                if v is None:
                    raise Refuse(f"slice input {t.name!r} is not a constant")
                values.append(v)
            starts, ends, axes, steps = values
            axes = axes if axes is not None else list(range(len(starts)))
            steps = steps if steps is not None else [1] * len(starts)
        axes = [norm_axis(a, rank) for a in axes]
        return starts, ends, axes, steps


def _clamp(index, dim):
    if index < 0:
        index += dim
    return min(max(index, 0), dim)
