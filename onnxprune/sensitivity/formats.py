"""Sensitivity results and their files: trials, curves, tables (markdown, CSV, JSON), labels."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import OnnxPruneError, OptionError, first_line
from ..core.files import regular_file, write_text
from .metrics import metric_label, number_text

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
    sparsity: bool = False  # layers' weights made sparse, not channels removed (keys: weight names)
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
                raise OptionError("labels", None, "accuracy_drop needs labels")
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
            extra = {k: data[k] for k in ("macs", "baseline_accuracy", "heads", "layers", "sparsity", "groups_total",
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
                 f"- data: {self.data}", f"- {'weights' if self.sparsity else 'channels'} chosen by: {self.criterion}"
                 + (f", then recovery: {','.join(self.recover)}" if self.recover else ""),
                 f"- cells: {metric_label(metric)}" + (" (rel. output error in brackets)"
                                                      if metric == "accuracy_drop" else "")]
        if self.baseline_accuracy is not None:
            lines.append(f"- top-1 accuracy of the original: {self.baseline_accuracy:.2%}")
        lines.extend(f"- note: {n}" for n in self.notes)
        lines.append("")
        ratios = sorted({t.ratio for t in self.rows})
        head = (["weight", "kind", "weights", "MACs saved (max)"] if self.sparsity else
                ["group", "kind", "channels", "MACs saved (max)"]) + [_ratio_header(r, self.layers) for r in ratios]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
        by_key = self._by_key()
        keys = self.ranking(metric)
        for key in keys[:limit]:
            trials = {t.ratio: t for t in by_key[key]}
            first = by_key[key][0]
            saved = max(t.macs_saved for t in by_key[key])
            cells = [f"`{key}`", first.kind, "-" if first.channels is None else str(first.channels),
                     _percent(saved / self.macs) if self.macs and not self.sparsity else "-"]
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
        value = number_text(self.damage(trial, metric), metric)
        if metric == "accuracy_drop":
            value += f" ({trial.rel_error:.3g})"
        return value

    def save_table(self, path) -> Path:
        """Write the table as markdown, CSV or JSON, by the file's suffix."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in TABLE_SUFFIXES:
            raise OptionError("table", str(path), f"give a file ending in {', '.join(TABLE_SUFFIXES)}")
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
        from .plot import draw

        return draw(self, Path(path), metric or self.default_metric())


def _ratio_header(ratio: float, layers: bool) -> str:
    return "removed" if layers else f"{ratio:g}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


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
        raise OptionError("sensitivity", str(path), f"cannot read ({first_line(exc)})") from None
    return SensitivityResult.from_json(data, f"--sensitivity {path}")


def load_labels(spec: str, calib=None) -> np.ndarray:
    """Class ids for accuracy: an .npy/.npz/.txt file, or the key `spec` of the --calib .npz file(s)
    (a folder's files are read in name order, as calibration reads them)."""
    path = Path(spec)
    if path.exists():
        return _labels_from_file(regular_file(path, "--labels"))
    if calib is None:
        raise OptionError("labels", spec, "no such file, and no {calib} .npz to take the key from")
    calib = Path(calib)
    files = sorted(p for p in calib.iterdir() if p.suffix.lower() == ".npz") if calib.is_dir() else [calib]
    if not files or any(f.suffix.lower() != ".npz" for f in files):
        raise OptionError("labels", spec, "a key needs {calib} to be an .npz file or a folder of them; "
                             "else give the labels as an .npy or .txt file")
    parts = []
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as npz:
                if spec not in npz.files:
                    raise OptionError("labels", spec, f"{file} has no such key (found: {', '.join(npz.files)})")
                parts.append(np.asarray(npz[spec]).reshape(-1))
        except (OSError, ValueError) as exc:
            raise OptionError("labels", None, f"{file}: not a readable .npz file ({first_line(exc)})") from None
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
                    raise OptionError("labels", str(path), "holds several arrays and none is called 'labels'")
                return npz[key]
        return np.loadtxt(path, dtype=np.int64, delimiter=",", ndmin=1)
    except OnnxPruneError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise OptionError("labels", str(path), f"cannot read ({first_line(exc)})") from None
