"""Reading shape tensors built at run time (Shape -> Gather/Slice -> Concat -> Reshape).

Exporters often compute Reshape targets from the shapes of other tensors. Each entry of
such a target is evaluated symbolically as one of:

- `Lit`: a literal, with the constant it came from (so a plan can rewrite it);
- `Dim`: "the size of axis a of tensor t", read at run time, so it follows pruning (with the
  Concat input it fills, when it fills one alone, so a plan can replace it by a literal);
- `Opaque`: anything else (arithmetic on dims), with the dims it depends on.

With this a rule can tell whether a run-time target stays consistent after pruning
(the channel entry is -1, or reads the pruned tensor's own channel dim), needs a
literal rewritten, or must be refused.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class Lit:
    value: int
    source: tuple | None = None  # (consumer node, input index, element index) holding the literal
    shared: tuple = ()  # tensors between the literal and the reader that also feed other nodes


@dataclass(frozen=True)
class Dim:
    tensor: gs.Tensor
    axis: int
    # (Concat node, input index, 0) when the dim is that input's only element, so a plan can put
    # a literal in its place; `shared` as for Lit (tensors from the Concat on that others read)
    slot: tuple | None = None
    shared: tuple = ()

    def __hash__(self):
        return hash((self.tensor.name, self.axis))

    def __eq__(self, other):
        return isinstance(other, Dim) and other.tensor.name == self.tensor.name and other.axis == self.axis


@dataclass(frozen=True)
class Opaque:
    deps: frozenset  # of Dim


_MAX_DEPTH = 24


def entries(graph, tensor: gs.Tensor, consumer=None, index: int = 0, depth: int = 0, shared: tuple = ()):
    """The entries of a 1-D (or scalar) int tensor, or None when it cannot be followed.

    Each literal lists the tensors on its way to the caller that other nodes read too
    (`Lit.shared`): rewriting the literal changes what those nodes see as well.
    """
    if depth > _MAX_DEPTH or tensor is None:
        return None
    if isinstance(tensor, gs.Constant) or _is_constant_node(tensor):
        return _literals(graph.const(tensor), consumer, index, shared)
    node = graph.producer(tensor)
    if node is None:
        return None
    op = node.op
    if len(tensor.outputs) > 1:
        shared = shared + (tensor,)

    def sub(i):
        return entries(graph, node.inputs[i], node, i, depth + 1, shared)

    if op == "Shape":
        rank = graph.rank(node.inputs[0])
        if rank is None:
            return None
        start = int(node.attrs.get("start", 0))
        end = int(node.attrs.get("end", rank))
        start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
        return [Dim(node.inputs[0], a) for a in range(max(start, 0), min(end, rank))]
    if op in ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        return sub(0)
    if op == "Concat":
        out = []
        for i in range(len(node.inputs)):
            part = sub(i)
            if part is None:
                return None
            if len(part) == 1 and isinstance(part[0], Dim) and part[0].slot is None:
                part = [replace(part[0], slot=(node, i, 0), shared=shared)]
            out.extend(part)
        return out
    if op == "Gather":
        data, idx = sub(0), graph.const(node.inputs[1])
        if data is None or idx is None or int(node.attrs.get("axis", 0)) != 0:
            return None
        return [data[int(i)] for i in np.asarray(idx).reshape(-1)]
    if op == "Slice":
        data = sub(0)
        if data is None:
            return None
        params = [graph.const(t) if t.name else None for t in node.inputs[1:]] if len(node.inputs) > 1 else []
        if "starts" in node.attrs:
            starts, ends = node.attrs["starts"], node.attrs["ends"]
            steps = [1]
        else:
            if len(params) < 2 or params[0] is None or params[1] is None:
                return None
            starts, ends = params[0], params[1]
            steps = params[3] if len(params) > 3 and params[3] is not None else [1]
        start, end, step = int(np.reshape(starts, -1)[0]), int(np.reshape(ends, -1)[0]), int(np.reshape(steps, -1)[0])
        return data[slice(start, end, step)] if step != 0 else None
    if op in ("Mul", "Add", "Sub", "Div", "Mod"):
        a, b = sub(0), sub(1)
        if a is None or b is None:
            return None
        if len(a) == 1 and len(b) > 1:
            a = a * len(b)
        if len(b) == 1 and len(a) > 1:
            b = b * len(a)
        if len(a) != len(b):
            return None
        return [_combine(op, x, y) for x, y in zip(a, b)]
    if graph.is_const(tensor):  # some other constant-only computation: values without a source
        return _literals(graph.const(tensor), None, 0, shared)
    return None


def _literals(value, consumer, index, shared=()):
    if value is None:
        return None
    flat = np.asarray(value).reshape(-1)
    if flat.dtype.kind not in "iu":
        return None
    return [Lit(int(v), (consumer, index, k) if consumer is not None else None, shared) for k, v in enumerate(flat)]


def _is_constant_node(tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "Constant"


def _combine(op, x, y):
    if isinstance(x, Lit) and isinstance(y, Lit):
        fn = {"Mul": lambda p, q: p * q, "Add": lambda p, q: p + q, "Sub": lambda p, q: p - q,
              "Div": lambda p, q: p // q if q else 0, "Mod": lambda p, q: p % q if q else 0}[op]
        return Lit(fn(x.value, y.value))
    return Opaque(deps(x) | deps(y))


def deps(entry) -> frozenset:
    if isinstance(entry, Dim):
        return frozenset([entry])
    if isinstance(entry, Opaque):
        return entry.deps
    return frozenset()


def static_value(graph, entry):
    """The entry's value for the graph's static shapes, or None."""
    if isinstance(entry, Lit):
        return entry.value
    if isinstance(entry, Dim):
        shape = graph.shape(entry.tensor)
        return None if shape is None or entry.axis >= len(shape) else shape[entry.axis]
    return None


def reshape_output(graph, target, data, in_shape, allowzero=0, symbols=None):
    """Output shape from target entries; unknown input dims read back by the target cancel out.

    x.view(x.size(0), -1) on [N, C, H, W] gives [N, C*H*W] even with N unknown. With
    `symbols` (a name per input axis, or None), an unknown input dim that the output copies
    is given as its name instead of None.
    """
    if in_shape is None:
        return None

    def symbol(entry, i):
        if isinstance(entry, Lit):
            if entry.value == 0 and not allowzero and i < len(in_shape):
                return in_shape[i] if in_shape[i] is not None else ("in", i)
            return entry.value
        if isinstance(entry, Dim):
            value = static_value(graph, entry)
            if value is not None:
                return value
            if entry.tensor.name == data.name:
                return ("in", entry.axis)
            # another tensor's dim with the same symbolic name as one of the input's (the batch
            # and sequence dims HF attention reads off the hidden states)
            named = _symbol(entry.tensor, entry.axis)
            if named is not None:
                same = [j for j in range(len(in_shape)) if _symbol(data, j) == named]
                if len(same) == 1:
                    return ("in", same[0])
        return None

    out = [symbol(e, i) for i, e in enumerate(target)]
    if any(v is None for v in out) or sum(1 for v in out if v == -1) > 1:
        return None
    if -1 in out:
        numerator = [d if d is not None else ("in", i) for i, d in enumerate(in_shape)]
        rest = [v for v in out if v != -1]
        for v in [v for v in rest if isinstance(v, tuple)]:
            if v not in numerator:
                return None
            numerator.remove(v)
            rest.remove(v)
        if any(isinstance(v, tuple) for v in numerator):
            return None
        top, bottom = int(np.prod(numerator, dtype=np.int64)), int(np.prod(rest, dtype=np.int64))
        if bottom <= 0 or top % bottom:
            return None
        out[out.index(-1)] = top // bottom

    def named(v):
        if not isinstance(v, tuple):
            return v
        return symbols[v[1]] if symbols is not None and v[1] < len(symbols) else None

    return tuple(named(v) for v in out)


def symbolic_shape(tensor, shape) -> list | None:
    """`shape` (ints, None where unknown) with the symbolic names shape inference gave the
    unknown dims of `tensor` (batch, sequence) in their place."""
    if shape is None:
        return None
    return [d if d is not None else _symbol(tensor, i) for i, d in enumerate(shape)]


def _symbol(tensor, axis: int) -> str | None:
    """The symbolic name shape inference gave a tensor's dim, if any."""
    shape = getattr(tensor, "shape", None)
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, str) and dim else None
