"""Make layer weights sparse: score every weight, zero the lowest in the pattern asked for.

Scores: `magnitude` |w|; `wanda` |w| times the rms of the input channel it multiplies, measured
on calibration data (Wanda, Sun et al. 2023), compared within each output as the paper does;
`taylor` and `obd` from per-sample gradients of the loss (onnxruntime-training);
`sparsegpt` chooses and updates with the layer's input Hessian (sparsegpt.py), layer after
layer on the already sparse upstream model. Per layer every eligible layer reaches the
sparsity (N:M sets its own); with `global_rank` unstructured weights (or blocks) are ranked
across all layers at once (magnitude and wanda).
"""
from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..core.errors import OptionError
from ..core.progress import progress
from .layers import Skipped, SparseLayer, WeightStore, sparse_layers
from .patterns import Pattern, block_scores, complies, expand_blocks, layer_mask, lowest
from .storage import storage_estimate

METHODS = ("magnitude", "wanda", "sparsegpt", "taylor", "obd")
GRADIENT_METHODS = ("taylor", "obd")  # scored from gradients: onnxruntime-training


@dataclass
class SparsityResult:
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> True where a weight stays
    report: dict = field(default_factory=dict)


def sparsify(model: onnx.ModelProto, pattern: Pattern, sparsity: float, method: str = "magnitude",
             global_rank: bool = False, exclude=(), calibration=None,
             ratios: dict[str, float] | None = None) -> SparsityResult:
    """Zero weights of `model` in place; return the masks and the report part. `ratios`
    ({weight name: sparsity}) sets some layers' sparsity apart from `sparsity`."""
    if method not in METHODS:
        raise OptionError("sparsity_method", method, f"choose from {', '.join(METHODS)}")
    if global_rank and pattern.kind == "nm":
        raise OptionError("global_rank", True, "N:M keeps N of every M weights in every layer: there is nothing to "
                          "rank across layers")
    if method != "magnitude" and calibration is None:
        raise OptionError("sparsity_method", method, "needs calibration data ({calib})")
    if method == "sparsegpt" and (pattern.kind == "block" or global_rank):
        raise OptionError("sparsity_method", method, "works per layer, unstructured or N:M (not with blocks or "
                          "{global_rank})")
    ratios = dict(ratios or {})
    if ratios and (pattern.kind == "nm" or global_rank):
        raise OptionError("global_rank" if global_rank else "pattern", True if global_rank else str(pattern),
                          "sets the sparsity of every layer itself: per-layer sparsities do not apply")
    compressed_before = compressed_weight_bytes(model)
    store, eligible, skipped = eligible_layers(model, pattern, exclude)
    target = pattern.fixed_sparsity if pattern.fixed_sparsity is not None else sparsity
    share = {layer.weight: ratios.get(layer.weight, target) for layer in eligible}
    zeros_before = {layer.weight: int((store.read(layer.weight) == 0).sum()) for layer in eligible}
    # sparsegpt writes its layers as it goes (downstream Hessians are measured on them); the
    # layers it cannot take (grouped convolutions, say) are scored by magnitude below
    done, notes = _sparsegpt(model, store, eligible, pattern, share, calibration) \
        if method == "sparsegpt" else (set(), [])
    rest = [layer for layer in eligible if layer.weight not in done]
    rms = _input_rms(model, rest, calibration) if method == "wanda" else {}
    gradient_scores = _gradient_scores(model, store, rest, calibration, method, notes) \
        if method in GRADIENT_METHODS else {}
    scores = {}
    for layer in rest:
        matrix = np.abs(layer.to_matrix(store.read(layer.weight)).astype(np.float64))
        if method in GRADIENT_METHODS:
            if layer.weight not in gradient_scores:
                skipped.append(Skipped(layer.name, layer.node.op_type, "not a trained weight: no gradient for it"))
                continue
            matrix = layer.to_matrix(gradient_scores[layer.weight])
        elif method == "wanda":
            if layer.weight not in rms:
                skipped.append(Skipped(layer.name, layer.node.op_type, "no calibration statistics for its input"))
                continue
            matrix = matrix * layer.column_scale(rms[layer.weight])
        scores[layer.weight] = matrix
    rest = [layer for layer in rest if layer.weight in scores]
    masks = (global_masks(rest, scores, pattern, target) if global_rank else
             {layer.weight: layer_mask(scores[layer.weight], pattern, share[layer.weight],
                                       per_row=method == "wanda") for layer in rest})
    for layer in rest:
        weight = store.read(layer.weight)
        store.write(layer.weight, layer.from_matrix(np.where(masks[layer.weight], layer.to_matrix(weight), 0)))
    for layer in eligible:
        if layer.weight in done:
            masks[layer.weight] = layer.to_matrix(store.read(layer.weight)) != 0
    eligible = [layer for layer in eligible if layer.weight in masks]
    if store.clipped:
        notes.append(f"{sum(store.clipped.values())} updated weight(s) of {len(store.clipped)} quantized layer(s) "
                     "fell outside the integer range and were clipped (scales are kept)")
    report = {"pattern": str(pattern), "method": method, "target": target, "global": global_rank,
              **sparsity_report(model, store, eligible, skipped, pattern, compressed_before, zeros_before),
              "notes": notes}
    if ratios:
        for row in report["layers"]:
            row["target"] = round(share[row["weight"]], 6)
    return SparsityResult({layer.weight: layer.from_matrix(masks[layer.weight]) for layer in eligible}, report)


def eligible_layers(model: onnx.ModelProto, pattern: Pattern, exclude=()) \
        -> tuple[WeightStore, list[SparseLayer], list[Skipped]]:
    """The layers `pattern` can be applied to, and those left dense with the reason."""
    store = WeightStore(model)
    layers, skipped = sparse_layers(model, store)
    eligible = []
    for layer in layers:
        pattern_name = _excluded(layer, exclude)
        if pattern_name is not None:
            skipped.append(Skipped(layer.name, layer.node.op_type, f"excluded by --exclude {pattern_name!r}"))
            continue
        outputs, reduction = layer.matrix_shape
        why = pattern.fits(outputs, reduction, layer.channels)
        if why is not None:
            skipped.append(Skipped(layer.name, layer.node.op_type, why))
            continue
        eligible.append(layer)
    return store, eligible, skipped


def sparsity_report(model: onnx.ModelProto, store: WeightStore, layers: list[SparseLayer], skipped: list[Skipped],
                    pattern: Pattern, compressed_before: int, zeros_before: dict[str, int]) -> dict:
    """Per-layer and total sparsity of `layers` as the model holds them now, pattern compliance,
    the zipped size of the weights before (given) and now, and what storing them as sparse
    tensors would give (storage.py)."""
    rows, stored = [], {}
    for layer in layers:
        value = store.read(layer.weight)
        if layer.weight in store.initializers:  # what graph.sparse_initializer can hold
            stored[layer.weight] = value
        sparse = layer.to_matrix(value)
        rows.append({"node": layer.name, "op": layer.node.op_type, "weight": layer.weight, "shape": list(layer.shape),
                     "weights": int(sparse.size), "zeros_before": zeros_before[layer.weight],
                     "zeros": int((sparse == 0).sum()), "sparsity": round(float((sparse == 0).mean()), 6),
                     "pattern_holds": complies(sparse, pattern)})
    total = sum(r["weights"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    report = {
        "layers": rows,
        "skipped": [{"node": s.name, "op": s.op, "reason": s.reason} for s in skipped],
        "total": {"layers": len(rows), "weights": total, "zeros": zeros,
                  "sparsity": round(zeros / total, 6) if total else 0.0},
        "compressed_weight_bytes": {"before": compressed_before, "after": compressed_weight_bytes(model)},
        "sparse_storage": {**storage_estimate(stored), "written": False},
    }
    if pattern.kind == "nm":
        holds = sum(r["pattern_holds"] for r in rows)
        report["pattern_holds"] = {"layers": holds, "of": len(rows),
                                   "ineligible": sum(1 for s in skipped if "not a multiple" in s.reason)}
        if (pattern.n, pattern.m) == (2, 4):
            # what TensorRT's sparse tensor-core kernels take (it picks them per layer when the
            # engine is built with sparsity enabled); the layers left dense run dense
            report["tensorrt_2_4"] = {"ready": bool(rows) and holds == len(rows), "layers": holds,
                                      "dense": [s.name for s in skipped]}
    return report


def _excluded(layer: SparseLayer, patterns) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(layer.weight, pattern):
            return pattern
    return None


def global_masks(layers: list[SparseLayer], scores: dict, pattern: Pattern, sparsity: float) -> dict:
    """One ranking of every weight (or block) of every layer."""
    units = {}
    for layer in layers:
        s = scores[layer.weight]
        units[layer.weight] = block_scores(s, pattern.rows, pattern.cols) if pattern.kind == "block" else s
    pool = np.concatenate([u.reshape(-1) for u in units.values()]) if units else np.zeros(0)
    keep = lowest(pool, math.floor(sparsity * pool.size))
    masks, start = {}, 0
    for name, unit in units.items():
        part = keep[start:start + unit.size].reshape(unit.shape)
        start += unit.size
        masks[name] = expand_blocks(part, pattern.rows, pattern.cols) if pattern.kind == "block" else part
    return masks


def _gradient_scores(model: onnx.ModelProto, store: WeightStore, layers: list[SparseLayer], calibration,
                     method: str, notes: list[str]) -> dict[str, np.ndarray]:
    """{weight: score of each weight} from per-sample gradients of the cross-entropy (labels from
    the calibration data, else the model's predictions): taylor, the mean |g * w|, the
    first-order change of the loss when the weight goes; obd, E[g^2] * w^2 / 2, Optimal Brain
    Damage with the empirical Fisher for the Hessian's diagonal."""
    from ..criteria.gradient import GradientCriterion
    from ..training.gradients import per_sample_gradients

    weights = {layer.weight: store.read(layer.weight).astype(np.float64) for layer in layers}
    sums = {name: np.zeros_like(w) for name, w in weights.items()}

    def visit(gradients: dict) -> None:
        for name, w in weights.items():
            g = gradients.get(name)
            if g is None:
                continue
            g = np.asarray(g, np.float64)
            sums[name] += np.abs(g * w) if method == "taylor" else g * g

    run = per_sample_gradients(model, calibration, visit, labels=getattr(calibration, "labels", None),
                               limit=GradientCriterion.samples)
    count = max(run.samples, 1)
    source = "the data's labels" if run.labels == "given" else "the model's own predictions"
    notes.append(f"sparsity {method}: gradients of the cross-entropy against {source} on {run.samples} calibration "
                 f"sample(s) in {run.seconds:.1f} s")
    trained = set(run.weights)
    return {name: (sums[name] / count if method == "taylor" else sums[name] / count * weights[name] ** 2 / 2)
            for name in weights if name in trained}


def _input_rms(model: onnx.ModelProto, layers: list[SparseLayer], calibration) -> dict[str, np.ndarray]:
    """{weight: rms of each input channel of its layer} over the calibration data."""
    from ..calibration import collect_channel_stats

    tensors = {layer.data_input: layer.data_axis for layer in layers}
    if not tensors:
        return {}
    stats = collect_channel_stats(model, calibration, tensors)
    return {layer.weight: np.asarray(stats[layer.data_input].rms) for layer in layers if layer.data_input in stats}


def compressed_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the float initializers after zlib (level 6): what zeros save in a zipped file."""
    compressor = zlib.compressobj(6)
    size = 0
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            size += len(compressor.compress(tensor.raw_data))
    return size + len(compressor.flush())


def _sparsegpt(model: onnx.ModelProto, store: WeightStore, layers: list[SparseLayer], pattern: Pattern,
               share: dict[str, float], calibration) -> tuple[set[str], list[str]]:
    """Sparsify `layers` with SparseGPT in waves: a wave holds the layers whose upstream layers
    are done, and one pass over the calibration data measures all of their input Hessians."""
    from ..calibration import GramStats, PatchGramStats
    from ..calibration.probe import collect_into
    from .sparsegpt import obs_prune

    waves, notes = _waves(model, layers), []
    done: set[str] = set()
    for wave in progress(waves, "sparsegpt", unit="wave"):
        accumulators, fits = {}, []
        for layer in wave:
            geometry = _patch_geometry(layer)
            if geometry == "unsupported":
                continue
            key = (layer.data_input, geometry)
            if key not in accumulators:
                accumulators[key] = GramStats(layer.data_axis, layer.data_input) if geometry is None else \
                    PatchGramStats(*geometry, name=layer.data_input)
            fits.append((layer, accumulators[key], geometry))
        if not fits:
            continue
        collect_into(model, calibration, [(name, acc) for (name, _), acc in accumulators.items()])
        for layer, acc, geometry in fits:
            hessian = acc.gram if geometry is None else _taps_inner(acc.gram, layer)
            matrix = layer.to_matrix(store.read(layer.weight))
            sparse = obs_prune(matrix, hessian, pattern, share[layer.weight])
            store.write(layer.weight, layer.from_matrix(sparse.astype(matrix.dtype)))
            done.add(layer.weight)
    left = [layer.name for layer in layers if layer.weight not in done]
    if left:
        notes.append(f"sparsegpt: {len(left)} layer(s) by magnitude instead (grouped or padded-SAME "
                     f"convolutions), e.g. {left[0]}")
    return done, notes


def _patch_geometry(layer: SparseLayer):
    """None for a plain Gram over the input channels, the convolution's patch geometry, or
    "unsupported" (grouped convolutions, automatic padding)."""
    if layer.layout != "conv":
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in layer.node.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if layer.groups != 1 or auto_pad not in ("NOTSET", "VALID"):
        return "unsupported"
    rank = len(layer.shape) - 2
    kernel = tuple(layer.shape[2:])
    strides = tuple(attrs.get("strides") or [1] * rank)
    pads = tuple(attrs.get("pads") or [0] * (2 * rank))
    dilations = tuple(attrs.get("dilations") or [1] * rank)
    if all(k == 1 for k in kernel) and not any(pads) and all(v == 1 for v in strides):
        return None
    return kernel, strides, pads, dilations


def _taps_inner(gram: np.ndarray, layer: SparseLayer) -> np.ndarray:
    """A patch Gram (channel-major, taps inner) reordered to the matrix's columns (taps, then channel)."""
    channels, taps = layer.shape[1], int(np.prod(layer.shape[2:]))
    order = (np.arange(channels)[None, :] * taps + np.arange(taps)[:, None]).reshape(-1)
    return gram[np.ix_(order, order)]


def _waves(model: onnx.ModelProto, layers: list[SparseLayer]) -> list[list[SparseLayer]]:
    """Layers grouped by depth: a layer's wave comes after every sparse layer upstream of it."""
    by_node = {id(layer.node): layer for layer in layers}
    depth: dict[str, int] = {}  # tensor -> waves of sparse layers upstream of it
    level: dict[str, int] = {}
    for node in model.graph.node:  # topological order, as onnx requires
        upstream = max((depth.get(name, 0) for name in node.input if name), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            level[layer.weight] = upstream
            upstream += 1
        for name in node.output:
            depth[name] = upstream
    waves: dict[int, list] = {}
    for layer in layers:
        waves.setdefault(level[layer.weight], []).append(layer)
    return [waves[k] for k in sorted(waves)]
