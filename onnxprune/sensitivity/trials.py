"""Sensitivity trials: how much the output moves when one group alone loses channels.

For every prunable group (or, with `layers=True`, every removable residual block) the model
is pruned at each ratio with nothing else touched, run on the calibration data (random
inputs without it), and compared with the original's outputs:

- rel_error: ||y' - y|| / ||y||, per graph output, averaged over outputs and batches;
- cosine_drop: 1 - cos(y', y), averaged the same way;
- accuracy: with labels, top-1 accuracy of the first output's argmax.

Every trial is a real removal: a fresh dependency analysis of the shaped model, the plan for
that one group, apply_plan, and an onnxruntime session. Analysis and apply take a few tens of
milliseconds on ResNet-50; the session dominates. Zeroing the channels instead would be
cheaper but is not the same function wherever a removed channel still carries a bias, a
normalization shift or a mean that consumers read.

The curves (damage against the fraction removed) feed `--target-macs` through
`PruneOptions.sensitivity` (see allocation.target.allocate_by_sensitivity).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .. import blocks
from ..core.cost import CostModel, count_macs
from ..core.criteria import criteria_names, prepared_criterion
from ..core.dependency import analyze, with_input_shapes
from ..core.errors import OnnxPruneError, OptionError, first_line
from ..core.graph import Graph
from ..core.metrics import random_inputs
from ..core.modelio import ModelFile
from ..core.plan import candidate_groups, group_key, plan_from_removed
from ..core.progress import progress
from ..core.shapes import (
    complete_shapes,
    concrete_input_shapes,
    restore_interface,
    static_copy,
)
from ..core.validate import load_input
from ..core.verify import session
from ..passes.analyze import analyze_dynamic
from ..passes.calibration import CalibrationSettings, LoadCalibration
from ..passes.channels import RemoveChannels
from ..passes.recovery import Recover, RecoverySettings
from ..passes.validate import InputSettings, ValidateInput, interface
from ..pipeline import Context, Pipeline
from ..settings import Flag, checked, choice, integer, setting, switch
from .formats import (
    DEFAULT_RATIOS,
    DEFAULT_SAMPLES,
    RANDOM_BATCHES,
    SensitivityResult,
    Trial,
)


def _ratio_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise OptionError("ratios", text, "give comma-separated numbers, e.g. 0.25,0.5,0.75") from None


def _ratios(name, value) -> tuple[float, ...]:
    if isinstance(value, str):
        value = _ratio_list(value)
    try:
        values = tuple(sorted({float(r) for r in value}))
    except (TypeError, ValueError):
        raise OptionError(name, value, "give numbers in (0, 1), e.g. 0.25,0.5,0.75") from None
    if not values or any(not 0.0 < r < 1.0 for r in values):
        raise OptionError(name, ",".join(f"{r:g}" for r in values) or "none", "each must be in (0, 1)")
    return values


@dataclass
class SensitivitySettings:
    """What `onnxprune sensitivity` measures (beyond the calibration, input, criterion and
    recovery settings it shares with pruning)."""

    ratios: tuple = setting(DEFAULT_RATIOS, check=_ratios, cli=Flag(
        "--ratios", "Fractions of each group to remove, comma-separated.", parse=_ratio_list, show_default=True))
    heads: bool = setting(False, check=switch, cli=Flag(
        "--heads", "Analyse attention heads as whole-head groups.", is_flag=True))
    layers: bool = setting(False, check=switch, cli=Flag(
        "--layers", "Remove each residual block instead of pruning channel groups.", is_flag=True))
    sparsity: bool = setting(False, check=switch, cli=Flag(
        "--sparsity", "Make each Conv/MatMul/Gemm layer's weights sparse alone (the smallest |w|, unstructured) "
        "instead of pruning channel groups: the table for prune --sparsity R --sensitivity.", is_flag=True))
    max_groups: int | None = setting(None, check=integer(1, optional=True), cli=Flag(
        "--max-groups", "Measure only the N groups holding the most MACs (the first N blocks, the N layers with "
        "the most weights).", metavar="N",
        parse=int))


def analyze_sensitivity(model, calibration=None, ratios=DEFAULT_RATIOS, importance: str = "l2",
                        input_shapes: dict | None = None, heads: bool = False, layers: bool = False,
                        labels=None, seed: int = 0, max_groups: int | None = None, *,
                        image_spec: str | None = None, calib_limit: int | None = None,
                        recover=(), allow_nonfinite: bool = False, sparsity: bool = False) -> SensitivityResult:
    """Prune each group (or residual block) alone at each ratio and measure the output change.

    `model` is a path or a ModelProto (never modified). `calibration` takes what prune's
    `calib` does (a path, with `image_spec` for images), CalibrationData, or an iterable of
    feed dicts; at most `calib_limit` samples are used (DEFAULT_SAMPLES when not given).
    Without it, random inputs stand in and the result says so. `labels` (1-D ints, one per
    calibration sample, in order) adds top-1 accuracy. `max_groups` measures only the groups
    holding the most MACs. `sparsity` measures weight sparsity instead: each Conv/MatMul/Gemm
    layer alone with its smallest weights zeroed at each ratio (keys are the weight names).
    `recover` ("bias", "lsq,bn", ...) applies training-free recovery in
    every trial, so the curves say what a group costs once compensated; it needs calibration
    data. Calibration data holding NaN/inf is refused unless `allow_nonfinite`.
    """
    started = time.perf_counter()
    if isinstance(model, ModelFile):
        name = model.path.name
    else:
        name = Path(model).name if isinstance(model, (str, Path)) else (model.graph.name or "model")
    what = checked(SensitivitySettings(tuple(ratios) if not isinstance(ratios, str) else ratios, heads, layers,
                                       sparsity, max_groups))
    ratios = (1.0,) if layers else what.ratios  # a block is removed whole
    methods = checked(RecoverySettings(recover)).recover
    if sparsity and (heads or layers):
        raise OptionError("sparsity", True, "measures weights of layers; drop {heads} and {layers}")
    if methods and (layers or sparsity):
        raise OptionError("recover", ",".join(methods), "applies to channel groups, not to "
                          + ("{layers}" if layers else "weight sparsity"))
    importance = choice(criteria_names)("importance", importance)
    original, owned = load_input(model)
    context = Context(owned=owned)
    calib = checked(CalibrationSettings(calibration, image_spec, calib_limit, allow_nonfinite))
    # checked and sorted if need be (on a copy: the caller's model is left as it was)
    original = Pipeline([ValidateInput(checked(InputSettings(input_shapes or {}, seed))), LoadCalibration(calib),
                         Recover(RecoverySettings(methods))])(original, context).model
    data = context.calibration
    if data is not None and data.limit is None:
        data = context.calibration = data.limited(DEFAULT_SAMPLES)
    notes: list[str] = list(context.notes)
    shapes, guessed = concrete_input_shapes(original, input_shapes)
    if data is not None:
        feeds = list(data)
        samples = sum(_samples(feed) for feed in feeds)
        description = f"{samples} calibration samples from {data.description}"
    else:
        if labels is not None:
            raise OptionError("labels", None, "needs calibration data ({calib})")
        feeds = [random_inputs(original, shapes, seed + i) for i in range(RANDOM_BATCHES)]
        samples = sum(_samples(feed) for feed in feeds)
        description = f"{RANDOM_BATCHES} random input batches (no --calib)"
        notes.append("no calibration data: damage measured on random inputs, which says little about real ones")
        if guessed:
            notes.append(f"dynamic dims {', '.join(guessed)} were set to defaults; pass --input-shape to choose")
    reference = _Reference(original, feeds, _check_labels(labels, samples, notes))
    common = dict(original=original, input_shapes=input_shapes, shapes=shapes, reference=reference,
                  max_groups=what.max_groups)
    if layers:
        rows, total, macs, criterion_name = *_block_trials(**common), "whole residual blocks"
    elif sparsity:
        rows, total, macs = _sparsity_trials(**common, ratios=ratios)
        criterion_name = "the smallest |w| of the layer, unstructured"
    else:
        rows, total, macs, criterion_name = _group_trials(
            **common, ratios=ratios, heads=heads, importance=importance, context=context, notes=notes)
    if what.max_groups is not None and what.max_groups < total:
        kind = "residual blocks, in graph order" if layers else "layers, those with the most weights" \
            if sparsity else "groups, those with the most MACs"
        notes.append(f"measured {what.max_groups} of {total} {kind}")
    return SensitivityResult(model=name, data=description, criterion=criterion_name, ratios=list(ratios),
                             rows=rows, macs=macs, baseline_accuracy=reference.accuracy, heads=heads,
                             layers=layers, sparsity=sparsity, groups_total=total, notes=notes,
                             seconds=round(time.perf_counter() - started, 3), recover=list(methods))


def _samples(feed: dict) -> int:
    lead = next(iter(feed.values()), None)
    return int(lead.shape[0]) if lead is not None and np.ndim(lead) else 1


def _check_labels(labels, samples: int, notes: list[str]) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" and labels.size and np.all(np.mod(labels, 1) == 0):
        labels = labels.astype(np.int64)  # class ids saved as floats
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise OptionError("labels", None, f"expected a 1-D array of integer class ids, got {labels.dtype} "
                             f"of shape {list(labels.shape)}")
    if len(labels) < samples:
        raise OptionError("labels", None, f"{len(labels)} labels for {samples} calibration samples")
    if len(labels) > samples:
        notes.append(f"used the first {samples} of {len(labels)} labels (one per calibration sample used)")
    return labels[:samples]


class _Reference:
    """The original model's outputs on the data, computed once, and how candidates compare."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict], labels: np.ndarray | None) -> None:
        self.feeds = feeds
        self.labels = labels
        try:
            sess = session(model)
            self.outputs = [sess.run(None, feed) for feed in feeds]
        except OnnxPruneError:
            raise
        except Exception as exc:
            raise OnnxPruneError(f"onnxruntime cannot run the model on this data ({first_line(exc)})") from None
        self.accuracy = self._accuracy(self.outputs) if labels is not None else None

    def measure(self, candidate: onnx.ModelProto) -> tuple[float, float, float | None]:
        """(relative error, 1 - cosine, accuracy or None) of `candidate` against the original."""
        sess = session(candidate)
        errors, drops, outputs = [], [], []
        for feed, before in zip(self.feeds, self.outputs):
            after = sess.run(None, feed)
            outputs.append(after)
            changes = [_change(a, b) for a, b in zip(before, after)]
            changes = [c for c in changes if c is not None]
            errors.append(np.mean([c[0] for c in changes]) if changes else 0.0)
            drops.append(np.mean([c[1] for c in changes]) if changes else 0.0)
        accuracy = self._accuracy(outputs) if self.labels is not None else None
        return float(np.mean(errors)), float(np.mean(drops)), accuracy

    def _accuracy(self, outputs: list[list[np.ndarray]]) -> float:
        """Top-1 accuracy of the first output's argmax (over all but its first axis)."""
        predictions = []
        for feed, batch in zip(self.feeds, outputs):
            first = np.asarray(batch[0])
            count = _samples(feed)
            if first.ndim == 0 or first.shape[0] != count:
                raise OptionError("labels", None, f"the first output has shape {list(first.shape)}; expected "
                                     f"{count} rows (one per sample) of class scores")
            predictions.append(first.reshape(count, -1).argmax(axis=1))
        return float(np.mean(np.concatenate(predictions) == self.labels))


def _change(before, after) -> tuple[float, float] | None:
    """(||b - a|| / ||a||, 1 - cos(a, b)) of one output, or None for a non-numeric one."""
    a, b = np.asarray(before), np.asarray(after)
    if not np.issubdtype(a.dtype, np.number) and a.dtype != np.bool_:
        return None
    if a.shape != b.shape:
        return math.inf, 1.0
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    finite = np.isfinite(a)
    if not np.array_equal(finite, np.isfinite(b)):
        return math.inf, 1.0  # NaN or inf where the original has numbers, or the reverse
    a, b = a[finite], b[finite]
    diff, norm_a, norm_b = np.linalg.norm(b - a), np.linalg.norm(a), np.linalg.norm(b)
    rel = diff / norm_a if norm_a > 0 else diff
    if norm_a > 0 and norm_b > 0:
        cosine = float(a @ b) / (norm_a * norm_b)
    else:
        cosine = 1.0 if diff == 0 else 0.0
    return float(rel), max(0.0, 1.0 - cosine)


# -- trials ----------------------------------------------------------------------------------
def _group_trials(original, input_shapes, shapes, reference: _Reference, max_groups, ratios, heads,
                  importance, context: Context, notes) -> tuple[list[Trial], int, int, str]:
    """Every prunable group at every ratio; returns (rows, groups, original MACs, criterion)."""
    # the analysis prune makes: with dynamic dims that hold groups, at the measuring dims
    working = complete_shapes(with_input_shapes(original, input_shapes, copy=True))
    measuring, guessed = concrete_input_shapes(working, input_shapes)
    pristine, note = analyze_dynamic(working, measuring if guessed else None, heads)
    if note:
        notes.append(note)
    shaped = pristine.graph.model  # shapes completed once; every trial analyses a fresh import of it
    groups, _ = candidate_groups(pristine)
    methods = context.compensation.methods if context.compensation is not None else ()
    crit, fallback = prepared_criterion(importance, context.seed, pristine, groups, context.calibration,
                                        compensated=bool(methods))
    notes.extend(fallback)
    # One recovery for all trials: its statistics and Grams are measured once and reused.
    context.caches.stats.update(crit.stats)
    if methods:
        notes.append(f"every trial applies recovery {','.join(methods)} (prune's report names, per layer, what it "
                     "could compensate)")
    cost_model = CostModel(pristine, static_copy(shaped, shapes))
    total_macs = cost_model.before["macs"]
    orders = {g.id: np.argsort(np.asarray(crit.scores(pristine, g), dtype=np.float64), kind="stable")
              for g in groups}
    notes.extend(n for n in crit.notes if n not in notes)

    def saved(group, count: int) -> int:
        kept = np.sort(orders[group.id][count:])
        return total_macs - cost_model.cost({group.atom: kept})["macs"]

    chosen = groups
    if max_groups is not None and max_groups < len(groups):
        widest = max(ratios)
        chosen = sorted(groups, key=lambda g: -saved(g, _count(widest, g.channels)))[:max_groups]
        chosen.sort(key=lambda g: g.id)
    rows = []
    for group in progress(chosen, "sensitivity trials", unit="group"):
        key = group_key(pristine, group)
        measured: dict[int, dict] = {}  # count -> measurement (small groups repeat counts)
        for ratio in ratios:
            count = _count(ratio, group.channels)
            if count == 0:
                continue
            if count not in measured:
                removed = np.sort(orders[group.id][:count])
                measured[count] = _measure(lambda: _pruned_group(shaped, heads, key, removed, context), reference)
            rows.append(Trial(key, group.kind, group.channels, ratio, count, **measured[count],
                              macs_saved=saved(group, count)))
    return rows, len(groups), total_macs, crit.name


def _count(ratio: float, channels: int) -> int:
    """floor(ratio * C), never the whole group."""
    return min(math.floor(ratio * channels), channels - 1)


def _pruned_group(shaped: onnx.ModelProto, heads: bool, key: str, removed: np.ndarray, context: Context):
    """The model with only `removed` channels of group `key` gone (a fresh analysis; `shaped`
    stays), recovered as prune would with the recovery in `context`."""
    analysis = analyze(Graph(shaped), heads=heads)
    pruned = RemoveChannels().apply(analysis, plan_from_removed(analysis, {key: removed}), context)
    restore_interface(pruned, context.interface, keep_value_info=False)  # --input-shape was for analysis only
    return pruned


def _measure(build, reference: _Reference) -> dict:
    """Trial fields rel_error, cosine_drop, accuracy and error for the model `build()` makes."""
    try:
        rel_error, cosine_drop, accuracy = reference.measure(build())
        return {"rel_error": rel_error, "cosine_drop": cosine_drop, "accuracy": accuracy}
    except OnnxPruneError:
        raise
    except Exception as exc:  # a rule that cannot handle this cut: report it, measure the rest
        return {"rel_error": None, "cosine_drop": None, "error": first_line(exc)[:300]}


def _block_trials(original, input_shapes, shapes, reference: _Reference,
                  max_groups) -> tuple[list[Trial], int, int]:
    """Every removable residual block removed alone; returns (rows, blocks, original MACs)."""
    shaped = complete_shapes(with_input_shapes(original, input_shapes, copy=True))
    found = blocks.find_blocks(Graph(shaped))
    total_macs = count_macs(static_copy(shaped, shapes))
    declared = interface(original)
    rows = []
    for block in progress(found[:max_groups], "sensitivity trials", unit="block"):
        pruned = []

        def build(key=block.key):
            graph = Graph(shaped)
            blocks.remove(graph, [b for b in blocks.find_blocks(graph) if b.key == key])
            model = graph.to_model()
            restore_interface(model, declared, keep_value_info=False)
            pruned.append(model)
            return model

        result = _measure(build, reference)
        saved = total_macs - count_macs(static_copy(pruned[0], shapes)) if "error" not in result else 0
        rows.append(Trial(block.key, "layer", None, 1.0, 1, **result, macs_saved=saved))
    if not found:
        raise OptionError("layers", None, "the model has no removable residual blocks (y = x + f(x))")
    return rows, len(found), total_macs


def _sparsity_trials(original, input_shapes, shapes, reference: _Reference, max_groups,
                     ratios) -> tuple[list[Trial], int, int]:
    """Every layer that can be made sparse, alone, at every ratio: its smallest |w| zeroed (the
    ratio counts all its weights, zeros already there included). One copy of the model is
    edited and put back layer by layer."""
    from ..sparsity.patterns import layer_mask, parse_pattern
    from ..sparsity.sparsify import eligible_layers

    working = onnx.ModelProto()
    working.CopyFrom(original)
    store, layers, _ = eligible_layers(working, parse_pattern("pattern", "unstructured"))
    total = len(layers)
    if max_groups is not None and max_groups < total:
        chosen = {id(layer) for layer in sorted(layers, key=lambda layer: -int(np.prod(layer.shape)))[:max_groups]}
        layers = [layer for layer in layers if id(layer) in chosen]
    pattern = parse_pattern("pattern", "unstructured")
    rows = []
    for layer in progress(layers, "sensitivity trials", unit="layer"):
        dense = store.read(layer.weight)
        matrix = layer.to_matrix(dense)
        for ratio in ratios:
            keep = layer_mask(np.abs(matrix.astype(np.float64)), pattern, ratio, per_row=False)
            sparse = layer.from_matrix(np.where(keep, matrix, 0))
            store.write(layer.weight, sparse)
            try:
                measured = _measure(lambda: working, reference)
            finally:
                store.write(layer.weight, dense)
            rows.append(Trial(layer.weight, "sparsity", int(dense.size), ratio, int((sparse == 0).sum()),
                              **measured))
    return rows, total, count_macs(static_copy(original, shapes))
