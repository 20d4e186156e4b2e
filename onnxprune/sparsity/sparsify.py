"""Make layer weights sparse: score every weight, zero the lowest in the pattern asked for.

Scores: `magnitude` |w|; `wanda` |w| times the rms of the input channel it multiplies, measured
on calibration data (Wanda, Sun et al. 2023), compared within each output as the paper does.
Per layer every eligible layer reaches the sparsity (N:M sets its own); with `global_rank`
unstructured weights (or blocks) are ranked across all layers at once.
"""
from __future__ import annotations

import fnmatch
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..core.errors import OptionError
from .layers import Skipped, SparseLayer, WeightStore, sparse_layers
from .patterns import Pattern, block_scores, complies, expand_blocks, layer_mask, lowest

METHODS = ("magnitude", "wanda")


@dataclass
class SparsityResult:
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> True where a weight stays
    report: dict = field(default_factory=dict)


def sparsify(model: onnx.ModelProto, pattern: Pattern, sparsity: float, method: str = "magnitude",
             global_rank: bool = False, exclude=(), calibration=None) -> SparsityResult:
    """Zero weights of `model` in place; return the masks and the report part."""
    if method not in METHODS:
        raise OptionError("sparsity_method", method, f"choose from {', '.join(METHODS)}")
    if global_rank and pattern.kind == "nm":
        raise OptionError("global_rank", True, "N:M keeps N of every M weights in every layer: there is nothing to "
                          "rank across layers")
    if method == "wanda" and calibration is None:
        raise OptionError("sparsity_method", method, "needs calibration data ({calib})")
    compressed_before = _compressed_weights(model)
    store = WeightStore(model)
    layers, skipped = sparse_layers(model, store)
    eligible = []
    for layer in layers:
        pattern_name = _excluded(layer, exclude)
        if pattern_name is not None:
            skipped.append(Skipped(layer.name, layer.node.op_type, f"excluded by --exclude {pattern_name!r}"))
            continue
        outputs, reduction = layer.to_matrix(np.zeros(layer.shape, np.float32)).shape
        why = pattern.fits(outputs, reduction, layer.channels)
        if why is not None:
            skipped.append(Skipped(layer.name, layer.node.op_type, why))
            continue
        eligible.append(layer)
    rms = _input_rms(model, eligible, calibration) if method == "wanda" else {}
    scores = {}
    for layer in eligible:
        matrix = np.abs(layer.to_matrix(store.read(layer.weight)).astype(np.float64))
        if method == "wanda":
            if layer.weight not in rms:
                skipped.append(Skipped(layer.name, layer.node.op_type, "no calibration statistics for its input"))
                continue
            matrix = matrix * layer.column_scale(rms[layer.weight])
        scores[layer.weight] = matrix
    eligible = [layer for layer in eligible if layer.weight in scores]
    target = pattern.fixed_sparsity if pattern.fixed_sparsity is not None else sparsity
    masks = (_global_masks(eligible, scores, pattern, target) if global_rank else
             {layer.weight: layer_mask(scores[layer.weight], pattern, target, per_row=method == "wanda")
              for layer in eligible})
    rows = []
    for layer in eligible:
        weight = store.read(layer.weight)
        matrix = layer.to_matrix(weight)
        zeros_before = int((matrix == 0).sum())
        sparse = np.where(masks[layer.weight], matrix, 0).astype(weight.dtype)
        store.write(layer.weight, layer.from_matrix(sparse))
        rows.append({"node": layer.name, "op": layer.node.op_type, "weight": layer.weight,
                     "shape": list(layer.shape), "weights": int(sparse.size), "zeros_before": zeros_before,
                     "zeros": int((sparse == 0).sum()), "sparsity": round(float((sparse == 0).mean()), 6),
                     "pattern_holds": complies(sparse, pattern)})
    total = sum(r["weights"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    report = {
        "pattern": str(pattern), "method": method, "target": target, "global": global_rank,
        "layers": rows,
        "skipped": [{"node": s.name, "op": s.op, "reason": s.reason} for s in skipped],
        "total": {"layers": len(rows), "weights": total, "zeros": zeros,
                  "sparsity": round(zeros / total, 6) if total else 0.0},
        "compressed_weight_bytes": {"before": compressed_before, "after": _compressed_weights(model)},
    }
    if pattern.kind == "nm":
        report["pattern_holds"] = {"layers": sum(r["pattern_holds"] for r in rows), "of": len(rows),
                                   "ineligible": sum(1 for s in skipped if "not a multiple" in s.reason)}
    return SparsityResult({layer.weight: layer.from_matrix(masks[layer.weight]) for layer in eligible}, report)


def _excluded(layer: SparseLayer, patterns) -> str | None:
    for pattern in patterns:
        if fnmatch.fnmatchcase(layer.name, pattern) or fnmatch.fnmatchcase(layer.weight, pattern):
            return pattern
    return None


def _global_masks(layers: list[SparseLayer], scores: dict, pattern: Pattern, sparsity: float) -> dict:
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


def _input_rms(model: onnx.ModelProto, layers: list[SparseLayer], calibration) -> dict[str, np.ndarray]:
    """{weight: rms of each input channel of its layer} over the calibration data."""
    from ..calibration import collect_channel_stats

    tensors = {layer.data_input: layer.data_axis for layer in layers}
    if not tensors:
        return {}
    stats = collect_channel_stats(model, calibration, tensors)
    return {layer.weight: np.asarray(stats[layer.data_input].rms) for layer in layers if layer.data_input in stats}


def _compressed_weights(model: onnx.ModelProto) -> int:
    """Bytes of the float initializers after zlib (level 6): what zeros save in a zipped file."""
    compressor = zlib.compressobj(6)
    size = 0
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            size += len(compressor.compress(tensor.raw_data))
    return size + len(compressor.flush())
