"""Small helpers shared by op rules."""
from __future__ import annotations

import numpy as np

from onnxprune.core.rules import Refuse
from onnxprune.core.shape_exprs import Lit, entries


def norm_axis(axis: int, rank: int) -> int:
    axis = int(axis)
    if axis < 0:
        axis += rank
    if not 0 <= axis < rank:
        raise Refuse(f"axis {axis} out of range for rank {rank}")
    return axis


def passthrough(ctx, src: int = 0, outputs=(0,)) -> None:
    """Every tracked axis of input `src` appears unchanged on the given outputs."""
    layouts = ctx.input_layouts(src)
    for o in outputs:
        if o < len(ctx.node.outputs):
            for axis, layout in layouts.items():
                ctx.set_layout(ctx.node.outputs[o], axis, layout)


def only_axes(ctx, index: int, allowed: set[int], why: str) -> None:
    for axis in ctx.input_layouts(index):
        if axis not in allowed:
            raise Refuse(f"channels on axis {axis} {why}")


def used(tensor) -> bool:
    return tensor is not None and tensor.name != "" and len(tensor.outputs) > 0


def int_list(value) -> list[int] | None:
    if value is None:
        return None
    return [int(v) for v in np.asarray(value).reshape(-1)]


def axes_operand(ctx, attr: str = "axes", input_index: int = 1):
    """Axes given as an attribute (older opsets) or as a constant input (newer ones)."""
    if attr in ctx.node.attrs:
        return int_list(ctx.attr(attr))
    tensor = ctx.input(input_index)
    if tensor is None:
        return None
    value = ctx.const(tensor)
    if value is None:
        raise Refuse(f"{attr} input {tensor.name!r} is not a constant")
    return int_list(value)


def run_time_list(ctx, tensor) -> list | None:
    """A 1-D int tensor computed at run time (from Shape reads), entry by entry: the literals it
    holds as ints and the rest as None; None when it cannot be followed. A rule may accept it
    when the entries it needs (those of the channel axes) are literals."""
    read = entries(ctx.graph, tensor)
    if read is None:
        return None
    return [e.value if isinstance(e, Lit) else None for e in read]
