"""Channel-dependency analysis: which tensor axes must shrink together, and how.

One forward pass over the graph in topological order asks each node's op rule how
channels flow through it. The result is a set of groups (leaf classes of the atom
union-find), each listing every constant it slices and every reason it cannot be
pruned. Graph outputs, ops without a rule and refused nodes fix the channels they
touch; graph inputs carry no prunable channels at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .graph import Graph
from .layout import Atoms, Layout, LayoutError, Segment, resolve
from .layout import unify as _unify
from .rules import Refuse, rule_for
from .shapes import complete_shapes, fix_input_shapes
from .weight_paths import trace


@dataclass
class Attachment:
    """A constant input of a node whose `axis` is laid out like `layout`."""

    node: gs.Node
    input_index: int
    axis: int
    layout: Layout
    role: str  # weight_out, weight_in, bias, bn_scale, ..., scale, offset, quant_scale, quant_zero_point
    view: tuple | None = None  # (layer, input, axis) whose float value this stored constant feeds

    @property
    def tensor(self) -> gs.Tensor:
        return self.node.inputs[self.input_index]

    @property
    def layer_input(self) -> tuple:
        """(layer, input index, axis) where this constant's values are used: `view` when the
        stored constant reaches the layer through casts, transposes or (de)quantization."""
        return self.view or (self.node, self.input_index, self.axis)

    def describe(self) -> dict:
        # A node whose outputs nothing reads is dropped on export, its inputs cleared with it.
        tensor = self.tensor.name if self.input_index < len(self.node.inputs) else None
        return {"node": self.node.name, "op": self.node.op, "tensor": tensor, "axis": self.axis, "role": self.role}


@dataclass(frozen=True)
class WidthCost:
    """What pruning the model width does at one normalization across it (OpContext.across_channels)."""

    text: str
    exact: bool  # the original's result where the removed channels are zero

    def __str__(self) -> str:
        return self.text


@dataclass
class Group:
    """Channels that are pruned index-for-index together."""

    id: int
    atom: int
    channels: int
    members: list[Attachment] = field(default_factory=list)
    fixed_reasons: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    # "filters" (conv), "neurons" (Gemm/MatMul), "heads" (attention heads), "head_dim" (the
    # dims inside each head: a Gemm/MatMul output split into heads x head_dim) or "hidden" (the
    # model width: embedding and residual channels, normalized across; analysed with hidden=True)
    kind: str = "filters"
    # hidden groups: what removing channels does at each normalization across them
    costs: list[WidthCost] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.fixed_reasons and any(m.role == "weight_out" for m in self.members)

    def node_names(self) -> set[str]:
        return {m.node.name for m in self.members} | set(self.origins)


class Context:
    """What an op rule sees while it handles one node (staged until the rule returns)."""

    def __init__(self, analysis: "Analysis", node: gs.Node) -> None:
        self._a = analysis
        self.graph = analysis.graph
        self.atoms = analysis.atoms
        self.node = node
        self.opset = analysis.graph.opset("")
        self.heads_mode = analysis.heads
        self.hidden_mode = analysis.hidden
        self._outputs: dict[str, dict[int, Layout]] = {}
        self._attach: list[Attachment] = []
        self._apply: list[Callable] = []
        self._new_atoms: list[int] = []
        self._claims: dict[tuple, tuple] = {}
        self._consumed: list[Layout] = []
        self._hidden: list[tuple[int, WidthCost | None]] = []

    # -- reading ---------------------------------------------------------------------
    def layouts(self, tensor: gs.Tensor | None) -> dict[int, Layout]:
        if tensor is None:
            return {}
        return self._a.layouts.get(tensor.name, {})

    def input_layouts(self, index: int) -> dict[int, Layout]:
        inputs = self.node.inputs
        return self.layouts(inputs[index]) if index < len(inputs) else {}

    def any_tracked(self) -> bool:
        return any(self.layouts(t) for t in self.node.inputs)

    def shape(self, tensor):
        return self.graph.shape(tensor)

    def rank(self, tensor):
        return self.graph.rank(tensor)

    def const(self, tensor):
        return self.graph.const(tensor)

    def input(self, index: int):
        inputs = self.node.inputs
        if index >= len(inputs) or inputs[index] is None or inputs[index].name == "":
            return None
        return inputs[index]

    def is_weight(self, index: int) -> bool:
        """Whether input `index` holds constant values, stored directly or behind casts/quantization."""
        tensor = self.input(index)
        if tensor is None:
            return False
        try:
            return any(kind == "data" for *_, kind in trace(self.graph, self.node, index, 0))
        except Refuse:
            return False

    def attr(self, name: str, default=None):
        return self.node.attrs.get(name, default)

    def size(self, layout: Layout) -> int:
        return sum(self.atoms.size(s.atom) * s.expand for s in layout)

    # -- declaring -------------------------------------------------------------------
    def new_channels(self, count: int, heads: bool = False, head_dim: bool = False,
                     hidden: bool = False) -> Layout:
        """Fresh channels created by this node (heads=True: attention heads, for --heads;
        head_dim=True: the dims inside each head, for --head-dim; hidden=True: the model width,
        e.g. an embedding table's columns, for --hidden)."""
        atom = self.atoms.new(int(count), self.node.name)
        self._new_atoms.append(atom)
        if heads:
            self._a.head_atoms.add(atom)
        if head_dim:
            self._a.head_dim_atoms.add(atom)
        if hidden:
            self._hidden.append((atom, None))
        return (Segment(atom),)

    def across_channels(self, layout: Layout, cost: str, exact: bool) -> None:
        """This node takes statistics across these channels (a normalization over the hidden size).

        Only in hidden mode (--hidden): their group becomes a "hidden" group, and `cost` says
        what removing some of them does to this node; `exact`: whether the result is the
        original's where the removed channels are zero."""
        for seg in layout:
            self._hidden.append((seg.atom, WidthCost(f"{self.node.op} {self.node.name!r}: {cost}", exact)))

    def set_layout(self, tensor: gs.Tensor, axis: int, layout: Layout) -> None:
        self._outputs.setdefault(tensor.name, {})[axis] = tuple(layout)

    def unify(self, a: Layout, b: Layout) -> None:
        try:
            _unify(a, b, self.atoms)
        except LayoutError as exc:
            raise Refuse(str(exc)) from None

    def fix(self, layout: Layout, reason: str) -> None:
        for seg in layout:
            self.atoms.fix(seg.atom, f"{self.node.op} {self.node.name!r}: {reason}")

    def attach(self, index: int, axis: int, layout: Layout, role: str) -> None:
        """Slice constant input `index` of this node along `axis` like `layout`.

        The input may reach the node through casts, transposes or (de)quantization: the
        slicing then lands on the stored constants (see weight_paths).
        """
        tensor = self.input(index)
        if tensor is None:
            return
        shape = self.shape(tensor)
        if shape is None or axis >= len(shape) or shape[axis] != self.size(layout):
            raise Refuse(f"input {tensor.name!r} does not have {self.size(layout)} entries on axis {axis}")
        for node, i, ax, kind in trace(self.graph, self.node, index, axis):
            view = None if node is self.node else (self.node, index, axis)
            self._attach.append(Attachment(node, i, ax, tuple(layout), role if kind == "data" else kind,
                                           view if kind == "data" else None))

    def rewrite_literal(self, source: tuple, layout: Layout, shared: tuple = ()) -> None:
        """Have the plan write the new size of `layout` into one element of a shape constant.

        `source` is (consumer node, input index, element index). Two layouts claiming the same
        element are unified, so whatever the plan does, one value fits both. `shared` are
        tensors on the way that other nodes read: all of those must claim it too (checked
        once the whole graph is seen), or the channels stay.
        """
        consumer, index, element = source
        key = (id(consumer), index, element)
        self._a.literal_readers.setdefault(key, set()).add(id(self.node))
        for tensor in shared:
            self._a.literal_shared.setdefault(key, []).append((tensor, tuple(layout), self.node))
        claimed = self._a.literal_claims.get(key) or self._claims.get(key, (None, None))[1]
        if claimed is not None:
            self.unify(claimed, layout)
            return
        self._claims[key] = (source, tuple(layout))

    def consume(self, layout: Layout) -> None:
        """Declare channels that this node drops on purpose (e.g. outside a Slice's range)."""
        self._consumed.append(tuple(layout))

    def on_apply(self, fn: Callable) -> None:
        """Run `fn(applier)` when a plan is applied (rewrite attributes or shape constants)."""
        self._apply.append(fn)

    # -- commit / reject -------------------------------------------------------------
    def _commit(self) -> None:
        for name, axes in self._outputs.items():
            self._a.layouts.setdefault(name, {}).update(axes)
        self._a.attachments.extend(self._attach)
        self._a.apply_fns.extend(self._apply)
        for key, (source, layout) in self._claims.items():
            self._a.literal_claims[key] = layout
            self._a.literals.append((source, layout))
        self._a.hidden_atoms.extend(self._hidden)

    def _reject(self, reason: str) -> None:
        text = f"{self.node.op} {self.node.name!r}: {reason}"
        self._a.barriers.append(text)
        for tensor in self.node.inputs:
            for layout in self.layouts(tensor).values():
                for seg in layout:
                    self.atoms.fix(seg.atom, text)
        for atom in self._new_atoms:
            self.atoms.fix(atom, text)


class Analysis:
    """Result of the dependency analysis on one graph."""

    def __init__(self, graph: Graph, heads: bool = False, hidden: bool | str | None = False) -> None:
        self.graph = graph
        # How a Reshape that splits channels (hidden -> heads x head_dim) is read: by
        # default every group keeps the same inner indices (channel shuffle, head_dim);
        # with heads=True the outer axis carries the channels, so whole heads go.
        self.heads = heads
        # With hidden set, normalizations across the channels and embedding tables follow the
        # model width instead of fixing it; its groups are "hidden" groups (--hidden). "fused"
        # keeps a LayerNorm one op (approximate), True or "exact" writes it out exactly.
        self.hidden = hidden
        self.head_atoms: set[int] = set()
        self.head_dim_atoms: set[int] = set()
        self.hidden_atoms: list[tuple[int, WidthCost | None]] = []  # (atom, what removal costs there)
        self.atoms = Atoms()
        self.layouts: dict[str, dict[int, Layout]] = {}
        self.attachments: list[Attachment] = []
        self.apply_fns: list[Callable] = []
        self.literal_claims: dict[tuple, Layout] = {}
        self.literals: list[tuple[tuple, Layout]] = []  # ((node, input, element), layout)
        self.literal_readers: dict[tuple, set] = {}  # literal -> ids of nodes that rewrite it
        self.literal_shared: dict[tuple, list] = {}  # literal -> [(shared tensor, layout, reader)]
        self.barriers: list[str] = []
        self.groups: list[Group] = []
        # Per-position weight norms by (tensor, axis, kind), for criteria scoring this analysis.
        self.weight_norms: dict[tuple, np.ndarray] = {}

    def run(self) -> "Analysis":
        g = self.graph.gs
        self._own_reshape_targets()
        g.toposort()
        for node in g.nodes:
            self._fix_subgraph_captures(node, node)
            ctx = Context(self, node)
            tracked = ctx.any_tracked()
            rule = rule_for(node.op, node.domain or "")
            if rule is None:
                if tracked:
                    ctx._reject("no op rule, treated as a barrier")
                continue
            try:
                rule.propagate(node, ctx)
            except Refuse as exc:
                ctx._reject(str(exc))
                continue
            except LayoutError as exc:
                ctx._reject(str(exc))
                continue
            except (ValueError, IndexError, KeyError, TypeError, ArithmeticError) as exc:
                # A node the rule could not read (an attribute out of range, a malformed
                # constant): a barrier with the reason, rather than the whole run failing.
                ctx._reject(f"its op rule cannot read this node ({type(exc).__name__}: {exc})")
                continue
            ctx._commit()
            self._check_consumed(node, ctx)
        self._check_shared_literals()
        for tensor in g.outputs:
            for layout in self.layouts.get(tensor.name, {}).values():
                for seg in layout:
                    self.atoms.fix(seg.atom, f"graph output {tensor.name!r} keeps its channels")
        self._build_groups()
        return self

    def _check_shared_literals(self) -> None:
        """A shape literal read through a shared tensor may only be rewritten if every reader
        of that tensor asked for the same rewrite (and was therefore unified with it)."""
        for key, items in self.literal_shared.items():
            readers = self.literal_readers.get(key, set())
            for tensor, layout, reader in items:
                others = [n for n in tensor.outputs if id(n) not in readers]
                if others:
                    for seg in layout:
                        self.atoms.fix(seg.atom, f"{reader.op} {reader.name!r}: its shape constant is also "
                                                 f"read by {others[0].op} {others[0].name!r}")

    # Ops whose outputs legitimately carry none of their input's channels.
    SIZE_READERS = frozenset({"Shape", "Size"})

    def _check_consumed(self, node: gs.Node, ctx: "Context") -> None:
        """Channels entering a node must leave it or be sliced by it; else they are fixed.

        A rule that forgets an axis would otherwise let channels change size where no
        one follows them. This turns such a gap into a barrier instead of a wrong model.
        """
        if node.op in self.SIZE_READERS:
            return
        covered = set()
        for layouts in ctx._outputs.values():
            for layout in layouts.values():
                covered.update(seg.atom for seg in resolve(layout, self.atoms))
        for layout in [att.layout for att in ctx._attach] + ctx._consumed:
            covered.update(seg.atom for seg in resolve(layout, self.atoms))
        for tensor in node.inputs:
            for axis, layout in self.layouts.get(tensor.name, {}).items():
                lost = [seg.atom for seg in resolve(layout, self.atoms) if seg.atom not in covered]
                for atom in lost:
                    self.atoms.fix(atom, f"{node.op} {node.name!r}: channels on axis {axis} of "
                                         f"{tensor.name!r} are not followed by its op rule")

    def _fix_subgraph_captures(self, node: gs.Node, owner: gs.Node) -> None:
        """Tensors read by a subgraph (If/Loop/Scan bodies) from the outer scope keep their channels."""
        for value in node.attrs.values():
            graphs = value if isinstance(value, list) else [value]
            for sub in graphs:
                if not isinstance(sub, gs.Graph):
                    continue
                for inner in sub.nodes:
                    for t in inner.inputs:
                        for layout in self.layouts.get(t.name, {}).values():
                            for seg in layout:
                                self.atoms.fix(seg.atom, f"{owner.op} {owner.name!r}: read inside a subgraph")
                    self._fix_subgraph_captures(inner, owner)

    def _own_reshape_targets(self) -> None:
        """Give every Reshape (and Expand) its own copy of a Concat-built shape that several read.

        Exporters build `[B, S, heads, head_dim]` once and reshape every layer's q/k/v with it
        (and expand every layer's kv heads with one `[B, kv, n_rep, S, D]`); a literal rewritten
        for one reader changes it for all, which would tie every layer's heads together. A
        Concat per reader (its inputs still shared) lets each layer keep its own heads; the
        copies compute the same values.
        """
        for tensor in list(self.graph.gs.tensors().values()):
            concat = tensor.inputs[0] if tensor.inputs else None
            if concat is None or concat.op != "Concat" or tensor in self.graph.gs.outputs:
                continue
            readers = [n for n in tensor.outputs if n.op in ("Reshape", "Expand") and len(n.inputs) > 1
                       and n.inputs[1] is tensor]
            for reader in readers[1:] if len(readers) == len(tensor.outputs) else readers:
                copy = gs.Variable(self.graph.fresh_name(tensor.name), dtype=tensor.dtype, shape=tensor.shape)
                self.graph.gs.nodes.append(gs.Node("Concat", name=self.graph.fresh_name(concat.name or "Concat"),
                                                   attrs=dict(concat.attrs), inputs=list(concat.inputs),
                                                   outputs=[copy]))
                reader.inputs[1] = copy

    def _build_groups(self) -> None:
        atoms = self.atoms
        by_leaf: dict[int, Group] = {}

        def group(leaf: int) -> Group:
            if leaf not in by_leaf:
                by_leaf[leaf] = Group(id=len(by_leaf), atom=leaf, channels=atoms.size(leaf))
            return by_leaf[leaf]

        for att in self.attachments:
            seen = set()
            for seg in resolve(att.layout, atoms):
                if seg.atom not in seen:
                    seen.add(seg.atom)
                    group(seg.atom).members.append(att)
        origins: dict[int, list[str]] = {}
        for atom_id, origin in enumerate(atoms.origin):
            for leaf in atoms.leaves(atom_id):
                if leaf in by_leaf and origin and origin not in origins.setdefault(leaf, []):
                    origins[leaf].append(origin)
        head_leaves = {atoms.find(leaf) for a in self.head_atoms for leaf in atoms.leaves(a)}
        head_dim_leaves = {atoms.find(leaf) for a in self.head_dim_atoms for leaf in atoms.leaves(a)}
        hidden_costs: dict[int, list[WidthCost]] = {}
        for a, cost in self.hidden_atoms:
            for leaf in atoms.leaves(a):
                costs = hidden_costs.setdefault(atoms.find(leaf), [])
                if cost and cost not in costs:
                    costs.append(cost)
        for leaf, grp in by_leaf.items():
            grp.fixed_reasons = list(atoms.fixed.get(leaf, []))
            grp.origins = origins.get(leaf, [])
            producers = {m.layer_input[0].op for m in grp.members if m.role == "weight_out"}
            grp.costs = hidden_costs.get(leaf, [])
            if leaf in hidden_costs and leaf not in head_leaves and leaf not in head_dim_leaves:
                grp.kind = "hidden"
            elif leaf in head_leaves:
                grp.kind = "heads"
            elif producers and producers <= {"Gemm", "MatMul", "Attention"}:
                # dims inside attention heads (a Linear's output split into heads x head_dim) are
                # not what users mean by neurons: they go only with --head-dim
                grp.kind = "head_dim" if leaf in head_dim_leaves else "neurons"
        self.groups = sorted(by_leaf.values(), key=lambda g: g.id)

    # -- helpers for importance, planting and reports ----------------------------------
    def positions(self, att: Attachment, group: Group) -> list[tuple[int, int, int]]:
        """(offset, expand, channels) runs where `group`'s channels sit on the attachment's axis."""
        return self.layout_positions(att.layout, group)

    def layout_positions(self, layout: Layout, group: Group) -> list[tuple[int, int, int]]:
        """(offset, expand, channels) runs where `group`'s channels sit on an axis laid out so."""
        runs = []
        pos = 0
        for seg in resolve(layout, self.atoms):
            n = self.atoms.size(seg.atom)
            if seg.atom == group.atom:
                runs.append((pos, seg.expand, n))
            pos += n * seg.expand
        return runs

    def channel_index(self, att: Attachment, group: Group, channels: np.ndarray) -> np.ndarray:
        """Indices on the attachment's axis that hold the given channels of `group`."""
        idx = []
        for offset, exp, _ in self.positions(att, group):
            idx.append((offset + channels[:, None] * exp + np.arange(exp)[None, :]).reshape(-1))
        return np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)


def analyze(graph: Graph, heads: bool = False, hidden: bool | str | None = False) -> Analysis:
    return Analysis(graph, heads, hidden).run()


def analyze_model(model: onnx.ModelProto, input_shapes: dict | None = None, copy: bool = True,
                  heads: bool = False, hidden: bool | str | None = False) -> Analysis:
    """Dependency analysis of `model` (input dims fixed as given, shapes completed).

    With copy=False the model's value_info and input dims are updated in place; weights
    are never touched either way (edits happen in the graphsurgeon copy).
    """
    return analyze(Graph(complete_shapes(with_input_shapes(model, input_shapes, copy))), heads=heads, hidden=hidden)


def with_input_shapes(model: onnx.ModelProto, input_shapes: dict | None, copy: bool = True) -> onnx.ModelProto:
    """`model` (or a copy) with the given input dims fixed."""
    if copy:
        model, original = onnx.ModelProto(), model
        model.CopyFrom(original)
    if input_shapes:
        fix_input_shapes(model, input_shapes)
    return model
