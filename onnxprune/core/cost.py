"""What a model costs: parameters and multiply-accumulates, counted or predicted.

One formula serves both. `count_params` and `count_macs` count a model as it is (the report's
before and after); `CostModel` predicts the same numbers for a plan without touching the
graph, for allocation. It reads, once, which tensor axes every counted quantity depends on:
the size of an axis is a sum over the channel atoms of its layout, a Conv's MACs are a
product of such sizes and constant dims (`mac_dims`, the dims `count_macs` multiplies), and a
weight's element count is a product over its axes, sliced where attachments slice it. A
plan's cost is then a few array operations, and a one-group change only touches the terms of
that group. The numbers are those `count_macs` and `count_params` give for the model
`apply_plan` would produce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .dependency import Analysis
from .layout import Layout, kept_positions, resolve

METRICS = ("macs", "params")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# -- counting a model ------------------------------------------------------------------------
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of floating-point constants, including ConstantOfShape-generated weights."""
    total = 0
    for init in model.graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            total += int(np.prod(init.dims, dtype=np.int64))
    consts = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
                    total += int(np.prod(attr.t.dims, dtype=np.int64))
                    consts[node.output[0]] = attr.t
        elif node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            shape = consts.get(node.input[0])
            if shape is not None and (value is None or value.data_type in _FLOAT_TYPES):
                total += int(np.prod(numpy_helper.to_array(shape), dtype=np.int64))
    return total


def count_macs(static_model: onnx.ModelProto) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul, from inferred shapes
    (unknown or zero dims count as 1)."""
    shapes = static_shapes(static_model)
    total = 0
    for node in static_model.graph.node:
        if node.op_type not in MAC_OPS or not node.output:
            continue
        try:
            dims = mac_dims(node, shapes)
        except (KeyError, TypeError, ValueError, IndexError):
            continue  # what shape inference left unknown
        total += math.prod(dim or 1 for *_, dim in dims)
    return int(total)


# -- cost model ----------------------------------------------------------------------------
class _Layouts:
    """Distinct tensor-axis layouts, each an index whose size follows the kept channel counts."""

    def __init__(self, analysis: Analysis) -> None:
        self.atoms = analysis.atoms
        self.raw: list[Layout] = []
        self.full: list[int] = []
        self.segments: list[list[tuple[int, int]]] = []  # (atom, expand) per layout
        self.by_atom: dict[int, dict[int, int]] = {}  # atom -> {layout: positions per channel}
        self._ids: dict[tuple, int] = {}

    def index(self, layout: Layout) -> int:
        segs = [(s.atom, s.expand) for s in resolve(layout, self.atoms)]
        key = tuple(segs)
        if key not in self._ids:
            lid = len(self.raw)
            self._ids[key] = lid
            self.raw.append(tuple(layout))
            self.segments.append(segs)
            self.full.append(sum(self.atoms.size(a) * e for a, e in segs))
            for atom, expand in segs:
                per = self.by_atom.setdefault(atom, {})
                per[lid] = per.get(lid, 0) + expand
        return self._ids[key]

    def freeze(self) -> None:
        """Flat arrays for sizing every layout at once."""
        self.full_array = np.array(self.full, dtype=np.int64)
        rows = [(lid, atom, e) for lid, segs in enumerate(self.segments) for atom, e in segs]
        self._seg_layout = np.array([r[0] for r in rows], dtype=np.int64)
        self._seg_atom = np.array([r[1] for r in rows], dtype=np.int64)
        self._seg_expand = np.array([r[2] for r in rows], dtype=np.int64)

    def sizes(self, counts: dict[int, int]) -> np.ndarray:
        """Size of every layout when atom `a` keeps counts[a] channels (others keep all)."""
        if not counts or not len(self._seg_atom):
            return self.full_array.copy()
        lost = np.zeros(int(self._seg_atom.max()) + 1, dtype=np.int64)
        for atom, count in counts.items():
            if atom < len(lost):
                lost[atom] = self.atoms.size(atom) - int(count)
        drop = np.bincount(self._seg_layout, weights=self._seg_expand * lost[self._seg_atom],
                           minlength=len(self.full))
        return self.full_array - np.rint(drop).astype(np.int64)


class _Terms:
    """A sum of products: each term is a constant times the sizes of some layouts."""

    def __init__(self) -> None:
        self.constant = 0
        self.coefs: list[int] = []
        self.factors: list[list[int]] = []
        self.by_atom: dict[int, list[int]] = {}

    def add(self, coef: int, factors: list[int]) -> None:
        if coef == 0:
            return
        if not factors:
            self.constant += coef
            return
        self.coefs.append(coef)
        self.factors.append(factors)

    def freeze(self, layouts: _Layouts) -> None:
        self._coefs = np.array(self.coefs, dtype=np.int64)
        self._flat = np.array([f for fs in self.factors for f in fs], dtype=np.int64)
        self._starts = np.cumsum([0] + [len(fs) for fs in self.factors[:-1]]).astype(np.int64)
        for term, fs in enumerate(self.factors):
            for atom in {a for lid in fs for a, _ in layouts.segments[lid]}:
                self.by_atom.setdefault(atom, []).append(term)

    def total(self, sizes) -> int:
        if not self.coefs:
            return self.constant
        products = np.multiply.reduceat(np.asarray(sizes, dtype=np.int64)[self._flat], self._starts)
        return self.constant + int(np.dot(self._coefs, products))

    def term(self, index: int, size_of) -> int:
        value = self.coefs[index]
        for lid in self.factors[index]:
            value *= size_of(lid)
        return value


@dataclass
class _Use:
    """A constant input of a node that a plan may slice (apply_plan's unit of copy-on-write)."""

    node: gs.Node
    index: int
    source: gs.Tensor
    dims: tuple[int, ...]
    axes: dict[int, int] = field(default_factory=dict)  # axis -> layout id (the first attached)
    counted: bool = True  # a sliced copy holds float values, which count_params counts
    live: bool = True  # its node survives cleanup (reaches a graph output)

    @property
    def edge(self) -> tuple[int, int]:
        return id(self.node), self.index


class CostModel:
    """MACs and params of a hypothetical plan, read from layouts instead of a pruned model.

    Built once from an Analysis and `static_copy(model, concrete_shapes)` of the same model
    (names must match). `cost(kept)` takes what apply_plan computes, kept channel indices
    per group atom, and returns {"macs": int, "params": int}; `before` is the unpruned cost.
    It holds references into the analysed graph: use it before apply_plan edits that graph.
    """

    def __init__(self, analysis: Analysis, static_model: onnx.ModelProto) -> None:
        self.analysis = analysis
        self.graph = analysis.graph
        self.layouts = _Layouts(analysis)
        self.terms = {"macs": _Terms(), "params": _Terms()}
        self._live_nodes = _live_nodes(self.graph.gs)
        self._add_mac_terms(static_model)
        self._shared: list[_Use] = []
        self._add_param_terms(self._collect_uses())
        self.layouts.freeze()
        for terms in self.terms.values():
            terms.freeze(self.layouts)
        self._shared_atoms = {atom for use in self._shared for lid in use.axes.values()
                              for atom, _ in self.layouts.segments[lid]}
        self.before = self.cost({})

    def cost(self, kept: dict[int, np.ndarray]) -> dict[str, int]:
        """{"macs", "params"} of the model with only the `kept` channels of each atom left."""
        return self._cost({atom: len(idx) for atom, idx in kept.items()}, kept)

    def cost_of_counts(self, counts: dict[int, int]) -> dict[str, int]:
        """cost() from kept channel counts per atom. Which channels go matters only for a
        constant shared by layers of different groups: its copies are then taken as distinct."""
        return self._cost(counts, None)

    def running(self, metric: str) -> "RunningCost":
        return RunningCost(self, metric)

    def _cost(self, counts, kept) -> dict[str, int]:
        sizes = self.layouts.sizes(counts)
        params = self.terms["params"].total(sizes)
        if self._shared:
            params += self._shared_params(lambda lid: int(sizes[lid]), kept)
        return {"macs": self.terms["macs"].total(sizes), "params": params}

    # -- MACs -----------------------------------------------------------------------------
    def _add_mac_terms(self, static_model: onnx.ModelProto) -> None:
        """One term per Conv/ConvTranspose/Gemm/MatMul: the dims count_macs multiplies."""
        shapes = static_shapes(static_model)
        weights = self._weight_axes()
        activations = self.analysis.layouts
        for node in static_model.graph.node:
            if node.op_type not in MAC_OPS or not node.output:
                continue
            try:
                dims = mac_dims(node, shapes)
            except (KeyError, TypeError, ValueError, IndexError):
                continue  # count_macs skips what shape inference left unknown
            coef, factors = 1, []
            for is_input, index, axis, dim in dims:
                if not dim:
                    continue  # unknown or zero: count_macs takes 1
                name = node.input[index] if is_input else node.output[index]
                lid = weights.get((node.output[0], index, axis)) if is_input else None
                if lid is None and axis in activations.get(name, {}):
                    lid = self.layouts.index(activations[name][axis])
                if lid is not None and self.layouts.full[lid] == dim:
                    factors.append(lid)
                else:
                    coef *= dim
            self.terms["macs"].add(coef, factors)

    def _weight_axes(self) -> dict[tuple[str, int, int], int]:
        """(layer's first output, input index, axis) -> layout of the weight the layer reads.

        A weight reached through casts or dequantization is sliced on its stored constant;
        the attachment's `view` names the layer input that constant feeds.
        """
        found = {}
        for att in self.analysis.attachments:
            node, index, axis = att.layer_input
            if node.outputs:
                found.setdefault((node.outputs[0].name, index, axis), self.layouts.index(att.layout))
        return found

    # -- params ---------------------------------------------------------------------------
    def _collect_uses(self) -> list[_Use]:
        """Every (node, input) that attachments slice, each axis with its (first) layout."""
        uses: dict[tuple[int, int], _Use] = {}
        for att in self.analysis.attachments:
            key = (id(att.node), att.input_index)
            if key not in uses:
                source = att.tensor
                uses[key] = _Use(att.node, att.input_index, source, tuple(self.graph.shape(source) or ()),
                                 counted=_is_float(_value_dtype(self.graph, source)),
                                 live=id(att.node) in self._live_nodes)
            uses[key].axes.setdefault(att.axis, self.layouts.index(att.layout))
        return list(uses.values())

    def _add_param_terms(self, uses: list[_Use]) -> None:
        """A weight that only one use reads is a term: its size as sliced. The rest is simulated.

        Shared weights get one sliced copy per distinct cut and keep the original while some
        reader is not cut; that is worked out per plan by `_shared_params`.
        """
        roots = _roots(self.graph)
        tensors = self.graph.gs.tensors()

        def constants(sources):
            return _DynamicConstants(self.graph, self._live_nodes, sources, roots, tensors)

        behind = {id(u): constants([u.source]) for u in uses}
        sole = [u for u in uses if self._reads_alone(u, behind[id(u)])]
        while True:  # a weight read alone may still sit behind a shared one
            self._shared = [u for u in uses if not any(u is s for s in sole)]
            self._dynamic = constants([u.source for u in self._shared])
            kept_sole = [u for u in sole if not behind[id(u)].roots.keys() & self._dynamic.roots.keys()]
            if len(kept_sole) == len(sole):
                break
            sole = kept_sole
        for use in sole:
            if use.counted:
                coef = math.prod(d for axis, d in enumerate(use.dims) if axis not in use.axes)
                self.terms["params"].add(coef, [use.axes[axis] for axis in sorted(use.axes)])
        sliced = set(self._dynamic.roots).union(*(behind[id(u)].roots for u in sole))
        for name, count in roots.items():
            if name not in sliced and self._dynamic.statically_live(name):
                self.terms["params"].constant += count

    def _reads_alone(self, use: _Use, behind: "_DynamicConstants") -> bool:
        """Whether the stored constants behind the use live exactly as long as it is not cut,
        and hold what its sliced copy would (so that both cases count the sliced size)."""
        if not use.live or not behind.roots:
            return False
        expected = math.prod(use.dims) if use.counted else 0
        return behind.live_elements(frozenset()) == expected and behind.live_elements({use.edge}) == 0

    def _shared_params(self, size_of, kept: dict[int, np.ndarray] | None = None) -> int:
        """Elements of shared or folded weights: sliced copies plus the originals still read."""
        cut_edges, copies = set(), {}
        for use in self._shared:
            cut = [(axis, lid) for axis, lid in sorted(use.axes.items()) if size_of(lid) < self.layouts.full[lid]]
            if not cut:
                continue
            cut_edges.add(use.edge)
            if not (use.counted and use.live):
                continue
            if kept is None:
                key = (use.source.name, tuple(cut))
            else:  # apply_plan lets uses cut at the same positions share one copy
                key = (use.source.name, tuple(
                    (axis, kept_positions(self.layouts.raw[lid], self.layouts.atoms, kept).tobytes())
                    for axis, lid in cut))
            dims = list(use.dims)
            for axis, lid in cut:
                dims[axis] = size_of(lid)
            copies[key] = math.prod(dims)
        return sum(copies.values()) + self._dynamic.live_elements(cut_edges)


class RunningCost:
    """One metric's cost while group widths change one at a time (for the greedy allocator)."""

    def __init__(self, model: CostModel, metric: str) -> None:
        self.model = model
        self.terms = model.terms[metric]
        self.shared = metric == "params" and bool(model._shared)
        self.counts: dict[int, int] = {}
        self.sizes = [int(s) for s in model.layouts.full]
        self.values = [self.terms.term(i, self.sizes.__getitem__) for i in range(len(self.terms.coefs))]
        self.shared_value = model._shared_params(self.sizes.__getitem__) if self.shared else 0
        self.total = self.terms.constant + sum(self.values) + self.shared_value

    def _resized(self, atom: int, count: int):
        per_channel = self.model.layouts.by_atom.get(atom, {})
        step = count - self.counts.get(atom, self.model.layouts.atoms.size(atom))
        sizes = self.sizes
        return lambda lid: sizes[lid] + per_channel.get(lid, 0) * step

    def change(self, atom: int, count: int) -> int:
        """How much the total moves if `atom` kept `count` channels."""
        size_of = self._resized(atom, count)
        delta = sum(self.terms.term(i, size_of) - self.values[i] for i in self.terms.by_atom.get(atom, ()))
        if self.shared and atom in self.model._shared_atoms:
            delta += self.model._shared_params(size_of) - self.shared_value
        return delta

    def commit(self, atom: int, count: int) -> None:
        size_of = self._resized(atom, count)
        for i in self.terms.by_atom.get(atom, ()):
            self.values[i] = self.terms.term(i, size_of)
        if self.shared and atom in self.model._shared_atoms:
            self.shared_value = self.model._shared_params(size_of)
        for lid in self.model.layouts.by_atom.get(atom, {}):
            self.sizes[lid] = size_of(lid)
        self.counts[atom] = count
        self.total = self.terms.constant + sum(self.values) + self.shared_value


class _DynamicConstants:
    """Constants behind shared or folded weights, whose survival depends on the plan.

    A constant stays in the exported model while some node that reaches a graph output
    still reads it through an input the plan did not replace with a sliced copy.
    """

    def __init__(self, graph, live_nodes: set[int], sources: list[gs.Tensor], roots: dict[str, int],
                 tensors: dict[str, gs.Tensor]) -> None:
        self.graph = graph
        self.live_nodes = live_nodes
        self.outputs = {t.name for t in graph.gs.outputs}
        self.all_roots = roots
        self.tensors = tensors
        self.nodes: set[int] = set()  # constant-folding nodes that die with their readers
        self.roots: dict[str, gs.Tensor] = {}
        for source in sources:
            self._walk(source)

    def _walk(self, tensor: gs.Tensor, depth: int = 0) -> None:
        if tensor.name in self.all_roots:
            self.roots[tensor.name] = tensor
        producer = self.graph.producer(tensor)
        if producer is None or depth > 32 or id(producer) in self.nodes:
            return
        self.nodes.add(id(producer))
        if producer.op not in ("Constant", "ConstantOfShape"):
            for t in producer.inputs:
                if t.name and self.graph.is_const(t):
                    self._walk(t, depth + 1)

    def statically_live(self, name: str) -> bool:
        tensor = self.tensors.get(name)
        return tensor is not None and self._live(tensor, frozenset(), {})

    def live_elements(self, cut_edges: set) -> int:
        memo: dict[str, bool] = {}
        return sum(self.all_roots[name] for name, t in self.roots.items() if self._live(t, cut_edges, memo))

    def _live(self, tensor: gs.Tensor, cut_edges, memo: dict[str, bool]) -> bool:
        if tensor.name not in memo:
            memo[tensor.name] = False  # the graph is acyclic: this only stops repeated work
            memo[tensor.name] = tensor.name in self.outputs or any(
                self._still_reads(node, index, cut_edges, memo) for node, index in _readers(tensor))
        return memo[tensor.name]

    def _still_reads(self, node: gs.Node, index: int, cut_edges, memo) -> bool:
        """Whether `node` keeps reading its input `index` in the exported model."""
        if (id(node), index) in cut_edges or id(node) not in self.live_nodes:
            return False
        return id(node) not in self.nodes or any(self._live(out, cut_edges, memo) for out in node.outputs)


def _readers(tensor: gs.Tensor):
    """(node, input index) for every place the tensor is read."""
    for node in list(tensor.outputs):
        for index, t in enumerate(node.inputs):
            if t is tensor:
                yield node, index


# -- graph facts the cost model needs ---------------------------------------------------------
def _live_nodes(graph: gs.Graph) -> set[int]:
    """ids of the nodes that reach a graph output: what cleanup keeps when the model is exported."""
    live: set[int] = set()
    seen: set[str] = set()
    todo = list(graph.outputs)
    while todo:
        tensor = todo.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        for node in tensor.inputs:
            if id(node) in live:
                continue
            live.add(id(node))
            todo.extend(t for t in node.inputs if t.name)
            for sub in node.subgraphs():
                todo.extend(sub._foreign_tensors().values())
    return live


def _roots(graph) -> dict[str, int]:
    """Stored constants by tensor name, with the elements count_params counts for each.

    Initializers and Constant nodes count when they hold floats; a ConstantOfShape counts
    the size it generates when its fill is a float and its shape a stored constant.
    """
    roots = {}
    for name, tensor in graph.gs.tensors().items():
        if isinstance(tensor, gs.Constant):
            roots[name] = math.prod(tensor.shape) if _is_float(tensor.dtype) else 0
    for node in graph.gs.nodes:
        if not node.outputs:
            continue
        if node.op == "Constant":
            value = node.attrs.get("value")
            floats = isinstance(value, gs.Constant) and _is_float(value.dtype)
            roots[node.outputs[0].name] = math.prod(value.shape) if floats else 0
        elif node.op == "ConstantOfShape":
            roots[node.outputs[0].name] = _generated_elements(graph, node)
    return roots


def _generated_elements(graph, node: gs.Node) -> int:
    fill = node.attrs.get("value")
    if fill is not None and not _is_float(fill.dtype):
        return 0
    shape_in = node.inputs[0] if node.inputs else None
    producer = graph.producer(shape_in) if shape_in is not None else None
    stored = isinstance(shape_in, gs.Constant) or (producer is not None and producer.op == "Constant")
    value = graph.const(shape_in) if stored else None
    return int(np.prod(value, dtype=np.int64)) if value is not None else 0


def _value_dtype(graph, tensor: gs.Tensor, depth: int = 0):
    """dtype of a constant's value as apply_plan reads it (graph.const), without computing it."""
    if isinstance(tensor, gs.Constant):
        return tensor.dtype
    producer = graph.producer(tensor)
    if producer is None or depth > 32:
        return tensor.dtype
    if producer.op == "Constant":
        value = producer.attrs.get("value")
        if isinstance(value, gs.Constant):
            return value.dtype
        return np.float32 if any(k in producer.attrs for k in ("value_float", "value_floats")) else np.int64
    if producer.op == "ConstantOfShape":
        fill = producer.attrs.get("value")
        return np.float32 if fill is None else fill.dtype
    if producer.op == "Cast":
        return onnx.helper.tensor_dtype_to_np_dtype(int(producer.attrs["to"]))
    data = [t for t in producer.inputs if t.name]
    return _value_dtype(graph, data[-1] if producer.op == "Where" else data[0], depth + 1) if data else None


def _is_float(dtype) -> bool:
    try:
        return np.dtype(dtype).type in _FLOAT_DTYPES
    except TypeError:
        return False


def static_shapes(static_model: onnx.ModelProto) -> dict[str, list]:
    """Tensor shapes as count_macs reads them (inferred value_info, inputs, outputs, constants)."""
    graph = static_model.graph
    shapes = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def mac_dims(node: onnx.NodeProto, shapes: dict) -> list[tuple[bool, int, int, int | None]]:
    """(is input, index, axis, dim) of every dim count_macs multiplies for this node."""
    def every(is_input, index):
        name = node.input[index] if is_input else node.output[index]
        return [(is_input, index, axis, d) for axis, d in enumerate(shapes[name])]

    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        weight = every(True, 1)[1:]
        return (every(False, 0) if op == "Conv" else every(True, 0)) + weight
    a = every(True, 0)
    if op == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return every(False, 0) + [a[0 if trans_a else 1]]
    return every(False, 0) + [a[-1]]
