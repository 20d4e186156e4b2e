"""Applying a plan: slice every coupled constant, then run the rules' rewrites."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from .dependency import Analysis
from .disk_weights import on_disk
from .layout import Layout, kept_positions, layout_size
from .plan import Plan


class Applier:
    """What on_apply callbacks of op rules use to rewrite attributes and shape constants."""

    def __init__(self, analysis: Analysis, kept: dict[int, np.ndarray]) -> None:
        self.analysis = analysis
        self.graph = analysis.graph
        self.kept = kept

    def positions(self, layout: Layout) -> np.ndarray:
        return kept_positions(layout, self.analysis.atoms, self.kept)

    def new_size(self, layout: Layout) -> int:
        return int(len(self.positions(layout)))

    def set_attr(self, node: gs.Node, name: str, value) -> None:
        node.attrs[name] = value

    def del_attr(self, node: gs.Node, name: str) -> None:
        node.attrs.pop(name, None)

    def set_const_input(self, node: gs.Node, index: int, value: np.ndarray) -> None:
        if index < len(node.inputs) and node.inputs[index].name:
            old = self.graph.const(node.inputs[index])
            if old is not None:  # keep the exporter's dtype (Slice bounds may be int32)
                value = np.asarray(value).astype(old.dtype)
            self.graph.set_const_input(node, index, value)
        else:
            while len(node.inputs) < index:
                node.inputs.append(gs.Variable.empty())
            const = gs.Constant(self.graph.fresh_name(node.name or node.op), np.asarray(value))
            if index < len(node.inputs):
                node.inputs[index] = const
            else:
                node.inputs.append(const)

    def add_node(self, op: str, inputs: list, dtype, attrs: dict | None = None, base: str = "",
                 output: gs.Variable | None = None) -> gs.Variable:
        """A new node computing `op`(inputs) (numpy arrays become constants); returns its output."""
        base = base or op.lower()
        inputs = [gs.Constant(self.graph.fresh_name(f"{base}_c"), np.asarray(t)) if isinstance(t, np.ndarray) else t
                  for t in inputs]
        out = output if output is not None else gs.Variable(self.graph.fresh_name(base), dtype=dtype)
        self.graph.gs.nodes.append(gs.Node(op, name=self.graph.fresh_name(base), attrs=attrs or {},
                                           inputs=inputs, outputs=[out]))
        return out

    def insert_after(self, node: gs.Node, op: str, operand) -> None:
        """Put `op`(output, operand) between `node`'s first output and its readers (an ndarray
        operand becomes a constant)."""
        out = node.outputs[0]
        raw = gs.Variable(self.graph.fresh_name(out.name), dtype=out.dtype)
        node.outputs[0] = raw
        if isinstance(operand, np.ndarray):
            operand = gs.Constant(self.graph.fresh_name(f"{out.name}_{op.lower()}"), operand)
        self.graph.gs.nodes.append(gs.Node(op, name=self.graph.fresh_name(f"{node.name or node.op}_{op.lower()}"),
                                           inputs=[raw, operand], outputs=[out]))


def apply_plan(analysis: Analysis, plan: Plan) -> None:
    """Mutate analysis.graph so that the planned channels are gone."""
    atoms = analysis.atoms
    kept = plan.kept_by_atom(atoms)
    if not kept:
        return
    applier = Applier(analysis, kept)
    cuts: dict[tuple[int, int], dict[int, np.ndarray]] = defaultdict(dict)
    nodes = {}
    for att in analysis.attachments:
        pos = applier.positions(att.layout)
        if len(pos) == layout_size(att.layout, atoms):
            continue
        use = (id(att.node), att.input_index)
        nodes[use] = att.node
        cuts[use].setdefault(att.axis, pos)
    for use, by_axis in cuts.items():
        node = nodes[use]
        index = use[1]
        source = node.inputs[index]
        weight = on_disk(source)  # stays on disk: the slicing is recorded, and done as it is written
        value = weight if weight is not None else analysis.graph.const(source)
        for axis, pos in sorted(by_axis.items()):
            value = value.take(pos, axis=axis)  # ndarray.take, or DiskValues.take recording it
        key = (source.name, tuple((axis, pos.tobytes()) for axis, pos in sorted(by_axis.items())))
        analysis.graph.set_const_input(node, index, value, key=key)
    _rewrite_literals(analysis, applier)
    for fn in analysis.apply_fns:
        fn(applier)
    _forget_shapes(analysis.graph.gs)


def _rewrite_literals(analysis: Analysis, applier: Applier) -> None:
    """Write new channel counts into the shape constants that spell them out."""
    by_input: dict[tuple[int, int], list] = defaultdict(list)
    for (node, index, element), layout in analysis.literals:
        by_input[(id(node), index)].append((node, element, layout))
    for (_, index), items in by_input.items():
        node = items[0][0]
        value = analysis.graph.const(node.inputs[index])
        if value is None:  # a dim read at run time that equals the channel count: a literal takes its place
            value = np.array([layout_size(items[0][2], analysis.atoms)], dtype=np.int64)
        value = np.array(value, copy=True)
        before = value.copy()
        for _, element, layout in items:
            value.flat[element] = applier.new_size(layout)
        if not np.array_equal(value, before):
            analysis.graph.set_const_input(node, index, value)


def _forget_shapes(graph: gs.Graph) -> None:
    """Intermediate shapes are stale now; shape inference recomputes them."""
    keep = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    for name, tensor in graph.tensors().items():
        if isinstance(tensor, gs.Variable) and name not in keep:
            tensor.shape = None
