"""Reductions: fine over other axes, a constraint over the channels themselves."""
import numpy as np
import onnx

from onnxprune.core.rules import OpRule, Refuse, register

from ._common import axes_operand, norm_axis


@register
class ReduceRule(OpRule):
    ops = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        axes = axes_operand(ctx)
        if not axes:
            if int(ctx.attr("noop_with_empty_axes", 0)):
                axes = []
            else:
                axes = list(range(rank))
        axes = {norm_axis(a, rank) for a in axes}
        keepdims = bool(int(ctx.attr("keepdims", 1)))
        if ctx.hidden_mode and node.op in ACROSS_HIDDEN and axes & set(layouts):
            reduce_across_hidden(ctx, layouts, axes, rank, keepdims)
            return
        reduce_over(ctx, layouts, axes, rank, keepdims)


@register
class ArgReduceRule(OpRule):
    ops = ("ArgMax", "ArgMin")

    def propagate(self, node, ctx):
        layouts = ctx.input_layouts(0)
        if not layouts:
            return
        rank = ctx.rank(ctx.input(0))
        if rank is None:
            raise Refuse("input of unknown rank")
        axis = norm_axis(ctx.attr("axis", 0), rank)
        reduce_over(ctx, layouts, {axis}, rank, bool(int(ctx.attr("keepdims", 1))))


# Reductions over the hidden size that stay exact where the removed channels are zero (once a
# mean's divisor is put back); max/min/log-sum-exp would see the zeros, and there is no zero to see.
ACROSS_HIDDEN = {"ReduceMean": "mean", "ReduceSum": "sum", "ReduceSumSquare": "sum", "ReduceL1": "sum",
                 "ReduceL2": "sum"}


def reduce_over(ctx, layouts, axes, rank, keepdims):
    if axes & set(layouts):
        hint = "; --hidden prunes it" if ctx.node.op in ACROSS_HIDDEN else ""
        raise Refuse(f"reduces over the channels{hint}")
    out = ctx.node.outputs[0]
    for axis, layout in layouts.items():
        new_axis = axis if keepdims else axis - sum(1 for a in axes if a < axis)
        ctx.set_layout(out, new_axis, layout)


def reduce_across_hidden(ctx, layouts, axes, rank, keepdims):
    """A reduction over the hidden size (RMSNorm's and a decomposed LayerNorm's statistics),
    in hidden mode: the channels end here, and the statistic is put back to what the original
    width gives where the removed channels are zero. A mean is multiplied back by kept/original;
    the spread around a mean, sum((x - m)^2), gets back the removed channels' m^2 each."""
    node = ctx.node
    across = [layouts[a] for a in sorted(axes & set(layouts))]
    kind = ACROSS_HIDDEN[node.op]
    reduced, mean_of = _reduced_value(ctx, node.inputs[0])
    if reduced == "spread" and (not keepdims or node.op not in ("ReduceMean", "ReduceSum")
                                or ctx.rank(mean_of) != rank):
        reduced = "shifted"
    cost = {"zeros": f"a {kind} over the kept channels" + (", multiplied back by kept/original" if kind == "mean"
                                                             else "") + ": exact where the removed channels are zero",
            "spread": f"a {kind} of squared deviations over the kept channels, with the removed channels' share "
                      "added back: exact where the removed channels are zero",
            "shifted": f"a {kind} of values shifted by a per-token statistic over the kept channels: approximate"}
    for layout in across:
        ctx.consume(layout)
        ctx.across_channels(layout, cost[reduced], exact=reduced != "shifted")
    reduce_over(ctx, {a: v for a, v in layouts.items() if a not in axes}, axes, rank, keepdims)
    if kind == "sum" and reduced != "spread":
        return
    sizes = np.prod([ctx.size(layout) for layout in across], dtype=np.float64)
    dtype = float_dtype(node.inputs[0].dtype)
    if dtype is None:
        raise Refuse(f"a {kind} over the hidden size of a type other than float16/32/64")

    def correct(applier):
        kept = np.prod([applier.new_size(layout) for layout in across], dtype=np.float64)
        if kept == sizes:
            return
        out = node.outputs[0]
        if kind == "mean":
            applier.insert_after(node, "Mul", np.array(kept / sizes, dtype=dtype))
        if reduced == "spread":  # + (original - kept) * m^2, as a share of the original width for a mean
            share = (sizes - kept) / sizes if kind == "mean" else sizes - kept
            squared = applier.add_node("Mul", [mean_of, mean_of], dtype)
            applier.insert_after(out.inputs[0], "Add", applier.add_node("Mul", [squared, np.array(share, dtype=dtype)],
                                                                         dtype))

    ctx.on_apply(correct)


# ops that leave a value zero where their (first) input is zero, and elementwise ones that do not
_ZERO_KEEPING = ("Cast", "Identity", "Abs", "Neg", "Relu", "Sqrt")
_ZERO_MOVING = ("Exp", "Sigmoid", "HardSigmoid", "Softplus", "Cos", "Log", "Reciprocal", "Clip", "Not", "Where",
                "Max", "Min")


def _reduced_value(ctx, tensor, squared: bool = False, depth: int = 0):
    """What a reduction over the width reduces: ("zeros", None) when it is zero wherever the
    width's channels are (anything the layers of the width produce, then scaled or squared);
    ("spread", m) for (x - m)^2 with m the mean of x over the width; else ("shifted", None)."""
    producer = ctx.graph.producer(tensor)
    if producer is None or depth > 8:
        return "zeros", None
    op, inputs = producer.op, producer.inputs
    if op in _ZERO_KEEPING:
        return _reduced_value(ctx, inputs[0], squared, depth + 1)
    if op in _ZERO_MOVING:
        return "shifted", None
    if op == "Pow":
        exponent = ctx.const(inputs[1])
        if exponent is None or exponent.size != 1 or float(exponent.reshape(-1)[0]) <= 0:
            return "shifted", None
        return _reduced_value(ctx, inputs[0], squared or float(exponent.reshape(-1)[0]) == 2.0, depth + 1)
    if op == "Mul" and len(inputs) == 2 and inputs[0] is inputs[1]:
        return _reduced_value(ctx, inputs[0], True, depth + 1)
    if op in ("Mul", "Div"):
        tracked = [t for t in inputs[:1 if op == "Div" else 2] if ctx.layouts(t)]  # not 1 / x
        return _reduced_value(ctx, tracked[0], squared, depth + 1) if tracked else ("shifted", None)
    if op in ("Add", "Sub") and len(inputs) == 2:
        # a residual sum, or a bias sliced (and planted) with the width, keeps zeros; a per-token
        # statistic or a scalar added to every channel does not
        shifts = [t for t in inputs if not ctx.layouts(t)]
        if not shifts:
            return "zeros", None
        if op == "Sub" and squared and shifts == [inputs[1]] and _mean_of(ctx, inputs[1], inputs[0]):
            return "spread", inputs[1]
        if all(ctx.graph.is_const(t) and _per_channel(ctx, t, tensor) for t in shifts):
            return _reduced_value(ctx, next(t for t in inputs if all(t is not s for s in shifts)), squared,
                                  depth + 1)
        return "shifted", None
    return "zeros", None


def _per_channel(ctx, constant, result) -> bool:
    """Whether a constant operand holds one value per channel of the width (sliced with it)."""
    shape, out = ctx.shape(constant), ctx.shape(result)
    return bool(shape) and bool(out) and shape[-1] == out[-1] and isinstance(shape[-1], int) and shape[-1] > 1


def _mean_of(ctx, tensor, x, depth: int = 0) -> bool:
    """Whether `tensor` is the mean of `x` over the width (ReduceMean, or ReduceSum times a
    constant), perhaps reshaped or broadcast on its way."""
    producer = ctx.graph.producer(tensor)
    if producer is None or depth > 6:
        return False
    if producer.op in ("Reshape", "Expand", "Unsqueeze", "Cast", "Identity"):
        return _mean_of(ctx, producer.inputs[0], x, depth + 1)
    if producer.op == "ReduceMean":
        return producer.inputs[0] is x
    if producer.op == "Mul" and len(producer.inputs) == 2:
        sums = [t for t in producer.inputs if not ctx.graph.is_const(t)]
        return len(sums) == 1 and ctx.graph.producer(sums[0]) is not None \
            and ctx.graph.producer(sums[0]).op == "ReduceSum" and ctx.graph.producer(sums[0]).inputs[0] is x
    return False


def float_dtype(dtype):
    """The numpy dtype of a float16/32/64 tensor's graphsurgeon dtype, else None."""
    if isinstance(dtype, int):  # an onnx TensorProto type where numpy has none
        dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype) if dtype in _NUMPY_TYPES else None
    try:
        dtype = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        return None
    return dtype if dtype in (np.float16, np.float32, np.float64) else None


_NUMPY_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
