"""Bias compensation and least-squares refits, worked out before a plan is applied and written
after it.

- bias (FLAP-style): a removed input channel of a layer added W[:, c] * x_c to its output;
  on calibration data x_c has mean m_c, so W[:, c] * m_c goes into the layer's bias. The
  layer's output keeps its mean; what is lost is only the channel's fluctuation. For
  convolutions with zero padding the border pixels get the mean too (a small error there).
- lsq: the layer's remaining input weights are refitted by least squares so that, on the
  calibration activations, it reproduces its original output from the kept channels:
  W' = argmin ||[X_k 1] W' - (X W + b)||^2, solved from the streamed Gram matrix of X.
  For MatMul/Gemm and ungrouped convolutions; for a kxk convolution X holds its input
  patches (channels x kernel taps, zero padding included) at a sample of output positions.
Compensations are computed from the original weights before the plan is applied
(`prepare`), then written into the pruned graph (`finish`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..core.criteria import consumer_sites
from ..core.dependency import Analysis
from ..core.layout import kept_positions
from ..core.plan import Plan
from .layers import add_bias, finite, matrix, output_axis, weight_axes
from .refit import refit_targets

RIDGE = 1e-4  # relative to the Gram's mean diagonal: keeps the solve stable for dead or duplicate channels
LSQ_ROWS_PER_INPUT = 4  # fewer calibration rows than this per input and a refit fits the noise


@dataclass
class LayerEdit:
    """A change to one layer's bias (full output size) and/or kept input weights."""

    node: gs.Node
    bias_delta: np.ndarray | None = None
    weight: np.ndarray | None = None  # new [in_kept, out, *kernel] weight (lsq)
    sites: list = field(default_factory=list)


@dataclass
class Recovery:
    methods: tuple[str, ...]
    edits: dict[int, LayerEdit] = field(default_factory=dict)
    # BatchNormalization output tensor (node names may be empty) -> kept input positions
    bn_nodes: dict[str, np.ndarray | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layers: int = 0
    refit: list = field(default_factory=list)  # RefitTarget of the layers to refit after export
    refitted: int = 0

    def to_json(self) -> dict:
        return {"methods": list(self.methods), "layers_compensated": self.layers, "layers_refitted": self.refitted,
                "bn_reestimated": len(self.bn_nodes), "notes": self.notes}



def prepare(analysis: Analysis, plan: Plan, methods, calibration, stats: dict | None = None,
            grams: dict | None = None) -> Recovery:
    """Work out every layer's compensation from the original weights and calibration data.

    `stats` ({tensor: ChannelStats}) and `grams` (Gram accumulators by tensor and geometry)
    are caches for repeated calls on the same model: what is missing is collected and added.
    """
    from ..calibration import collect_channel_stats, collect_into

    recovery = Recovery(tuple(methods))
    graph = analysis.graph
    if not methods or not plan.removed_by_atom():
        return recovery
    by_layer: dict[int, LayerEdit] = {}
    skipped = set()
    for decision in plan.decisions:
        if not len(decision.removed):
            continue
        for site in consumer_sites(analysis, decision.group):
            node, index, _ = site.weight.layer_input
            weight = graph.evaluate(node.inputs[index])
            if weight_axes(node, index) is None or weight is None or (node.op != "Conv" and weight.ndim != 2):
                skipped.add(f"{node.op} {node.name!r}")
                continue
            edit = by_layer.setdefault(id(node), LayerEdit(node))
            edit.sites.append((site, decision))
    if skipped:
        recovery.notes.append(f"no compensation for {len(skipped)} layer(s) (grouped/transposed conv, batched "
                              f"or non-constant weights), e.g. {sorted(skipped)[0]}")
    recovery.layers = len(by_layer)
    lsq_layers, layer_grams = {}, {}
    if "lsq" in methods:
        lsq_layers = {k: e for k, e in by_layer.items() if _lsq_ready(e, graph)}
        if len(lsq_layers) < len(by_layer):
            recovery.notes.append(f"lsq refit for {len(lsq_layers)} of {len(by_layer)} layers "
                                  "(MatMul/Gemm/ungrouped conv with one input site); bias compensation for the rest")
        layer_grams, fresh = _gram_accumulators(lsq_layers, graph, {} if grams is None else grams)
        if fresh:
            collect_into(graph.model, calibration, fresh)
        short = {k for k in lsq_layers if layer_grams[k].count < LSQ_ROWS_PER_INPUT * len(layer_grams[k].sum)}
        if short:
            recovery.notes.append(f"lsq refit skipped for {len(short)} layer(s) with fewer than "
                                  f"{LSQ_ROWS_PER_INPUT} calibration rows per input (it would fit the noise); "
                                  "bias compensation instead: give more calibration data")
        lsq_layers = {k: e for k, e in lsq_layers.items() if k not in short}
    # Every other layer gets bias compensation, from channel means (only theirs are measured).
    # refit starts from bias compensation too: layers it cannot refit keep that.
    bias_layers = {k: e for k, e in by_layer.items() if k not in lsq_layers} \
        if {"bias", "lsq", "refit"} & set(methods) else {}
    if bias_layers:
        tensors = {site.tensor: site.axis for e in bias_layers.values() for site, _ in e.sites}
        stats = {} if stats is None else stats
        missing = {t: a for t, a in tensors.items() if t not in stats}
        if missing:
            stats.update(collect_channel_stats(graph.model, calibration, missing))
    for key, edit in lsq_layers.items():
        _fit_lsq(analysis, edit, layer_grams[key])
    for edit in bias_layers.values():
        _bias_delta(analysis, edit, stats)
    if "bn" in methods:
        for edit in by_layer.values():
            users = edit.node.outputs[0].outputs
            if len(users) == 1 and users[0].op == "BatchNormalization":
                recovery.bn_nodes[users[0].outputs[0].name] = None
    if "refit" in methods:  # found now, while the graph still has its shapes
        recovery.refit = refit_targets(analysis, plan.kept_by_atom(analysis.atoms),
                                       [edit.node for edit in by_layer.values()])
    recovery.edits = by_layer
    return recovery



def _removed_positions(analysis, layout, group, removed_channels) -> np.ndarray:
    idx = [offset + removed_channels[:, None] * exp + np.arange(exp)[None, :]
           for offset, exp, _ in analysis.layout_positions(layout, group)]
    return np.concatenate([i.reshape(-1) for i in idx]) if idx else np.zeros(0, dtype=np.int64)


def _bias_delta(analysis, edit: LayerEdit, stats) -> None:
    graph = analysis.graph
    delta = None
    for site, decision in edit.sites:
        node, index, _ = site.weight.layer_input
        w = matrix(graph, node, index)
        w = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # kernel taps all see the mean
        weight_pos = _removed_positions(analysis, site.weight.layout, decision.group, decision.removed)
        data_pos = _removed_positions(analysis, site.layout, decision.group, decision.removed)
        if len(weight_pos) != len(data_pos):
            continue
        part = stats[site.tensor].mean[data_pos] @ w[weight_pos]
        delta = part if delta is None else delta + part
    edit.bias_delta = delta


def _lsq_ready(edit: LayerEdit, graph) -> bool:
    if len({id(s.weight.layer_input[0]) for s, _ in edit.sites}) != 1:
        return False
    tensors = {s.tensor for s, _ in edit.sites}
    if len(tensors) != 1:
        return False
    node = edit.node
    if graph.const(node.inputs[1]) is None:  # weights behind casts/quantization are not rewritten
        return False
    if node.op == "Conv":
        kernel = graph.shape(node.inputs[1])
        return kernel is not None and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    return True


def _gram_accumulators(layers: dict, graph, shared: dict) -> tuple[dict, list]:
    """One Gram accumulator per layer to refit, and the (tensor, accumulator) pairs still to fill.

    Layers reading the same tensor the same way share one; `shared` (a cache) keeps them.
    """
    from ..calibration import GramStats, PatchGramStats

    made, fresh = {}, []
    for key, edit in layers.items():
        site = edit.sites[0][0]
        geometry = _patch_geometry(edit.node, graph)  # None: a plain Gram over the channel axis
        cache_key = (site.tensor, site.axis if geometry is None else geometry)
        if cache_key not in shared:
            shared[cache_key] = (GramStats(site.axis, site.tensor) if geometry is None
                                 else PatchGramStats(*geometry, name=site.tensor))
            fresh.append((site.tensor, shared[cache_key]))
        made[key] = shared[cache_key]
    return made, fresh


def _patch_geometry(node: gs.Node, graph) -> tuple | None:
    """(kernel, strides, pads, dilations) of a convolution that reads patches, None for 1x1 ones
    (and MatMul/Gemm), which read one position per output."""
    if node.op != "Conv":
        return None
    kernel = tuple((graph.shape(node.inputs[1]) or ())[2:])
    strides, pads, dilations = (tuple(node.attrs.get(name, []) or []) for name in ("strides", "pads", "dilations"))
    if all(k == 1 for k in kernel) and not any(pads) and all(v == 1 for v in strides):
        return None
    return kernel, strides, pads, dilations


def _fit_lsq(analysis, edit: LayerEdit, gram) -> None:
    """Refit the kept input weights and the bias so the layer's output is reproduced in the
    least-squares sense on the calibration activations (original model)."""
    from ..calibration import GramStats

    graph = analysis.graph
    site, _ = edit.sites[0]
    node, index, _ = site.weight.layer_input
    full = matrix(graph, node, index)  # [in, out, *kernel taps]
    if isinstance(gram, GramStats):
        full = full.reshape(full.shape[:2] + (1,) * (full.ndim - 2))  # 1x1 kernel, no stride or pads
    taps = int(np.prod(full.shape[2:], dtype=np.int64))
    # Rows in the patch order: channel-major, then the kernel taps.
    w = np.moveaxis(full, 1, -1).reshape(full.shape[0] * taps, full.shape[1])
    gone = np.concatenate([_removed_positions(analysis, site.layout, d.group, d.removed) for s, d in edit.sites])
    kept_channels = np.setdiff1d(np.arange(full.shape[0]), gone)
    keep = (kept_channels[:, None] * taps + np.arange(taps)[None, :]).reshape(-1)
    n = gram.count
    mean = gram.sum / n
    second = gram.gram / n  # E[x x^T]
    # Augment with a constant 1 so the bias is refitted with the weights.
    k = len(keep)
    a = np.empty((k + 1, k + 1))
    a[:k, :k] = second[np.ix_(keep, keep)]
    a[:k, k] = a[k, :k] = mean[keep]
    a[k, k] = 1.0
    b = np.empty((k + 1, w.shape[1]))
    b[:k] = second[keep] @ w
    b[k] = mean @ w
    # Ridge towards the original weights (not towards zero): where the kept channels already
    # reproduce the output (dead channels removed), the weights come back unchanged.
    ridge = RIDGE * max(float(np.mean(np.diag(a))), 1e-12)
    prior = np.vstack([w[keep], np.zeros((1, w.shape[1]))])
    solution = np.linalg.solve(a + ridge * np.eye(k + 1), b + ridge * prior)
    edit.weight = np.moveaxis(solution[:k].reshape((len(kept_channels),) + full.shape[2:] + (w.shape[1],)), -1, 1)
    edit.bias_delta = solution[k]  # the fit's target excludes the old bias: this adds to it



def finish(analysis: Analysis, plan: Plan, recovery: Recovery) -> None:
    """After apply_plan: add each layer's bias change (sliced to its kept outputs), write refits."""
    atoms = analysis.atoms
    kept = plan.kept_by_atom(atoms)
    graph = analysis.graph
    nonfinite = [edit for edit in recovery.edits.values() if not finite(edit.weight, edit.bias_delta)]
    if nonfinite:  # NaN/inf in the data the fit came from: the layer keeps its plain slice
        recovery.notes.append(f"recovery left out for {len(nonfinite)} layer(s) whose fit is not finite (NaN/inf in "
                              f"the calibration statistics), e.g. {nonfinite[0].node.op} {nonfinite[0].node.name!r}")
        for edit in nonfinite:
            edit.weight = edit.bias_delta = None
    for edit in recovery.edits.values():
        node = edit.node
        users = node.outputs[0].outputs
        if len(users) == 1 and users[0].outputs[0].name in recovery.bn_nodes:
            layout = analysis.layouts.get(node.outputs[0].name, {}).get(1)
            recovery.bn_nodes[users[0].outputs[0].name] = None if layout is None else kept_positions(layout, atoms, kept)
        out_layout = analysis.layouts.get(node.outputs[0].name, {}).get(output_axis(node, graph))
        if edit.weight is not None:
            _write_weight(analysis, edit, out_layout, kept)
        if edit.bias_delta is None:
            continue
        delta = edit.bias_delta
        if out_layout is not None:
            delta = delta[kept_positions(out_layout, atoms, kept)]
        add_bias(graph, node, delta.astype(np.float32))




def _write_weight(analysis, edit: LayerEdit, out_layout, kept) -> None:
    """The refitted [kept in, out] matrix, sliced to the outputs the plan kept, in the weight's layout."""
    graph = analysis.graph
    node = edit.node
    out_keep = kept_positions(out_layout, analysis.atoms, kept) if out_layout is not None else None
    w = edit.weight if out_keep is None else edit.weight[:, out_keep]
    current = graph.const(node.inputs[1])
    in_axis, out_axis = weight_axes(node, 1)
    value = np.moveaxis(w.reshape(w.shape[:2] + current.shape[2:]), (0, 1), (in_axis, out_axis))
    if node.op == "Gemm":
        value = value / float(node.attrs.get("alpha", 1.0))
    graph.set_const_input(node, 1, value.astype(current.dtype))

