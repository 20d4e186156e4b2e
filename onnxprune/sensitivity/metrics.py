"""What each damage metric is called, and how its values are written (tables and plots)."""
from __future__ import annotations

import math

_METRIC_TEXT = {"rel_error": "relative output error ||y'-y|| / ||y||", "cosine_drop": "1 - cos(y', y)",
                "accuracy_drop": "top-1 accuracy lost (points of accuracy, 0.01 = 1%)"}


def metric_label(metric: str) -> str:
    return _METRIC_TEXT[metric]


def number_text(value: float, metric: str) -> str:
    if math.isinf(value):
        return "inf"
    if metric == "accuracy_drop":
        return f"{100 * value:+.1f}%"
    return f"{value:.3g}"
