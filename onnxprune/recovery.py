"""Training-free recovery: make up, inside the graph, for what removed channels contributed.

- bias (FLAP-style): a removed input channel of a layer added W[:, c] * x_c to its output;
  on calibration data x_c has mean m_c, so W[:, c] * m_c goes into the layer's bias. The
  layer's output keeps its mean; what is lost is only the channel's fluctuation. For
  convolutions with zero padding the border pixels get the mean too (a small error there).
- lsq: the layer's remaining input weights are refitted by least squares so that, on the
  calibration activations, it reproduces its original output from the kept channels:
  W' = argmin ||[X_k 1] W' - (X W + b)||^2, solved from the streamed Gram matrix of X.
  For MatMul/Gemm and ungrouped convolutions; for a kxk convolution X holds its input
  patches (channels x kernel taps, zero padding included) at a sample of output positions.
- bn: BatchNormalization layers right after a layer that lost input channels are corrected
  per channel by the affine map that best reproduces their original input from the pruned
  one (measured on both models, layer after layer).

Compensations are computed from the original weights before the plan is applied
(`prepare`), then written into the pruned graph (`finish`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .core.criteria import consumer_sites
from .core.dependency import Analysis
from .core.errors import OptionError
from .core.layout import kept_positions
from .core.plan import Plan
from .core.progress import progress

METHODS = ("bias", "lsq", "bn")
_RIDGE = 1e-4  # relative to the Gram's mean diagonal: keeps the solve stable for dead or duplicate channels
_BN_PASSES = 16  # BatchNorm correction: runs over the calibration data at most (one per layer up to this)
_BN_SAMPLES = 32  # ... and the calibration samples each run takes
_LSQ_ROWS_PER_INPUT = 4  # fewer calibration rows than this per input and a refit fits the noise


def parse_methods(methods) -> tuple[str, ...]:
    """--recover as given: "bias,lsq", "none", None, or a sequence of method names."""

    if not methods or methods == "none":
        return ()
    if isinstance(methods, str):
        methods = methods.split(",")
    methods = tuple(m.strip() for m in methods if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError("recover", unknown[0], f"choose from {', '.join(METHODS)} (comma-separated) or none")
    return methods


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

    def to_json(self) -> dict:
        return {"methods": list(self.methods), "layers_compensated": self.layers, "bn_reestimated": len(self.bn_nodes),
                "notes": self.notes}


# -- which layers: weight layout helpers -----------------------------------------------------
def _weight_axes(node: gs.Node, index: int) -> tuple[int, int] | None:
    """(input-channel axis, output-channel axis) of a layer's weight, for the layers handled."""
    if node.op == "Conv" and index == 1 and int(node.attrs.get("group", 1)) == 1:
        return 1, 0
    if node.op == "Gemm" and index == 1:
        return (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
    if node.op == "MatMul" and index == 1:
        return 0, 1
    return None


def _output_axis(node: gs.Node, graph) -> int:
    if node.op == "MatMul":
        return len(graph.shape(node.outputs[0]) or (0, 0)) - 1
    return 1


def prepare(analysis: Analysis, plan: Plan, methods, calibration, stats: dict | None = None,
            grams: dict | None = None) -> Recovery:
    """Work out every layer's compensation from the original weights and calibration data.

    `stats` ({tensor: ChannelStats}) and `grams` (Gram accumulators by tensor and geometry)
    are caches for repeated calls on the same model: what is missing is collected and added.
    """
    from .calibration import collect_channel_stats, collect_into

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
            if _weight_axes(node, index) is None or weight is None or (node.op != "Conv" and weight.ndim != 2):
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
        short = {k for k in lsq_layers if layer_grams[k].count < _LSQ_ROWS_PER_INPUT * len(layer_grams[k].sum)}
        if short:
            recovery.notes.append(f"lsq refit skipped for {len(short)} layer(s) with fewer than "
                                  f"{_LSQ_ROWS_PER_INPUT} calibration rows per input (it would fit the noise); "
                                  "bias compensation instead: give more calibration data")
        lsq_layers = {k: e for k, e in lsq_layers.items() if k not in short}
    # Every other layer gets bias compensation, from channel means (only theirs are measured).
    bias_layers = {k: e for k, e in by_layer.items() if k not in lsq_layers} \
        if "bias" in methods or "lsq" in methods else {}
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
    recovery.edits = by_layer
    return recovery


def _matrix(graph, node: gs.Node, index: int) -> np.ndarray:
    """The layer's weight as [in positions, out, rest...] float64 (kernel taps last)."""
    value = np.asarray(graph.evaluate(node.inputs[index]), dtype=np.float64)
    in_axis, out_axis = _weight_axes(node, index)
    value = np.moveaxis(value, (in_axis, out_axis), (0, 1))
    if node.op == "Gemm":
        value = value * float(node.attrs.get("alpha", 1.0))
    return value


def _removed_positions(analysis, layout, group, removed_channels) -> np.ndarray:
    idx = [offset + removed_channels[:, None] * exp + np.arange(exp)[None, :]
           for offset, exp, _ in analysis.layout_positions(layout, group)]
    return np.concatenate([i.reshape(-1) for i in idx]) if idx else np.zeros(0, dtype=np.int64)


def _bias_delta(analysis, edit: LayerEdit, stats) -> None:
    graph = analysis.graph
    delta = None
    for site, decision in edit.sites:
        node, index, _ = site.weight.layer_input
        w = _matrix(graph, node, index)
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
    from .calibration import GramStats, PatchGramStats

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
    from .calibration import GramStats

    graph = analysis.graph
    site, _ = edit.sites[0]
    node, index, _ = site.weight.layer_input
    full = _matrix(graph, node, index)  # [in, out, *kernel taps]
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
    ridge = _RIDGE * max(float(np.mean(np.diag(a))), 1e-12)
    prior = np.vstack([w[keep], np.zeros((1, w.shape[1]))])
    solution = np.linalg.solve(a + ridge * np.eye(k + 1), b + ridge * prior)
    edit.weight = np.moveaxis(solution[:k].reshape((len(kept_channels),) + full.shape[2:] + (w.shape[1],)), -1, 1)
    edit.bias_delta = solution[k]  # the fit's target excludes the old bias: this adds to it


# -- writing into the pruned graph ------------------------------------------------------------
def finish(analysis: Analysis, plan: Plan, recovery: Recovery) -> None:
    """After apply_plan: add each layer's bias change (sliced to its kept outputs), write refits."""
    atoms = analysis.atoms
    kept = plan.kept_by_atom(atoms)
    graph = analysis.graph
    nonfinite = [edit for edit in recovery.edits.values() if not _finite(edit.weight, edit.bias_delta)]
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
        out_layout = analysis.layouts.get(node.outputs[0].name, {}).get(_output_axis(node, graph))
        if edit.weight is not None:
            _write_weight(analysis, edit, out_layout, kept)
        if edit.bias_delta is None:
            continue
        delta = edit.bias_delta
        if out_layout is not None:
            delta = delta[kept_positions(out_layout, atoms, kept)]
        _add_bias(graph, node, delta.astype(np.float32))


def _finite(*arrays) -> bool:
    return all(a is None or np.isfinite(a).all() for a in arrays)


def _write_weight(analysis, edit: LayerEdit, out_layout, kept) -> None:
    """The refitted [kept in, out] matrix, sliced to the outputs the plan kept, in the weight's layout."""
    graph = analysis.graph
    node = edit.node
    out_keep = kept_positions(out_layout, analysis.atoms, kept) if out_layout is not None else None
    w = edit.weight if out_keep is None else edit.weight[:, out_keep]
    current = graph.const(node.inputs[1])
    in_axis, out_axis = _weight_axes(node, 1)
    value = np.moveaxis(w.reshape(w.shape[:2] + current.shape[2:]), (0, 1), (in_axis, out_axis))
    if node.op == "Gemm":
        value = value / float(node.attrs.get("alpha", 1.0))
    graph.set_const_input(node, 1, value.astype(current.dtype))


def _bias_tensor(graph, node: gs.Node):
    """(node, input index) holding the layer's bias constant, or None."""
    if node.op in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2].name and graph.const(node.inputs[2]) is not None:
            return node, 2
        return None
    users = node.outputs[0].outputs
    if len(users) == 1 and users[0].op == "Add":
        add = users[0]
        other = 1 if add.inputs[0] is node.outputs[0] else 0
        value = graph.const(add.inputs[other])
        if value is not None and value.ndim >= 1 and all(d == 1 for d in value.shape[:-1]):
            return add, other
    return None


def _add_bias(graph, node: gs.Node, delta: np.ndarray) -> None:
    found = _bias_tensor(graph, node)
    if found is not None:
        holder, index = found
        old = graph.const(holder.inputs[index])
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        new = (np.asarray(old, np.float64).reshape(-1) + delta / scale).reshape(old.shape)
        graph.set_const_input(holder, index, new.astype(old.dtype))
        return
    if node.op in ("Conv", "Gemm"):
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable.empty())
        const = gs.Constant(graph.fresh_name(f"{node.name or node.op}_bias"), (delta / scale).astype(np.float32))
        if len(node.inputs) > 2:
            node.inputs[2] = const
        else:
            node.inputs.append(const)
        return
    # MatMul without a bias Add: add one behind it.
    out = node.outputs[0]
    raw = gs.Variable(graph.fresh_name(out.name), dtype=out.dtype)
    node.outputs[0] = raw
    const = gs.Constant(graph.fresh_name(f"{node.name or 'MatMul'}_bias"), delta)
    graph.gs.nodes.append(gs.Node("Add", name=graph.fresh_name(node.name or "MatMul"), inputs=[raw, const],
                                  outputs=[out]))


def reestimate_batchnorm(pruned: onnx.ModelProto, original: onnx.ModelProto, kept: dict, calibration,
                         passes: int = _BN_PASSES, samples: int = _BN_SAMPLES) -> int:
    """Correct BatchNormalization layers for what pruning changed in their input.

    `kept` maps each layer's output tensor to the original input channels it kept (None: all).

    Each layer's input is measured in both models on the same calibration batches, and per
    channel the least-squares affine map from the pruned input to the original one is folded
    into the layer's scale and bias, so its output is the best per-channel match of the
    original's. (Matching the pruned input's own mean and variance, as recalibrating running
    statistics does, scales up whatever is left of the channel, error included.) Where nothing
    changed (dead channels removed) the map is the identity and the layer stays as it was.

    Layers are corrected in graph order, in at most `passes` runs over the data: a layer's map
    is measured after the layers before it were corrected. Measured all at once, every layer
    would also correct for errors that the earlier corrections already removed. The runs use
    about `samples` calibration samples, spread over all of the data.
    """
    from .calibration import calibration_feeds

    nodes = [n for n in pruned.graph.node if n.op_type == "BatchNormalization" and n.output[0] in kept]
    if not nodes:
        return 0
    # Two numbers per channel need few samples; every pass runs both models over them.
    calibration = calibration_feeds(calibration, original).spread(samples)
    inits = {i.name for i in pruned.graph.initializer}
    nodes = [n for n in nodes if len(n.input) >= 5 and all(name in inits for name in n.input[1:5])]
    step = max(1, -(-len(nodes) // max(1, passes)))
    outputs = [n.output[0] for n in nodes]  # node messages are replaced while a model is probed
    done = 0
    for start in progress(range(0, len(outputs), step), "BatchNorm correction", unit="pass"):
        done += _correct_batchnorms(pruned, original, outputs[start:start + step], kept, calibration)
    _drop_unread_initializers(pruned)
    return done


def _correct_batchnorms(pruned, original, outputs: list[str], kept: dict, calibration) -> int:
    from onnx import numpy_helper

    from .calibration import collect_paired_stats

    def batchnorms():
        return [n for n in pruned.graph.node if n.op_type == "BatchNormalization" and n.output[0] in set(outputs)]

    paired = collect_paired_stats(original, pruned, calibration,
                                  {n.input[0]: (1, kept[n.output[0]]) for n in batchnorms()})
    nodes = batchnorms()  # looked up again: probing replaced the node messages by equal copies
    inits = {i.name: i for i in pruned.graph.initializer}
    done = 0
    for node in nodes:
        scale, bias, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in node.input[1:5])
        gain, offset = paired[node.input[0]].affine()
        if len(gain) != len(scale) or not _finite(gain, offset):
            continue
        # BN(gain * x + offset) = (scale * gain)(x - mean) / s + bias + scale (offset + (gain - 1) mean) / s
        spread = np.sqrt(var + _attr(node, "epsilon", 1e-5))
        values = {1: scale * gain, 2: bias + scale * (offset + (gain - 1.0) * mean) / spread}
        for index, value in values.items():
            dtype = numpy_helper.to_array(inits[node.input[index]]).dtype
            name = f"{node.output[0]}_recovered_{'scale' if index == 1 else 'bias'}"
            while name in inits:
                name += "_"
            pruned.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), name))
            node.input[index] = name
        done += 1
    return done


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return attr.f
    return default


def _drop_unread_initializers(model: onnx.ModelProto) -> None:
    """Running stats replaced above are read by no one now (onnxruntime would warn about them)."""
    read = _names_read(model.graph) | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in read or
            any(i.name == init.name for i in model.graph.input)]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop bodies) included."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
    return names
