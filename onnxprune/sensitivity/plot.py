"""Sensitivity plots: one line per group, a heatmap for many groups, bars for blocks (matplotlib)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import OnnxPruneError, OptionError
from ..core.files import write_file
from .metrics import metric_label, number_text

if TYPE_CHECKING:  # the result's class is only named here: formats imports this module
    from .formats import SensitivityResult

_LINE_PLOT_MAX_GROUPS = 12  # beyond this many groups the plot is a heatmap


# -- plotting --------------------------------------------------------------------------------
def require_matplotlib():
    """matplotlib's Figure class, or a one-line error saying how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise OptionError("plot", None, "needs matplotlib: pip install matplotlib "
                             "(or install onnxprune with the [plot] extra)") from None
    return Figure


def draw(result: SensitivityResult, path: Path, metric: str) -> Path:
    figure_class = require_matplotlib()
    if path.suffix.lower() != ".png":
        raise OptionError("plot", str(path), "the plot is a PNG, give a file ending in .png")
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
            text = "failed" if np.isinf(value) else ("" if np.isnan(value) else number_text(value, metric))
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
