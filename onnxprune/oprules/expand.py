"""Expand broadcasts to a target shape: a channel entry in it is rewritten or must follow."""
from onnxprune.core.rules import OpRule, Refuse, register
from onnxprune.core.shape_exprs import Dim, Lit, entries


@register
class ExpandRule(OpRule):
    ops = ("Expand",)

    @staticmethod
    def output_shape(node, graph):
        """Broadcast of the input with a constant target (onnx cannot propagate folded targets)."""
        shape, target = graph.shape(node.inputs[0]), graph.const(node.inputs[1])
        if shape is None or target is None:
            return None
        target = [int(v) for v in target.reshape(-1)]
        rank = max(len(shape), len(target))
        shape = [1] * (rank - len(shape)) + list(shape)
        target = [1] * (rank - len(target)) + target
        out = []
        for a, b in zip(shape, target):
            if a is None:
                out.append(None if b == 1 else b)
            else:
                out.append(b if a == 1 else a)
        return out

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        target = entries(ctx.graph, ctx.input(1), node, 1)
        rank = ctx.rank(ctx.input(0))
        if target is None or rank is None:
            raise Refuse("target shape is computed by ops onnxprune cannot follow")
        out_rank = max(rank, len(target))
        for axis, layout in layouts.items():
            k = axis + out_rank - rank
            ctx.set_layout(node.outputs[0], k, layout)
            j = k - (out_rank - len(target))
            if j < 0:
                continue
            entry = target[j]
            if isinstance(entry, Lit) and entry.value == 1:
                continue  # broadcasting keeps the input's size
            if isinstance(entry, Lit) and entry.value == ctx.size(layout) and entry.source is not None:
                ctx.rewrite_literal(entry.source, layout, entry.shared)
            elif isinstance(entry, Dim) and ctx.layouts(entry.tensor).get(entry.axis) is not None:
                ctx.unify(ctx.layouts(entry.tensor)[entry.axis], layout)
            else:
                raise Refuse("target spells the channel count in a way onnxprune cannot rewrite")
