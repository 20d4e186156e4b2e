"""Per-layer sparsity from measured sensitivity: which layers take more zeros than others so
that the model as a whole reaches the sparsity asked for.

Each layer's curve (damage against the fraction of its weights zeroed, from `onnxprune
sensitivity --sparsity`) is read as piecewise linear from (0, 0) through the measured points,
its damage made non-decreasing. Zeros go first where the damage rises least per weight zeroed:
segment by segment, each layer's in order, the cheapest next segment anywhere is taken, the
last one in part, until the measured layers hold `target` of their weights as zeros in all.
"""
from __future__ import annotations

import heapq

from ..core.errors import OptionError


def allocate_sparsity(curves: dict[str, list[tuple[float, float]]], sizes: dict[str, int],
                      target: float) -> dict[str, float]:
    """{layer: fraction of its weights to zero} for the layers in both `curves` and `sizes`."""
    names = [name for name in curves if name in sizes and sizes[name] > 0]
    points = {}
    for name in names:
        line, worst = [(0.0, 0.0)], 0.0
        for fraction, damage in sorted(curves[name]):
            if fraction <= line[-1][0]:
                continue
            worst = max(worst, damage)
            line.append((fraction, worst))
        points[name] = line
    budget = target * sum(sizes[name] for name in names)
    reached = {name: 0.0 for name in names}
    step = {name: 0 for name in names}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        line, i = points[name], step[name]
        if i + 1 < len(line):
            (f0, d0), (f1, d1) = line[i], line[i + 1]
            heapq.heappush(heap, ((d1 - d0) / ((f1 - f0) * sizes[name]), name))

    for name in names:
        push(name)
    while budget > 1e-9 and heap:
        _, name = heapq.heappop(heap)
        line, i = points[name], step[name]
        weights = (line[i + 1][0] - line[i][0]) * sizes[name]
        if weights <= budget:
            budget -= weights
            reached[name] = line[i + 1][0]
            step[name] = i + 1
            push(name)
        else:
            reached[name] = line[i][0] + budget / sizes[name]
            budget = 0.0
    if budget > 1e-9:
        highest = max((line[-1][0] for line in points.values()), default=0.0)
        raise OptionError("sensitivity", None, f"its curves go up to {highest:g} of each layer, short of "
                          f"{{sparsity}} {target:g} in all: measure larger --ratios, or ask for less")
    return reached
