"""Target-driven allocation: how many channels each group loses to meet a MACs or params budget.

`--target-macs 0.5` asks for a model with half the multiply-accumulates. Which groups give
up how much is decided here, greedily: the next channels to go are those whose damage per
unit of cost saved is smallest. Damage is either the criterion's score normalized within
its group (as `--global` ranks channels) or a measured sensitivity curve per group.

Cost is predicted by `core.cost.CostModel`, with the numbers the report counts.
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

import numpy as np
import onnx

from ..core.cost import METRICS, CostModel, RunningCost
from ..core.criteria import Criterion
from ..core.dependency import Analysis, Group
from ..core.errors import OnnxPruneError, OptionError
from ..core.plan import GroupDecision, Plan, candidate_groups, channel_step, group_key
from .ratio import keep_count


def allocate(analysis: Analysis, groups: list[Group], scores: dict[int, np.ndarray], cost_model: CostModel,
             metric: str, target: float, round_to: int = 1, *, min_keep: float = 0.0,
             fixed: dict | None = None) -> dict[int, int]:
    """{group.id: channels to remove} so that `metric` drops to `target` of its value.

    Channels go cheapest damage first: a channel's damage is its score relative to its
    group's mean (as --global ranks them), divided by what removing it saves right now, so
    channels that cost little to keep stay longer. Every group keeps at least one channel
    (and `min_keep` of its width), kept counts are multiples of `round_to` or the full width,
    and the cost ends at or below target * before, as close to it as the steps allow.
    `fixed` ({group id: channels to remove}) are cut as given first; the others share the rest.
    """
    _same_analysis(analysis, cost_model)
    ranked = {g.id: _ranked_scores(scores[g.id]) for g in groups}

    def damage(group: Group, keep_from: int, keep_to: int) -> float:
        cumulative = ranked[group.id]
        return float(cumulative[group.channels - keep_to] - cumulative[group.channels - keep_from])

    return _allocate(groups, damage, cost_model, metric, target, round_to, min_keep, fixed)


def allocate_by_sensitivity(groups: list[Group], curves: dict[int, list[tuple[float, float]]],
                            cost_model: CostModel, metric: str, target: float, round_to: int = 1, *,
                            min_keep: float = 0.0, fixed: dict | None = None) -> dict[int, int]:
    """Like allocate(), with damage read from measured curves instead of channel scores.

    curves[group.id] lists (ratio, damage): how much the output changed when that group
    alone lost that fraction of its channels. Damage is interpolated linearly between the
    measured ratios (0 at ratio 0), extended past the last with the last slope. Groups
    without a curve keep all their channels.
    """
    curve_of = {gid: _DamageCurve(gid, points) for gid, points in curves.items()}
    measured = [g for g in groups if g.id in curve_of or g.id in (fixed or {})]

    def damage(group: Group, keep_from: int, keep_to: int) -> float:
        curve = curve_of[group.id]
        return curve(1 - keep_to / group.channels) - curve(1 - keep_from / group.channels)

    removed = _allocate(measured, damage, cost_model, metric, target, round_to, min_keep, fixed)
    return {g.id: removed.get(g.id, 0) for g in groups}


def allocate_uniform(groups: list[Group], cost_model: CostModel, metric: str, target: float, round_to: int = 1,
                     *, min_keep: float = 0.0, fixed: dict | None = None) -> dict[int, int]:
    """{group.id: channels to remove}: the same ratio in every group, the largest that meets
    the target (found by bisection; kept counts follow round_to and min_keep)."""
    _check_request(metric, target, round_to, min_keep)
    before = cost_model.before[metric]
    if before <= 0:
        raise OptionError(f"target_{metric}", target, f"the model has no {metric} to reduce")
    goal = target * before
    fixed = fixed or {}
    base, groups = _split_fixed(groups, fixed)
    widths = {g.id: _Widths.of(g, round_to, min_keep) for g in groups}

    def removed_at(ratio: float) -> dict[int, int]:
        out = dict(fixed)
        for g in groups:
            keep = max(g.channels - math.floor(ratio * g.channels), widths[g.id].floor)
            step = widths[g.id].step
            if step > 1:
                keep = min(g.channels, math.ceil(keep / step) * step)
            out[g.id] = g.channels - keep
        return out

    def cost_at(ratio: float) -> float:
        removed = removed_at(ratio)
        return cost_model.cost_of_counts({**base, **{g.atom: g.channels - removed[g.id] for g in groups}})[metric]

    if cost_at(1.0) > goal:
        raise OptionError(f"target_{metric}", target, "unreachable, with every prunable group at its "
                             f"minimum width the model keeps {cost_at(1.0) / before:.3f} of its {metric}")
    low, high = 0.0, 1.0  # cost_at(high) always meets the goal
    for _ in range(30):
        mid = (low + high) / 2
        if cost_at(mid) <= goal:
            high = mid
        else:
            low = mid
    return removed_at(high)


def make_target_plan(analysis: Analysis, crit: Criterion, metric: str, target: float,
                     static_model: onnx.ModelProto, round_to: int = 1, exclude=(), curves=None, *,
                     min_keep: float = 0.0, global_rank: bool = True, head_dim: bool = False,
                     fixed_ratios: dict | None = None) -> Plan:
    """A plan that brings `metric` ("macs" or "params") to `target` of the original.

    `static_model` is static_copy(model, concrete_shapes) of the analysed model. Within each
    group the lowest-scored channels go; how many comes from allocate_by_sensitivity() when
    `curves` are given, else from allocate() (global ranking) or, with global_rank=False, from
    allocate_uniform(). A data-driven criterion must be prepared first. plan.notes records
    the ratio reached. The dims inside attention heads are allocated only with `head_dim`.
    `fixed_ratios` ({group kind: ratio}, e.g. {"heads": 0.1}) cuts the groups of those kinds by
    their ratio first (as make_plan would); the others are allocated to reach the target.
    """
    if round_to < 1:
        raise OptionError("round_to", round_to, "must be a positive integer")
    every, skipped = candidate_groups(analysis, exclude)
    fixed_ratios = fixed_ratios or {}
    # the dims inside heads are allocated only with head_dim, the model width only cut as given
    groups = [g for g in every
              if (head_dim or g.kind != "head_dim") and (g.kind != "hidden" or "hidden" in fixed_ratios)]
    scores = {g.id: np.asarray(crit.scores(analysis, g), dtype=np.float64) for g in every}
    steps = {g.id: channel_step(analysis, g, round_to) for g in groups}
    cost_model = CostModel(analysis, static_model)
    fixed = {g.id: g.channels - keep_count(g.channels, math.floor(fixed_ratios[g.kind] * g.channels), steps[g.id])
             for g in groups if fixed_ratios.get(g.kind) is not None}  # as make_plan cuts them
    if curves is None and not global_rank:
        counts = allocate_uniform(groups, cost_model, metric, target, steps, min_keep=min_keep, fixed=fixed)
    elif curves is None:
        counts = allocate(analysis, groups, scores, cost_model, metric, target, steps, min_keep=min_keep, fixed=fixed)
    else:
        counts = allocate_by_sensitivity(groups, curves, cost_model, metric, target, steps, min_keep=min_keep,
                                         fixed=fixed)
    plan = Plan(skipped=skipped, criterion=crit.name)
    for g in every:  # groups left out of the allocation keep all their channels
        order = np.argsort(scores[g.id], kind="stable")
        removed = np.sort(order[:counts.get(g.id, 0)])
        plan.decisions.append(GroupDecision(group_key(analysis, g), g, removed, scores[g.id]))
    kept = plan.kept_by_atom(analysis.atoms)
    reached = cost_model.cost(kept)[metric] / cost_model.before[metric]
    plan.notes.extend(crit.notes)
    plan.notes.append(f"target {metric} {target:.2f}: reached {reached:.3f} of the original")
    return plan


@dataclass(frozen=True)
class _Widths:
    """The widths a group may take: its full width, or multiples of `step` down to `floor`."""

    channels: int
    step: int
    floor: int

    @classmethod
    def of(cls, group: Group, round_to, min_keep: float) -> "_Widths":
        """`round_to`: an int for every group, or {group id: step} (core.plan.channel_step)."""
        step = round_to.get(group.id, 1) if isinstance(round_to, dict) else round_to
        channels = group.channels
        least = max(1, math.ceil(min_keep * channels))
        return cls(channels, step, min(channels, math.ceil(least / step) * step))

    def down(self, keep: int) -> int | None:
        narrower = (keep - 1) // self.step * self.step
        return narrower if narrower >= max(self.floor, 1) else None

    def up(self, keep: int) -> int | None:
        return None if keep >= self.channels else min(self.channels, (keep // self.step + 1) * self.step)


def _allocate(groups, damage, cost_model: CostModel, metric: str, target: float, round_to: int,
              min_keep: float, fixed: dict | None = None) -> dict[int, int]:
    """Shrink groups greedily until the cost meets the goal, give back what still fits, and
    trade steps between groups where that lands closer to the goal. Groups in `fixed`
    ({group id: channels to remove}) are cut as given before the others start."""
    _check_request(metric, target, round_to, min_keep)
    fixed = fixed or {}
    base, groups = _split_fixed(groups, fixed)
    running = cost_model.running(metric)
    before = running.total
    if before <= 0:
        raise OptionError(f"target_{metric}", target, f"the model has no {metric} to reduce")
    goal = target * before
    for atom, count in base.items():
        running.commit(atom, count)
    widths = {g.id: _Widths.of(g, round_to, min_keep) for g in groups}
    least = cost_model.cost_of_counts({**base, **{g.atom: widths[g.id].floor for g in groups}})[metric]
    if least > goal:
        raise OptionError(f"target_{metric}", target, "unreachable, with every prunable group at its "
                             f"minimum width the model keeps {least / before:.3f} of its {metric}")
    keep = {g.id: g.channels for g in groups}
    _shrink(groups, keep, widths, damage, running, goal)
    if running.total > goal:
        raise OptionError(f"target_{metric}", target, "unreachable, pruning stops at "
                             f"{running.total / before:.3f} of the original {metric}")
    _give_back(groups, keep, widths, damage, running, goal)
    _trade(groups, keep, widths, damage, running, goal)
    return {**fixed, **{g.id: g.channels - keep[g.id] for g in groups}}


def _split_fixed(groups, fixed: dict[int, int]) -> tuple[dict[int, int], list]:
    """({atom: kept count} of the groups cut as given, the groups left to allocate)."""
    base = {g.atom: g.channels - fixed[g.id] for g in groups if g.id in fixed}
    return base, [g for g in groups if g.id not in fixed]


def _priority(damage: float, saving: float) -> tuple[int, float]:
    """Damage per unit of cost saved; steps that save nothing come after all others."""
    return (0, damage / saving) if saving > 0 else (1, damage)


def _shrink(groups, keep, widths, damage, running: RunningCost, goal: float) -> None:
    """Take the cheapest step (damage per saving) until the goal is met.

    Savings shrink as neighbouring groups narrow, so a queued priority can be stale: it is
    recomputed when it comes up and requeued if it no longer beats the next one (lazy greedy).
    """
    queue: list = []
    tiebreak = itertools.count()

    def step_of(g: Group):
        narrower = widths[g.id].down(keep[g.id])
        if narrower is None:
            return None
        saving = -running.change(g.atom, narrower)
        return _priority(damage(g, keep[g.id], narrower), saving), narrower

    def offer(g: Group) -> None:
        step = step_of(g)
        if step is not None:
            heapq.heappush(queue, (step[0], next(tiebreak), g))

    for g in groups:
        offer(g)
    while running.total > goal and queue:
        _, _, g = heapq.heappop(queue)
        priority, narrower = step_of(g)
        if queue and priority > queue[0][0]:
            heapq.heappush(queue, (priority, next(tiebreak), g))
            continue
        running.commit(g.atom, narrower)
        keep[g.id] = narrower
        offer(g)


def _give_back(groups, keep, widths, damage, running: RunningCost, goal: float) -> None:
    """Widen groups again while the cost stays within the goal: the last step may have overshot.

    Each round restores the step whose damage per unit of cost is highest among those that
    fit; steps that did no damage are left out, restoring them would only add cost.
    """
    while True:
        best = None
        for g in groups:
            wider = widths[g.id].up(keep[g.id])
            if wider is None:
                continue
            extra = running.change(g.atom, wider)
            if running.total + extra > goal:
                continue
            undone = damage(g, wider, keep[g.id])
            if undone <= 0:
                continue  # channels that do no harm stay removed
            worth = undone / extra if extra > 0 else math.inf
            if best is None or worth > best[0]:
                best = (worth, g, wider)
        if best is None:
            return
        _, g, wider = best
        running.commit(g.atom, wider)
        keep[g.id] = wider


def _trade(groups, keep, widths, damage, running: RunningCost, goal: float, rounds: int = 32) -> None:
    """Where steps are coarse (small models, --round-to), widen one group and narrow another
    when the pair ends closer below the goal; among equally close pairs the one that adds
    the least damage. Skipped once the cost is within 0.5% of the goal."""
    for _ in range(rounds):
        if goal - running.total <= 0.005 * goal:
            return
        best = None
        for a in groups:
            wider, narrow_a = widths[a.id].up(keep[a.id]), keep[a.id]
            if wider is None or damage(a, wider, narrow_a) <= 0:
                continue
            running.commit(a.atom, wider)
            for b in groups:
                narrower = widths[b.id].down(keep[b.id]) if b is not a else None
                if narrower is None:
                    continue
                total = running.total + running.change(b.atom, narrower)
                added = damage(b, keep[b.id], narrower) - damage(a, wider, narrow_a)
                if total <= goal and (best is None or (-total, added) < best[0]):
                    best = ((-total, added), a, wider, b, narrower)
            running.commit(a.atom, narrow_a)
        if best is None or -best[0][0] <= running.total:
            return
        _, a, wider, b, narrower = best
        running.commit(a.atom, wider)
        running.commit(b.atom, narrower)
        keep[a.id], keep[b.id] = wider, narrower


class _DamageCurve:
    """Measured damage of one group against its pruning ratio, as a piecewise-linear function."""

    def __init__(self, gid: int, points) -> None:
        pts = sorted((float(r), float(d)) for r, d in points)
        if any(not 0.0 <= r <= 1.0 for r, _ in pts):
            raise OnnxPruneError(f"sensitivity curve of group {gid}: ratios must lie in [0, 1]")
        if not pts or pts[0][0] > 0:
            pts.insert(0, (0.0, 0.0))  # an unpruned group changes nothing
        self.ratios = np.array([r for r, _ in pts])
        self.values = np.array([d for _, d in pts])
        (r0, d0), (r1, d1) = pts[-2:] if len(pts) > 1 else (pts[0], pts[0])
        self.slope = max((d1 - d0) / (r1 - r0), 0.0) if r1 > r0 else 0.0

    def __call__(self, ratio: float) -> float:
        if ratio <= self.ratios[-1]:
            return float(np.interp(ratio, self.ratios, self.values))
        return float(self.values[-1] + self.slope * (ratio - self.ratios[-1]))


def _ranked_scores(scores: np.ndarray) -> np.ndarray:
    """Cumulative sums of a group's scores relative to their mean, lowest first (index = removed)."""
    mean = float(scores.mean()) if scores.size else 0.0
    relative = scores / mean if mean > 0 else np.zeros_like(scores)
    return np.concatenate([[0.0], np.cumsum(np.sort(relative))])


def _check_request(metric: str, target: float, round_to: int, min_keep: float) -> None:
    if metric not in METRICS:
        raise OnnxPruneError(f"target metric {metric!r}: choose one of {', '.join(METRICS)}")
    if not 0.0 < target <= 1.0:
        raise OptionError(f"target_{metric}", target, "must be in (0, 1]")
    if (min(round_to.values(), default=1) if isinstance(round_to, dict) else round_to) < 1:
        raise OptionError("round_to", round_to, "must be a positive integer")
    if not 0.0 <= min_keep < 1.0:
        raise OnnxPruneError(f"minimum kept fraction {min_keep}: must be in [0, 1)")


def _same_analysis(analysis: Analysis, cost_model: CostModel) -> None:
    if cost_model.analysis is not analysis:
        raise ValueError("the cost model was built from another analysis")
