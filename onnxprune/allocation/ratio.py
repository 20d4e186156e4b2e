"""Ratio plans: the same fraction of every group, or one ranking across groups (--global).

Within each group the channels the criterion scores lowest go; round-to and exclusions apply.
"""
from __future__ import annotations

import math

import numpy as np

from ..core.criteria import Criterion
from ..core.dependency import Analysis
from ..core.errors import OptionError
from ..core.plan import GroupDecision, Plan, candidate_groups, channel_step, group_key


def keep_count(channels: int, remove: int, step: int) -> int:
    """Channels a group keeps when `remove` are asked to go: at least one; with a step, the
    multiple of `step` (or the full width) nearest to what was asked, the smaller on a tie so
    that at least the asked share goes. Rounding always up would leave a 16-channel group whole
    at --round-to 8 for any ratio under 1/2; always down would halve it for one channel asked."""
    keep = max(channels - remove, 1)
    if step <= 1 or remove == 0:
        return keep
    below = (keep // step) * step
    above = min(channels, below + step)
    if below == 0:
        return above
    return below if keep - below <= above - keep else above


def make_plan(analysis: Analysis, ratio: float, crit: Criterion, *, round_to: int = 1,
              global_rank: bool = False, exclude=(), heads: float | None = None,
              neurons: float | None = None, head_dim: float | None = None, hidden: float | None = None,
              keep_counts: dict[str, int] | None = None, round_to_source: str = "--round-to") -> Plan:
    """`ratio` applies to every group; `neurons` (Gemm/MatMul hidden units) and `heads`
    (whole attention heads), when given, override it for their kind of group; the dims inside
    attention heads go only with `head_dim`, the model width (hidden groups) only with `hidden`.
    `keep_counts` ({group key: channels to keep}) replaces all of that: each listed group keeps
    that many of its best channels, the others keep all (iterative pruning's rounds).
    `round_to_source` names, in the notes, what set round_to (the flag, or a --target preset)."""
    for option, value in (("filters", ratio), ("heads", heads), ("neurons", neurons), ("head_dim", head_dim),
                          ("hidden", hidden)):
        if value is not None and not 0.0 <= value < 1.0:
            raise OptionError(option, value, "must be in [0, 1)")
    if round_to < 1:
        raise OptionError("round_to", round_to, "must be a positive integer")
    groups, skipped = candidate_groups(analysis, exclude)
    plan = Plan(skipped=skipped, criterion=crit.name)
    scores = {g.id: np.asarray(crit.scores(analysis, g), dtype=np.float64) for g in groups}
    override = {"heads": heads, "neurons": neurons, "head_dim": head_dim or 0.0, "hidden": hidden or 0.0}

    def group_ratio(g):
        return ratio if override.get(g.kind) is None else override[g.kind]

    counts = {g.id: math.floor(group_ratio(g) * g.channels) for g in groups}
    if global_rank:  # the global ranking covers the groups that --filters governs
        counts.update(_global_counts([g for g in groups if override.get(g.kind) is None], scores, ratio))
    if keep_counts is not None:
        counts = {g.id: max(0, g.channels - keep_counts.get(group_key(analysis, g), g.channels)) for g in groups}
        round_to = 1  # the counts already are what the rounds lead to
    rounded_away, asked, removed_total, total = [], 0, 0, 0
    for g in groups:
        keep = keep_count(g.channels, counts[g.id], channel_step(analysis, g, round_to))
        if counts[g.id] and keep == g.channels:
            rounded_away.append(g)
        if group_ratio(g):  # the groups a ratio applies to: the share is of their channels
            asked, removed_total, total = asked + counts[g.id], removed_total + g.channels - keep, total + g.channels
        order = np.argsort(scores[g.id], kind="stable")
        removed = np.sort(order[: g.channels - keep])
        plan.decisions.append(GroupDecision(group_key(analysis, g), g, removed, scores[g.id]))
    plan.notes.extend(crit.notes)
    if round_to > 1 and asked:
        plan.rounding = {"round_to": round_to, "channels": total, "asked": asked, "removed": removed_total,
                         "removed_ratio": round(removed_total / total, 4), "groups_kept_whole": len(rounded_away)}
        if removed_total != asked:
            plan.notes.append(f"{rounding_label(round_to_source, round_to)}: kept widths rounded to the nearest "
                              f"multiple of {round_to} removed {removed_total} channel(s) against {asked} asked "
                              f"({removed_total / total:.1%} of the channels a ratio applies to, against "
                              f"{asked / total:.1%})")
    if rounded_away:
        g = rounded_away[0]
        plan.notes.append(f"{rounding_label(round_to_source, round_to)} kept {len(rounded_away)} group(s) whole: the "
                          f"nearest multiple of {round_to} to the kept width asked is the full width "
                          f"(e.g. {group_key(analysis, g)!r}, {g.channels} {g.kind})")
    untouched = [g for g in groups if g.kind == "head_dim"]
    if untouched and head_dim is None and keep_counts is None:
        plan.notes.append(f"{len(untouched)} group(s) of dims inside attention heads (q/k or v/o head_dim) keep "
                          "their size: --head-dim R prunes them, --heads removes whole heads")
    return plan


def rounding_label(source: str, round_to: int) -> str:
    """How notes name the channel multiple: the flag given, or the --target preset that set it."""
    return f"--round-to {round_to}" if source == "--round-to" else f"{source} (multiples of {round_to})"


def _global_counts(groups, scores, ratio):
    """Rank channels across groups by score relative to their group's mean."""
    pool = []
    for g in groups:
        s = scores[g.id]
        mean = s.mean()
        normalized = s / mean if mean > 0 else np.zeros_like(s)
        pool.extend((float(v), g.id) for v in normalized)
    budget = math.floor(ratio * len(pool))
    counts = {g.id: 0 for g in groups}
    limit = {g.id: g.channels - 1 for g in groups}
    for _, gid in sorted(pool, key=lambda p: p[0]):
        if budget == 0:
            break
        if counts[gid] < limit[gid]:
            counts[gid] += 1
            budget -= 1
    return counts
