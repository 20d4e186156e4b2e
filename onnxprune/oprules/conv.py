"""Conv and ConvTranspose: the main producers and consumers of channels."""
from onnxprune.core.layout import expand, tile
from onnxprune.core.rules import OpRule, Refuse, register

from ._common import only_axes


def _weight_shape(ctx):
    w = ctx.input(1)
    shape = ctx.shape(w)
    if w is None or shape is None or None in shape or not ctx.is_weight(1):
        raise Refuse("weight is not a constant of known shape")
    return shape


@register
class ConvRule(OpRule):
    ops = ("Conv",)

    def propagate(self, node, ctx):
        only_axes(ctx, 0, {1}, "reach a convolution's batch or spatial axis")
        cout, cin_per_group = _weight_shape(ctx)[:2]
        group = int(ctx.attr("group", 1))
        x = ctx.input_layouts(0).get(1)
        y = node.outputs[0]
        if group == 1:
            if x is not None:
                ctx.attach(1, 1, x, "weight_in")
            out = ctx.new_channels(cout)
        elif cin_per_group == 1 and cout % group == 0:
            # Depthwise: output channel o reads input channel o // multiplier, so the
            # output channels are the input channels (expanded); pruning removes groups.
            if x is None:
                return  # input channels are fixed, hence so are the outputs
            out = expand(x, cout // group)
            ctx.on_apply(lambda ap: ap.set_attr(node, "group", ap.new_size(x)))
        else:
            # Grouped: every group keeps the same in-group channel indices, so the
            # group count and the per-group structure stay valid.
            if cout % group:
                raise Refuse(f"{cout} output channels do not divide into {group} groups")
            if x is not None:
                part = ctx.new_channels(cin_per_group)
                ctx.unify(x, tile(part, group))
                ctx.attach(1, 1, part, "weight_in")
            out = tile(ctx.new_channels(cout // group), group)
        ctx.attach(1, 0, out, "weight_out")
        ctx.attach(2, 0, out, "bias")
        ctx.set_layout(y, 1, out)


@register
class ConvTransposeRule(OpRule):
    ops = ("ConvTranspose",)

    def propagate(self, node, ctx):
        only_axes(ctx, 0, {1}, "reach a transposed convolution's batch or spatial axis")
        _, cout_per_group = _weight_shape(ctx)[:2]
        if int(ctx.attr("group", 1)) != 1:
            raise Refuse("grouped ConvTranspose is not supported")
        x = ctx.input_layouts(0).get(1)
        if x is not None:
            ctx.attach(1, 0, x, "weight_in")
        out = ctx.new_channels(cout_per_group)
        ctx.attach(1, 1, out, "weight_out")
        ctx.attach(2, 0, out, "bias")
        ctx.set_layout(node.outputs[0], 1, out)
