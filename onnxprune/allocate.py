"""Target-driven allocation: how many channels each group loses to meet a MACs or params budget.

`--target-macs 0.5` asks for a model with half the multiply-accumulates. Which groups give
up how much is decided here, greedily: the next channels to go are those whose damage per
unit of cost saved is smallest. Damage is either the criterion's score normalized within
its group (as `--global` ranks channels) or a measured sensitivity curve per group.

Cost is estimated without touching the graph. `CostModel` reads, once, which tensor axes
every counted quantity depends on: the size of an axis is a sum over the channel atoms of
its layout, a Conv's MACs are a product of such sizes and constant dims, and a weight's
element count is a product over its axes, sliced where attachments slice it. A plan's cost
is then a few array operations, and a one-group change only touches the terms of that
group. The numbers are those `metrics.count_macs` and `metrics.count_params` give for the
model `apply_plan` would produce.
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .dependency import Analysis, Group
from .errors import OnnxPruneError
from .importance import Criterion
from .layout import Layout, kept_positions, resolve
from .plan import GroupDecision, Plan, candidate_groups, group_key

METRICS = ("macs", "params")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


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

    def running(self, metric: str) -> "_RunningCost":
        return _RunningCost(self, metric)

    def _cost(self, counts, kept) -> dict[str, int]:
        sizes = self.layouts.sizes(counts)
        params = self.terms["params"].total(sizes)
        if self._shared:
            params += self._shared_params(lambda lid: int(sizes[lid]), kept)
        return {"macs": self.terms["macs"].total(sizes), "params": params}

    # -- MACs -----------------------------------------------------------------------------
    def _add_mac_terms(self, static_model: onnx.ModelProto) -> None:
        """One term per Conv/ConvTranspose/Gemm/MatMul: the dims count_macs multiplies."""
        shapes = _static_shapes(static_model)
        weights = self._weight_axes()
        activations = self.analysis.layouts
        for node in static_model.graph.node:
            if node.op_type not in _MAC_OPS or not node.output:
                continue
            try:
                dims = _mac_dims(node, shapes)
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


class _RunningCost:
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


# -- allocation ------------------------------------------------------------------------------
def allocate(analysis: Analysis, groups: list[Group], scores: dict[int, np.ndarray], cost_model: CostModel,
             metric: str, target: float, round_to: int = 1, *, min_keep: float = 0.0) -> dict[int, int]:
    """{group.id: channels to remove} so that `metric` drops to `target` of its value.

    Channels go cheapest damage first: a channel's damage is its score relative to its
    group's mean (as --global ranks them), divided by what removing it saves right now, so
    channels that cost little to keep stay longer. Every group keeps at least one channel
    (and `min_keep` of its width), kept counts are multiples of `round_to` or the full width,
    and the cost ends at or below target * before, as close to it as the steps allow.
    """
    _same_analysis(analysis, cost_model)
    ranked = {g.id: _ranked_scores(scores[g.id]) for g in groups}

    def damage(group: Group, keep_from: int, keep_to: int) -> float:
        cumulative = ranked[group.id]
        return float(cumulative[group.channels - keep_to] - cumulative[group.channels - keep_from])

    return _allocate(groups, damage, cost_model, metric, target, round_to, min_keep)


def allocate_by_sensitivity(groups: list[Group], curves: dict[int, list[tuple[float, float]]],
                            cost_model: CostModel, metric: str, target: float, round_to: int = 1, *,
                            min_keep: float = 0.0) -> dict[int, int]:
    """Like allocate(), with damage read from measured curves instead of channel scores.

    curves[group.id] lists (ratio, damage): how much the output changed when that group
    alone lost that fraction of its channels. Damage is interpolated linearly between the
    measured ratios (0 at ratio 0), extended past the last with the last slope. Groups
    without a curve keep all their channels.
    """
    curve_of = {gid: _DamageCurve(gid, points) for gid, points in curves.items()}
    measured = [g for g in groups if g.id in curve_of]

    def damage(group: Group, keep_from: int, keep_to: int) -> float:
        curve = curve_of[group.id]
        return curve(1 - keep_to / group.channels) - curve(1 - keep_from / group.channels)

    removed = _allocate(measured, damage, cost_model, metric, target, round_to, min_keep)
    return {g.id: removed.get(g.id, 0) for g in groups}


def allocate_uniform(groups: list[Group], cost_model: CostModel, metric: str, target: float, round_to: int = 1,
                     *, min_keep: float = 0.0) -> dict[int, int]:
    """{group.id: channels to remove}: the same ratio in every group, the largest that meets
    the target (found by bisection; kept counts follow round_to and min_keep)."""
    _check_request(metric, target, round_to, min_keep)
    before = cost_model.before[metric]
    if before <= 0:
        raise OnnxPruneError(f"--target-{metric} {target:g}: the model has no {metric} to reduce")
    goal = target * before
    widths = {g.id: _Widths.of(g.channels, round_to, min_keep) for g in groups}

    def removed_at(ratio: float) -> dict[int, int]:
        out = {}
        for g in groups:
            keep = max(g.channels - math.floor(ratio * g.channels), widths[g.id].floor)
            if round_to > 1:
                keep = min(g.channels, math.ceil(keep / round_to) * round_to)
            out[g.id] = g.channels - keep
        return out

    def cost_at(ratio: float) -> float:
        removed = removed_at(ratio)
        return cost_model.cost_of_counts({g.atom: g.channels - removed[g.id] for g in groups})[metric]

    if cost_at(1.0) > goal:
        raise OnnxPruneError(f"--target-{metric} {target:g}: unreachable, with every prunable group at its "
                             f"minimum width the model keeps {cost_at(1.0) / before:.3f} of its {metric}")
    low, high = 0.0, 1.0  # cost_at(high) always meets the goal
    for _ in range(30):
        mid = (low + high) / 2
        if cost_at(mid) <= goal:
            high = mid
        else:
            low = mid
    return removed_at(high)


def make_target_plan(analysis: Analysis, crit: Criterion, metric: str, target: float,
                     static_model: onnx.ModelProto, round_to: int = 1, exclude=(), curves=None, *,
                     min_keep: float = 0.0, global_rank: bool = True) -> Plan:
    """A plan that brings `metric` ("macs" or "params") to `target` of the original.

    `static_model` is static_copy(model, concrete_shapes) of the analysed model. Within each
    group the lowest-scored channels go; how many comes from allocate_by_sensitivity() when
    `curves` are given, else from allocate() (global ranking) or, with global_rank=False, from
    allocate_uniform(). A data-driven criterion must be prepared first. plan.notes records
    the ratio reached.
    """
    groups, skipped = candidate_groups(analysis, exclude)
    scores = {g.id: np.asarray(crit.scores(analysis, g), dtype=np.float64) for g in groups}
    cost_model = CostModel(analysis, static_model)
    if curves is None and not global_rank:
        counts = allocate_uniform(groups, cost_model, metric, target, round_to, min_keep=min_keep)
    elif curves is None:
        counts = allocate(analysis, groups, scores, cost_model, metric, target, round_to, min_keep=min_keep)
    else:
        counts = allocate_by_sensitivity(groups, curves, cost_model, metric, target, round_to, min_keep=min_keep)
    plan = Plan(skipped=skipped, criterion=crit.name)
    for g in groups:
        order = np.argsort(scores[g.id], kind="stable")
        removed = np.sort(order[:counts[g.id]])
        plan.decisions.append(GroupDecision(group_key(analysis, g), g, removed, scores[g.id]))
    kept = {atom: np.setdiff1d(np.arange(analysis.atoms.size(atom)), removed)
            for atom, removed in plan.removed_by_atom().items()}
    reached = cost_model.cost(kept)[metric] / cost_model.before[metric]
    plan.notes.extend(crit.notes)
    plan.notes.append(f"target {metric} {target:.2f}: reached {reached:.3f} of the original")
    return plan


@dataclass(frozen=True)
class _Widths:
    """The widths a group may take: its full width, or multiples of `step` down to `floor`."""

    channels: int
    step: int
    floor: int

    @classmethod
    def of(cls, channels: int, round_to: int, min_keep: float) -> "_Widths":
        least = max(1, math.ceil(min_keep * channels))
        return cls(channels, round_to, min(channels, math.ceil(least / round_to) * round_to))

    def down(self, keep: int) -> int | None:
        narrower = (keep - 1) // self.step * self.step
        return narrower if narrower >= max(self.floor, 1) else None

    def up(self, keep: int) -> int | None:
        return None if keep >= self.channels else min(self.channels, (keep // self.step + 1) * self.step)


def _allocate(groups, damage, cost_model: CostModel, metric: str, target: float, round_to: int,
              min_keep: float) -> dict[int, int]:
    """Shrink groups greedily until the cost meets the goal, give back what still fits, and
    trade steps between groups where that lands closer to the goal."""
    _check_request(metric, target, round_to, min_keep)
    running = cost_model.running(metric)
    before = running.total
    if before <= 0:
        raise OnnxPruneError(f"--target-{metric} {target:g}: the model has no {metric} to reduce")
    goal = target * before
    widths = {g.id: _Widths.of(g.channels, round_to, min_keep) for g in groups}
    least = cost_model.cost_of_counts({g.atom: widths[g.id].floor for g in groups})[metric]
    if least > goal:
        raise OnnxPruneError(f"--target-{metric} {target:g}: unreachable, with every prunable group at its "
                             f"minimum width the model keeps {least / before:.3f} of its {metric}")
    keep = {g.id: g.channels for g in groups}
    _shrink(groups, keep, widths, damage, running, goal)
    if running.total > goal:
        raise OnnxPruneError(f"--target-{metric} {target:g}: unreachable, pruning stops at "
                             f"{running.total / before:.3f} of the original {metric}")
    _give_back(groups, keep, widths, damage, running, goal)
    _trade(groups, keep, widths, damage, running, goal)
    return {g.id: g.channels - keep[g.id] for g in groups}


def _priority(damage: float, saving: float) -> tuple[int, float]:
    """Damage per unit of cost saved; steps that save nothing come after all others."""
    return (0, damage / saving) if saving > 0 else (1, damage)


def _shrink(groups, keep, widths, damage, running: _RunningCost, goal: float) -> None:
    """Take the cheapest step (damage per saving) until the goal is met.

    Savings shrink as neighbouring groups narrow, so a queued priority can be stale: it is
    recomputed when it comes up and requeued if it no longer beats the next one (lazy greedy).
    """
    queue: list = []
    tiebreak = itertools.count()

    def step_of(g: Group):
        narrower = widths[g.id].down(keep[g.id])
        if narrower is None:
            return None
        saving = -running.change(g.atom, narrower)
        return _priority(damage(g, keep[g.id], narrower), saving), narrower

    def offer(g: Group) -> None:
        step = step_of(g)
        if step is not None:
            heapq.heappush(queue, (step[0], next(tiebreak), g))

    for g in groups:
        offer(g)
    while running.total > goal and queue:
        _, _, g = heapq.heappop(queue)
        priority, narrower = step_of(g)
        if queue and priority > queue[0][0]:
            heapq.heappush(queue, (priority, next(tiebreak), g))
            continue
        running.commit(g.atom, narrower)
        keep[g.id] = narrower
        offer(g)


def _give_back(groups, keep, widths, damage, running: _RunningCost, goal: float) -> None:
    """Widen groups again while the cost stays within the goal: the last step may have overshot.

    Each round restores the step whose damage per unit of cost is highest among those that
    fit; steps that did no damage are left out, restoring them would only add cost.
    """
    while True:
        best = None
        for g in groups:
            wider = widths[g.id].up(keep[g.id])
            if wider is None:
                continue
            extra = running.change(g.atom, wider)
            if running.total + extra > goal:
                continue
            undone = damage(g, wider, keep[g.id])
            if undone <= 0:
                continue  # channels that do no harm stay removed
            worth = undone / extra if extra > 0 else math.inf
            if best is None or worth > best[0]:
                best = (worth, g, wider)
        if best is None:
            return
        _, g, wider = best
        running.commit(g.atom, wider)
        keep[g.id] = wider


def _trade(groups, keep, widths, damage, running: _RunningCost, goal: float, rounds: int = 32) -> None:
    """Where steps are coarse (small models, --round-to), widen one group and narrow another
    when the pair ends closer below the goal; among equally close pairs the one that adds
    the least damage. Skipped once the cost is within 0.5% of the goal."""
    for _ in range(rounds):
        if goal - running.total <= 0.005 * goal:
            return
        best = None
        for a in groups:
            wider, narrow_a = widths[a.id].up(keep[a.id]), keep[a.id]
            if wider is None or damage(a, wider, narrow_a) <= 0:
                continue
            running.commit(a.atom, wider)
            for b in groups:
                narrower = widths[b.id].down(keep[b.id]) if b is not a else None
                if narrower is None:
                    continue
                total = running.total + running.change(b.atom, narrower)
                added = damage(b, keep[b.id], narrower) - damage(a, wider, narrow_a)
                if total <= goal and (best is None or (-total, added) < best[0]):
                    best = ((-total, added), a, wider, b, narrower)
            running.commit(a.atom, narrow_a)
        if best is None or -best[0][0] <= running.total:
            return
        _, a, wider, b, narrower = best
        running.commit(a.atom, wider)
        running.commit(b.atom, narrower)
        keep[a.id], keep[b.id] = wider, narrower


class _DamageCurve:
    """Measured damage of one group against its pruning ratio, as a piecewise-linear function."""

    def __init__(self, gid: int, points) -> None:
        pts = sorted((float(r), float(d)) for r, d in points)
        if any(not 0.0 <= r <= 1.0 for r, _ in pts):
            raise OnnxPruneError(f"sensitivity curve of group {gid}: ratios must lie in [0, 1]")
        if not pts or pts[0][0] > 0:
            pts.insert(0, (0.0, 0.0))  # an unpruned group changes nothing
        self.ratios = np.array([r for r, _ in pts])
        self.values = np.array([d for _, d in pts])
        (r0, d0), (r1, d1) = pts[-2:] if len(pts) > 1 else (pts[0], pts[0])
        self.slope = max((d1 - d0) / (r1 - r0), 0.0) if r1 > r0 else 0.0

    def __call__(self, ratio: float) -> float:
        if ratio <= self.ratios[-1]:
            return float(np.interp(ratio, self.ratios, self.values))
        return float(self.values[-1] + self.slope * (ratio - self.ratios[-1]))


def _ranked_scores(scores: np.ndarray) -> np.ndarray:
    """Cumulative sums of a group's scores relative to their mean, lowest first (index = removed)."""
    mean = float(scores.mean()) if scores.size else 0.0
    relative = scores / mean if mean > 0 else np.zeros_like(scores)
    return np.concatenate([[0.0], np.cumsum(np.sort(relative))])


def _check_request(metric: str, target: float, round_to: int, min_keep: float) -> None:
    if metric not in METRICS:
        raise OnnxPruneError(f"target metric {metric!r}: choose one of {', '.join(METRICS)}")
    if not 0.0 < target <= 1.0:
        raise OnnxPruneError(f"--target-{metric} {target}: must be in (0, 1]")
    if round_to < 1:
        raise OnnxPruneError(f"--round-to {round_to}: must be a positive integer")
    if not 0.0 <= min_keep < 1.0:
        raise OnnxPruneError(f"minimum kept fraction {min_keep}: must be in [0, 1)")


def _same_analysis(analysis: Analysis, cost_model: CostModel) -> None:
    if cost_model.analysis is not analysis:
        raise ValueError("the cost model was built from another analysis")


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


def _static_shapes(static_model: onnx.ModelProto) -> dict[str, list]:
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


def _mac_dims(node: onnx.NodeProto, shapes: dict) -> list[tuple[bool, int, int, int | None]]:
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
