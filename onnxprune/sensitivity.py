"""Sensitivity analysis: how much the output moves when one group alone loses channels.

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
`PruneOptions.sensitivity` (see allocate.allocate_by_sensitivity).
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxPruneError, first_line
from .files import regular_file, write_file, write_text

FORMAT = "onnxprune-sensitivity/1"
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
DEFAULT_SAMPLES = 64  # calibration samples used unless a limit is given: each trial runs them all
RANDOM_BATCHES = 4  # without calibration data
METRICS = ("rel_error", "cosine_drop", "accuracy_drop")
TABLE_SUFFIXES = (".md", ".markdown", ".csv", ".json")
_LINE_PLOT_MAX_GROUPS = 12  # beyond this many groups the plot is a heatmap


@dataclass
class Trial:
    """One measurement: a group (or a block) pruned alone at one ratio."""

    key: str  # group key (plan.group_key) or, for a block, its Add's name
    kind: str  # filters, neurons, heads, or layer
    channels: int | None  # the group's width (None for a block)
    ratio: float  # the ratio asked for (1.0 for a whole block)
    removed: int  # channels removed (1 for a block)
    rel_error: float | None
    cosine_drop: float | None
    accuracy: float | None = None
    macs_saved: int = 0
    error: str | None = None  # why the trial could not be measured

    @property
    def fraction(self) -> float:
        """The fraction of the group actually removed (floor(ratio * C) / C)."""
        return self.removed / self.channels if self.channels else 1.0


@dataclass
class SensitivityResult:
    model: str
    data: str  # where the inputs came from
    criterion: str
    ratios: list[float]
    rows: list[Trial] = field(default_factory=list)
    macs: int = 0  # the original model's MACs at the measured input shapes
    baseline_accuracy: float | None = None
    heads: bool = False
    layers: bool = False
    groups_total: int = 0  # candidates before --max-groups
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    recover: list[str] = field(default_factory=list)  # training-free recovery applied in every trial

    # -- reading the numbers ------------------------------------------------------------
    def damage(self, trial: Trial, metric: str = "rel_error") -> float:
        """The damage a trial did on `metric` (inf for a trial that failed)."""
        if metric not in METRICS:
            raise OnnxPruneError(f"sensitivity metric {metric!r}: choose one of {', '.join(METRICS)}")
        if trial.error is not None:
            return math.inf
        if metric == "accuracy_drop":
            if trial.accuracy is None or self.baseline_accuracy is None:
                raise OnnxPruneError("accuracy_drop needs labels (--labels)")
            return self.baseline_accuracy - trial.accuracy
        return float(getattr(trial, metric))

    def default_metric(self) -> str:
        return "accuracy_drop" if self.baseline_accuracy is not None else "rel_error"

    def curves(self, metric: str = "rel_error") -> dict[str, list[tuple[float, float]]]:
        """{group key: [(fraction removed, damage), ...]} for the channel groups measured.

        Groups with a failed trial are left out: allocation then keeps them whole.
        """
        by_key: dict[str, list[Trial]] = {}
        for trial in self.rows:
            if trial.kind != "layer":
                by_key.setdefault(trial.key, []).append(trial)
        curves = {}
        for key, trials in by_key.items():
            if any(t.error is not None for t in trials):
                continue
            points = {t.fraction: self.damage(t, metric) for t in trials}
            curves[key] = sorted(points.items())
        return curves

    def ranking(self, metric: str | None = None) -> list[str]:
        """Keys, most sensitive first: by damage at the largest ratio measured, then the next."""
        metric = metric or self.default_metric()
        by_key = self._by_key()
        return sorted(by_key, key=lambda k: ([-self.damage(t, metric) for t in
                                             sorted(by_key[k], key=lambda t: -t.ratio)], k))

    def _by_key(self) -> dict[str, list[Trial]]:
        grouped: dict[str, list[Trial]] = {}
        for trial in self.rows:
            grouped.setdefault(trial.key, []).append(trial)
        return grouped

    # -- files ----------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = {"format": FORMAT}
        data.update({k: v for k, v in asdict(self).items() if k != "rows"})
        data["rows"] = [asdict(t) for t in self.rows]
        return _finite_json(data)

    @classmethod
    def from_json(cls, data: dict, source: str = "sensitivity file") -> "SensitivityResult":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise OnnxPruneError(f"{source}: not an onnxprune sensitivity file (written by `onnxprune sensitivity`)")
        try:
            rows = [Trial(**_restore_inf(row)) for row in data["rows"]]
            fields = {k: data[k] for k in ("model", "data", "criterion", "ratios")}
            extra = {k: data[k] for k in ("macs", "baseline_accuracy", "heads", "layers", "groups_total",
                                          "notes", "seconds", "recover") if k in data}
        except (KeyError, TypeError) as exc:
            raise OnnxPruneError(f"{source}: malformed sensitivity file ({first_line(exc)})") from None
        return cls(rows=rows, **fields, **extra)

    def to_csv(self) -> str:
        out = io.StringIO()
        names = list(Trial.__dataclass_fields__)
        writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for trial in self.rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(trial).items()})
        return out.getvalue()

    def to_markdown(self, limit: int | None = None) -> str:
        """A header and one table row per group, most sensitive first, one column per ratio."""
        metric = self.default_metric()
        lines = [f"Sensitivity of {self.model}", "",
                 f"- data: {self.data}", f"- channels chosen by: {self.criterion}"
                 + (f", then recovery: {','.join(self.recover)}" if self.recover else ""),
                 f"- cells: {_METRIC_TEXT[metric]}" + (" (rel. output error in brackets)"
                                                      if metric == "accuracy_drop" else "")]
        if self.baseline_accuracy is not None:
            lines.append(f"- top-1 accuracy of the original: {self.baseline_accuracy:.2%}")
        lines.extend(f"- note: {n}" for n in self.notes)
        lines.append("")
        ratios = sorted({t.ratio for t in self.rows})
        head = ["group", "kind", "channels", "MACs saved (max)"] + [_ratio_header(r, self.layers) for r in ratios]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        by_key = self._by_key()
        keys = self.ranking(metric)
        for key in keys[:limit]:
            trials = {t.ratio: t for t in by_key[key]}
            first = by_key[key][0]
            saved = max(t.macs_saved for t in by_key[key])
            cells = [f"`{key}`", first.kind, "-" if first.channels is None else str(first.channels),
                     _percent(saved / self.macs) if self.macs else "-"]
            cells += [self._cell(trials.get(r), metric) for r in ratios]
            lines.append("| " + " | ".join(cells) + " |")
        if limit is not None and len(keys) > limit:
            lines.append(f"\n... {len(keys) - limit} more (all of them with --table FILE)")
        return "\n".join(lines) + "\n"

    def _cell(self, trial: Trial | None, metric: str) -> str:
        if trial is None:
            return "-"  # floor(ratio * C) was 0, or a repeated count
        if trial.error is not None:
            return "failed"
        value = _number(self.damage(trial, metric), metric)
        if metric == "accuracy_drop":
            value += f" ({trial.rel_error:.3g})"
        return value

    def save_table(self, path) -> Path:
        """Write the table as markdown, CSV or JSON, by the file's suffix."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise OnnxPruneError(f"--table {path}: give a file ending in {', '.join(TABLE_SUFFIXES)}")
        if suffix == ".json":
            text = json.dumps(self.to_json(), indent=2)
        elif suffix == ".csv":
            text = self.to_csv()
        else:
            text = self.to_markdown()
        write_text(path, text, "--table")
        return path

    def plot(self, path, metric: str | None = None) -> Path:
        """A PNG: damage against ratio per group (a heatmap for many groups, bars for blocks)."""
        return _draw(self, Path(path), metric or self.default_metric())


_METRIC_TEXT = {"rel_error": "relative output error ||y'-y|| / ||y||", "cosine_drop": "1 - cos(y', y)",
                "accuracy_drop": "top-1 accuracy lost (points of accuracy, 0.01 = 1%)"}


def metric_label(metric: str) -> str:
    return _METRIC_TEXT[metric]


def _ratio_header(ratio: float, layers: bool) -> str:
    return "removed" if layers else f"{ratio:g}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _number(value: float, metric: str) -> str:
    if math.isinf(value):
        return "inf"
    if metric == "accuracy_drop":
        return f"{100 * value:+.1f}%"
    return f"{value:.3g}"


def _finite_json(data):
    """Infinities as strings: JSON has no literal for them."""
    if isinstance(data, dict):
        return {k: _finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_json(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    return data


def _restore_inf(row: dict) -> dict:
    return {k: float(v) if v in ("inf", "nan") else v for k, v in row.items()}


def load_sensitivity(path) -> SensitivityResult:
    """A sensitivity JSON written by `onnxprune sensitivity --table FILE.json`."""
    regular_file(path, "--sensitivity")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not text at all
        raise OnnxPruneError(f"--sensitivity {path}: cannot read ({first_line(exc)})") from None
    return SensitivityResult.from_json(data, f"--sensitivity {path}")


# -- measuring -------------------------------------------------------------------------------
def analyze_sensitivity(model, calibration=None, ratios=DEFAULT_RATIOS, importance: str = "l2",
                        input_shapes: dict | None = None, heads: bool = False, layers: bool = False,
                        labels=None, seed: int = 0, max_groups: int | None = None, *,
                        image_spec: str | None = None, calib_limit: int | None = None,
                        recover=(), allow_nonfinite: bool = False) -> SensitivityResult:
    """Prune each group (or residual block) alone at each ratio and measure the output change.

    `model` is a path or a ModelProto (never modified). `calibration` takes what --calib does
    (a path, with `image_spec` for images), CalibrationData, or an iterable of feed dicts; at
    most `calib_limit` samples are used (DEFAULT_SAMPLES when not given). Without it, random
    inputs stand in and the result says so. `labels` (1-D ints, one per calibration sample, in
    order) adds top-1 accuracy. `max_groups` measures only the groups holding the most MACs.
    `recover` (as --recover: "bias", "lsq,bn", ...) applies training-free recovery in every
    trial, so the curves say what a group costs once compensated; it needs calibration data.
    Calibration data holding NaN/inf is refused unless `allow_nonfinite`.
    """
    from .metrics import random_inputs
    from .modelio import ModelFile
    from .shapes import concrete_input_shapes
    from .validate import input_model

    started = time.perf_counter()
    if isinstance(model, ModelFile):
        name = model.path.name
    else:
        name = Path(model).name if isinstance(model, (str, Path)) else (model.graph.name or "model")
    original, _, input_notes = input_model(model)  # never modified: trials work on copies
    ratios = _check_ratios(ratios, layers)
    methods = _recovery_methods(recover, layers, calibration)
    if max_groups is not None and max_groups < 1:
        raise OnnxPruneError(f"--max-groups {max_groups}: give a positive number")
    notes: list[str] = list(input_notes)
    shapes, guessed = concrete_input_shapes(original, input_shapes)
    data = _calibration(original, calibration, image_spec, calib_limit, allow_nonfinite)
    if data is not None:
        feeds = list(data)
        samples = sum(_samples(feed) for feed in feeds)
        description = f"{samples} calibration samples from {data.description}"
    else:
        if labels is not None:
            raise OnnxPruneError("--labels: needs calibration data (--calib)")
        feeds = [random_inputs(original, shapes, seed + i) for i in range(RANDOM_BATCHES)]
        samples = sum(_samples(feed) for feed in feeds)
        description = f"{RANDOM_BATCHES} random input batches (no --calib)"
        notes.append("no calibration data: damage measured on random inputs, which says little about real ones")
        if guessed:
            notes.append(f"dynamic dims {', '.join(guessed)} were set to defaults; pass --input-shape to choose")
    reference = _Reference(original, feeds, _check_labels(labels, samples, notes))
    common = dict(original=original, input_shapes=input_shapes, shapes=shapes, reference=reference,
                  max_groups=max_groups)
    if layers:
        rows, total, macs, criterion_name = *_block_trials(**common), "whole residual blocks"
    else:
        rows, total, macs, criterion_name = _group_trials(
            **common, ratios=ratios, heads=heads, importance=importance, seed=seed, data=data, notes=notes,
            methods=methods)
    if max_groups is not None and max_groups < total:
        what = "residual blocks, in graph order" if layers else "groups, those with the most MACs"
        notes.append(f"measured {max_groups} of {total} {what}")
    return SensitivityResult(model=name, data=description, criterion=criterion_name, ratios=list(ratios),
                             rows=rows, macs=macs, baseline_accuracy=reference.accuracy, heads=heads,
                             layers=layers, groups_total=total, notes=notes,
                             seconds=round(time.perf_counter() - started, 3), recover=list(methods))


def _recovery_methods(recover, layers: bool, calibration) -> tuple[str, ...]:
    from .recovery import parse_methods

    methods = parse_methods(recover)
    if methods and layers:
        raise OnnxPruneError("--recover: applies to channel groups, not to --layers")
    if methods and calibration is None:
        raise OnnxPruneError(f"--recover {','.join(methods)}: needs calibration data (--calib)")
    return methods


def _check_ratios(ratios, layers: bool) -> tuple[float, ...]:
    if layers:
        return (1.0,)  # a block is removed whole
    try:
        values = tuple(sorted({float(r) for r in ratios}))
    except (TypeError, ValueError):
        raise OnnxPruneError(f"--ratios {ratios!r}: give numbers in (0, 1), e.g. 0.25,0.5,0.75") from None
    if not values or any(not 0.0 < r < 1.0 for r in values):
        raise OnnxPruneError(f"--ratios {','.join(f'{r:g}' for r in values) or 'none'}: each must be in (0, 1)")
    return values


def _calibration(model: onnx.ModelProto, calibration, image_spec, limit, allow_nonfinite: bool = False):
    """CalibrationData capped at `limit` (DEFAULT_SAMPLES unless given), or None."""
    if calibration is None:
        return None
    from .calibration import CalibrationData, calibration_feeds, load_calibration

    if isinstance(calibration, (str, Path)):
        data = load_calibration(calibration, model, image_spec=image_spec, limit=limit,
                                allow_nonfinite=allow_nonfinite)
    elif isinstance(calibration, CalibrationData):
        data = calibration if limit is None else calibration.limited(limit)
    else:
        data = calibration_feeds(calibration, model, limit=limit, allow_nonfinite=allow_nonfinite)
    return data if data.limit is not None else data.limited(DEFAULT_SAMPLES)


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
        raise OnnxPruneError(f"--labels: expected a 1-D array of integer class ids, got {labels.dtype} "
                             f"of shape {list(labels.shape)}")
    if len(labels) < samples:
        raise OnnxPruneError(f"--labels: {len(labels)} labels for {samples} calibration samples")
    if len(labels) > samples:
        notes.append(f"used the first {samples} of {len(labels)} labels (one per calibration sample used)")
    return labels[:samples]


def load_labels(spec: str, calib=None) -> np.ndarray:
    """Class ids for accuracy: an .npy/.npz/.txt file, or the key `spec` of the --calib .npz file(s)
    (a folder's files are read in name order, as calibration reads them)."""
    path = Path(spec)
    if path.exists():
        return _labels_from_file(regular_file(path, "--labels"))
    if calib is None:
        raise OnnxPruneError(f"--labels {spec}: no such file, and no --calib .npz to take the key from")
    calib = Path(calib)
    files = sorted(p for p in calib.iterdir() if p.suffix.lower() == ".npz") if calib.is_dir() else [calib]
    if not files or any(f.suffix.lower() != ".npz" for f in files):
        raise OnnxPruneError(f"--labels {spec}: a key needs --calib to be an .npz file or a folder of them; "
                             "else give the labels as an .npy or .txt file")
    parts = []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as npz:
                if spec not in npz.files:
                    raise OnnxPruneError(f"--labels {spec}: {file} has no such key (found: {', '.join(npz.files)})")
                parts.append(np.asarray(npz[spec]).reshape(-1))
        except (OSError, ValueError) as exc:
            raise OnnxPruneError(f"--labels: {file}: not a readable .npz file ({first_line(exc)})") from None
    return np.concatenate(parts)


def _labels_from_file(path: Path) -> np.ndarray:
    try:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                key = "labels" if "labels" in npz.files else (npz.files[0] if len(npz.files) == 1 else None)
                if key is None:
                    raise OnnxPruneError(f"--labels {path}: holds several arrays and none is called 'labels'")
                return npz[key]
        return np.loadtxt(path, dtype=np.int64, delimiter=",", ndmin=1)
    except OnnxPruneError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise OnnxPruneError(f"--labels {path}: cannot read ({first_line(exc)})") from None


class _Reference:
    """The original model's outputs on the data, computed once, and how candidates compare."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict], labels: np.ndarray | None) -> None:
        from .verify import session

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
        from .verify import session

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
                raise OnnxPruneError(f"--labels: the first output has shape {list(first.shape)}; expected "
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
                  importance, seed, data, notes, methods=()) -> tuple[list[Trial], int, int, str]:
    """Every prunable group at every ratio; returns (rows, groups, original MACs, criterion)."""
    from .allocate import CostModel
    from .pipeline import _interface, _Recover, analyze_model
    from .plan import candidate_groups, group_key
    from .shapes import static_copy

    pristine = analyze_model(original, input_shapes, copy=True, heads=heads)
    shaped = pristine.graph.model  # shapes completed once; every trial analyses a fresh import of it
    groups, _ = candidate_groups(pristine)
    crit = _prepared_criterion(importance, seed, pristine, groups, data, notes, compensated=bool(methods))
    # One recovery setting for all trials: its statistics and Grams are measured once and reused.
    recover = _Recover(methods, data, stats=dict(getattr(crit, "stats", None) or {})) if methods else None
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
    interface = _interface(original)
    rows = []
    for group in chosen:
        key = group_key(pristine, group)
        measured: dict[int, dict] = {}  # count -> measurement (small groups repeat counts)
        for ratio in ratios:
            count = _count(ratio, group.channels)
            if count == 0:
                continue
            if count not in measured:
                removed = np.sort(orders[group.id][:count])
                measured[count] = _measure(lambda: _pruned_group(shaped, heads, key, removed, interface,
                                                                 recover), reference)
            rows.append(Trial(key, group.kind, group.channels, ratio, count, **measured[count],
                              macs_saved=saved(group, count)))
    return rows, len(groups), total_macs, crit.name


def _count(ratio: float, channels: int) -> int:
    """floor(ratio * C), never the whole group."""
    return min(math.floor(ratio * channels), channels - 1)


def _prepared_criterion(name: str, seed: int, analysis, groups, data, notes: list[str], compensated: bool = False):
    """The criterion, prepared on the calibration data when it needs some (l2 when there is none)."""
    from .importance import prepared_criterion

    crit, fallback = prepared_criterion(name, seed, analysis, groups, data, compensated=compensated)
    notes.extend(fallback)
    return crit


def _pruned_group(shaped: onnx.ModelProto, heads: bool, key: str, removed: np.ndarray, interface: dict,
                  recover=None):
    """The model with only `removed` channels of group `key` gone (a fresh analysis; `shaped` stays),
    recovered as prune would with the same `recover` (pipeline._Recover) settings."""
    from .dependency import analyze
    from .graph import Graph
    from .pipeline import _apply, _restore_interface
    from .plan import plan_from_removed

    analysis = analyze(Graph(shaped), heads=heads)
    pruned = _apply(analysis, plan_from_removed(analysis, {key: removed}), False, recover)
    _restore_interface(pruned, interface, keep_value_info=False)  # --input-shape was for analysis only
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
    from . import blocks
    from .graph import Graph
    from .metrics import count_macs
    from .pipeline import _interface, _restore_interface, _with_input_shapes
    from .shapes import complete_shapes, static_copy

    shaped = complete_shapes(_with_input_shapes(original, input_shapes, copy=True))
    found = blocks.find_blocks(Graph(shaped))
    total_macs = count_macs(static_copy(shaped, shapes))
    interface = _interface(original)
    rows = []
    for block in found[:max_groups]:
        pruned = []

        def build(key=block.key):
            graph = Graph(shaped)
            blocks.remove(graph, [b for b in blocks.find_blocks(graph) if b.key == key])
            model = graph.to_model()
            _restore_interface(model, interface, keep_value_info=False)
            pruned.append(model)
            return model

        result = _measure(build, reference)
        saved = total_macs - count_macs(static_copy(pruned[0], shapes)) if "error" not in result else 0
        rows.append(Trial(block.key, "layer", None, 1.0, 1, **result, macs_saved=saved))
    if not found:
        raise OnnxPruneError("--layers: the model has no removable residual blocks (y = x + f(x))")
    return rows, len(found), total_macs


# -- plotting --------------------------------------------------------------------------------
def require_matplotlib():
    """matplotlib's Figure class, or a one-line error saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise OnnxPruneError("--plot needs matplotlib: pip install matplotlib "
                             "(or install onnxprune with the [plot] extra)") from None
    return Figure


def _draw(result: SensitivityResult, path: Path, metric: str) -> Path:
    figure_class = require_matplotlib()
    if path.suffix.lower() != ".png":
        raise OnnxPruneError(f"--plot {path}: the plot is a PNG, give a file ending in .png")
    if not result.rows:
        raise OnnxPruneError("nothing to plot: no trial was measured")
    keys = result.ranking(metric)
    if result.layers:
        figure = _bars(figure_class, result, keys, metric)
    elif len(keys) <= _LINE_PLOT_MAX_GROUPS:
        figure = _lines(figure_class, result, keys, metric)
    else:
        figure = _heatmap(figure_class, result, keys, metric)
    figure.suptitle(f"Sensitivity of {result.model}", fontweight="bold")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    data = buffer.getvalue()
    write_file(path, lambda staged: staged.write_bytes(data), "--plot", needed_bytes=len(data))
    return path


def _subtitle(result: SensitivityResult) -> str:
    how = "whole residual blocks removed" if result.layers else f"channels chosen by {result.criterion}"
    if result.recover:
        how += f", recovery {','.join(result.recover)}"
    return f"{result.data}; {how}"


def _label(result: SensitivityResult, key: str, width: int = 48) -> str:
    first = next(t for t in result.rows if t.key == key)
    short = key if len(key) <= width else "…" + key[-(width - 1):]
    return short if first.channels is None else f"{short} ({first.kind}, {first.channels})"


def _lines(figure_class, result, keys, metric):
    """One line per group: damage against the fraction of its channels removed."""
    figure = figure_class(figsize=(10, 5.5), layout="constrained")
    axes = figure.subplots()
    by_key = result._by_key()
    for key in keys:  # most sensitive first, so the legend reads top-down like the table
        trials = sorted((t for t in by_key[key] if t.error is None), key=lambda t: t.fraction)
        xs = [0.0] + [t.fraction for t in trials]
        ys = [0.0] + [result.damage(t, metric) for t in trials]
        axes.plot(xs, ys, marker="o", label=_label(result, key))
    axes.set_xlabel("fraction of the group's channels removed (the group alone)")
    axes.set_ylabel(metric_label(metric))
    axes.set_title(_subtitle(result), fontsize=9)
    axes.set_xlim(0, min(1.0, max(t.fraction for t in result.rows) + 0.05))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="most sensitive first")
    return figure


def _heatmap(figure_class, result, keys, metric):
    """Groups (most sensitive on top) x ratios, coloured by damage, values written in when they fit."""
    from matplotlib.colors import LogNorm, Normalize

    ratios = sorted({t.ratio for t in result.rows})
    values = np.full((len(keys), len(ratios)), np.nan)
    by_key = result._by_key()
    for i, key in enumerate(keys):
        for trial in by_key[key]:
            values[i, ratios.index(trial.ratio)] = result.damage(trial, metric)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 1.0
    positive = finite[finite > 0]
    if metric != "accuracy_drop" and positive.size and top / float(positive.min()) > 100:
        # Damage spans orders of magnitude: a log scale keeps the quiet groups distinguishable.
        norm = LogNorm(vmin=max(float(positive.min()), top * 1e-4), vmax=top)
        shown = np.where(np.isfinite(values), np.clip(values, norm.vmin, None), values)
    else:
        norm = Normalize(vmin=min(0.0, float(finite.min()) if finite.size else 0.0), vmax=top or 1.0)
        shown = values
    rows = len(keys)
    figure = figure_class(figsize=(3.2 + 1.1 * len(ratios) + 3.5, min(60.0, 1.8 + 0.24 * rows)), layout="constrained")
    axes = figure.subplots()
    cmap = _colormap()
    image = axes.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=cmap, norm=norm,
                        interpolation="nearest")
    axes.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    axes.set_xlabel("ratio of the group's channels removed (the group alone)")
    step = max(1, rows // 150)  # past ~150 rows, label every n-th so the labels stay legible
    axes.set_yticks(range(0, rows, step), [_label(result, k) for k in keys[::step]], fontsize=7)
    axes.set_title(_subtitle(result) + "\nmost sensitive groups on top", fontsize=9)
    if rows * len(ratios) <= 400:
        for (i, j), value in np.ndenumerate(values):
            text = "failed" if np.isinf(value) else ("" if np.isnan(value) else _number(value, metric))
            axes.text(j, i, text, ha="center", va="center", fontsize=6.5, color=_ink(image, shown[i, j]))
    figure.colorbar(image, ax=axes, label=metric_label(metric), shrink=min(1.0, 12 / max(rows, 1) + 0.3))
    return figure


def _bars(figure_class, result, keys, metric):
    """One bar per residual block: the damage of removing it alone."""
    by_key = result._by_key()
    damages = [result.damage(by_key[k][0], metric) for k in keys]
    finite = [d for d in damages if math.isfinite(d)]
    cap = max(finite) * 1.05 if finite else 1.0
    figure = figure_class(figsize=(10, min(60.0, 2.4 + 0.28 * len(keys))), layout="constrained")
    axes = figure.subplots()
    positions = range(len(keys))
    axes.barh(positions, [d if math.isfinite(d) else cap for d in damages],
              color=["#b2182b" if not math.isfinite(d) else "#2166ac" for d in damages])
    axes.set_yticks(positions, [_label(result, k) for k in keys], fontsize=7)
    axes.invert_yaxis()  # most sensitive on top
    axes.set_xlabel(metric_label(metric) + " when the block is removed")
    failed = "\nred: the trial failed (see the table)" if len(finite) < len(damages) else ""
    axes.set_title(_subtitle(result) + failed, fontsize=9)
    axes.grid(axis="x", alpha=0.3)
    return figure


def _colormap():
    from matplotlib import colormaps

    return colormaps["YlOrRd"].with_extremes(bad="#d9d9d9")  # grey: not measured (floor(ratio * C) = 0)


def _ink(image, value) -> str:
    """Black text on light cells, white on dark ones."""
    if not np.isfinite(value):
        return "black"
    r, g, b, _ = image.cmap(image.norm(value))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
