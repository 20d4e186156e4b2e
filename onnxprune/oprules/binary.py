"""Elementwise ops of several inputs with numpy broadcasting (Add, Mul, Where, PRelu, ...).

Per output axis: activation operands that carry channels there are unified; a
constant operand with a full-size axis there is sliced with them (decomposed
BatchNorm, per-channel slopes); an activation whose channels are not tracked there
fixes the group, since it cannot shrink along with it.
"""
from onnxprune.core.rules import OpRule, Refuse, register

ROLES = {"Mul": "scale", "Add": "offset", "Sub": "offset", "PRelu": "slope", "Pow": "exponent"}


@register
class Broadcasting(OpRule):
    ops = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where",
           "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "Mod")

    def propagate(self, node, ctx):
        operands = [(i, t) for i, t in enumerate(node.inputs) if t is not None and t.name != ""]
        if not ctx.any_tracked():
            if ctx.hidden_mode and node.op in ("Add", "Sub", "Mul", "Div"):
                self._scaled_statistic(node, ctx, operands)
            return
        shapes = {i: ctx.shape(t) for i, t in operands}
        if any(s is None for s in shapes.values()):
            raise Refuse("an operand has unknown rank")
        out_rank = max(len(s) for s in shapes.values())
        out = node.outputs[0]
        for k in range(out_rank):
            tracked, consts, strangers = [], [], []
            for i, t in operands:
                shape = shapes[i]
                axis = k - (out_rank - len(shape))
                if axis < 0:
                    continue
                layout = ctx.layouts(t).get(axis)
                if layout is not None:
                    tracked.append(layout)
                elif shape[axis] == 1:
                    continue
                elif ctx.is_weight(i):
                    consts.append((i, axis))
                else:
                    strangers.append(t.name)
            if not tracked:
                continue
            base = tracked[0]
            for other in tracked[1:]:
                ctx.unify(base, other)
            if strangers:
                ctx.fix(base, f"combined with {strangers[0]!r}, whose channels are fixed")
            for i, axis in consts:
                ctx.attach(i, axis, base, self._role(node.op, i))
            ctx.set_layout(out, k, base)

    def _scaled_statistic(self, node, ctx, operands):
        """In hidden mode: a per-token statistic (1/std, taken across the width) times a per-channel
        constant (a decomposed LayerNorm's scale) spreads over the width; those channels meet the
        width's own where the product is applied, so the constant is sliced with them. Only along
        the last axis, where tensors of token models keep their width."""
        shapes = {i: ctx.shape(t) for i, t in operands}
        if any(s is None for s in shapes.values()):
            return
        weights = {i for i, _ in operands if ctx.is_weight(i)}
        if not weights or len(weights) == len(operands):
            return
        # the width is the last axis, the constant a vector along it: [..., 1, width]
        full = [i for i in weights if shapes[i] and isinstance(shapes[i][-1], int) and shapes[i][-1] > 1
                and all(d == 1 for d in shapes[i][:-1])]
        if len(full) != 1 or any(shapes[i] and shapes[i][-1] != 1 for i, _ in operands if i not in weights):
            return
        i = full[0]
        layout = ctx.new_channels(shapes[i][-1], hidden=True)
        ctx.attach(i, len(shapes[i]) - 1, layout, self._role(node.op, i))
        ctx.set_layout(node.outputs[0], max(len(s) for s in shapes.values()) - 1, layout)

    @staticmethod
    def _role(op, index):
        if op == "Div":
            return "divisor" if index == 1 else "operand"
        if op == "Where":
            return "mask" if index == 0 else "operand"
        return ROLES.get(op, "operand")
