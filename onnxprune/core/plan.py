"""Plans: which channels of which groups go, the groups that may be pruned, plans as JSON.

How many channels each group loses is decided in onnxprune.allocation."""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field

import numpy as np

from .dependency import Analysis, Group
from .errors import OnnxPruneError, OptionError, first_line
from .files import regular_file


def group_key(analysis: Analysis, group: Group) -> str:
    """A name for a group that is the same every time the same model is analysed.

    Built from the first producing layer (node, weight input, axis, offset), not from
    weight names, which exporters and the planting in tests are free to change.
    """
    members = [m for m in group.members if m.role == "weight_out"] or group.members
    att = members[0]
    node = att.node.name or att.node.outputs[0].name
    return f"{node}:in{att.input_index}@{att.axis}+{analysis.positions(att, group)[0][0]}"


@dataclass
class GroupDecision:
    key: str
    group: Group
    removed: np.ndarray
    scores: np.ndarray | None = None


@dataclass
class Plan:
    decisions: list[GroupDecision] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    criterion: str = ""
    notes: list[str] = field(default_factory=list)
    # --round-to's effect on a ratio plan: channels asked against removed (allocation/ratio.py)
    rounding: dict | None = None

    def removed_by_atom(self) -> dict[int, np.ndarray]:
        return {d.group.atom: d.removed for d in self.decisions if len(d.removed)}

    def kept_by_atom(self, atoms) -> dict[int, np.ndarray]:
        """The channels that stay, for every leaf class that loses some."""
        return {atom: np.setdiff1d(np.arange(atoms.size(atom)), removed)
                for atom, removed in self.removed_by_atom().items()}

    def to_json(self) -> dict:
        return {
            "format": "onnxprune-plan/1",
            "criterion": self.criterion,
            "heads": any(d.group.kind == "heads" for d in self.decisions),
            "hidden": any(d.group.kind == "hidden" for d in self.decisions),
            "groups": [
                {"key": d.key, "channels": d.group.channels, "removed": [int(i) for i in d.removed]}
                for d in self.decisions if len(d.removed)
            ],
        }


def _excluded(analysis: Analysis, group: Group, patterns) -> str | None:
    names = group.node_names() | {m.tensor.name for m in group.members}
    for pattern in patterns:
        for name in names:
            if fnmatch.fnmatchcase(name, pattern):
                return pattern
    return None


def candidate_groups(analysis: Analysis, exclude=()) -> tuple[list[Group], list[dict]]:
    """Groups that may be pruned, and the others with the reason why not."""
    prunable, skipped = [], []
    for group in analysis.groups:
        if group.fixed_reasons:
            skipped.append(_skip(analysis, group, group.fixed_reasons[0]))
        elif not any(m.role == "weight_out" for m in group.members):
            skipped.append(_skip(analysis, group, "no layer produces these channels"))
        elif group.channels < 2:
            skipped.append(_skip(analysis, group, "a single channel"))
        elif (pattern := _excluded(analysis, group, exclude)) is not None:
            skipped.append(_skip(analysis, group, f"excluded by --exclude {pattern!r}"))
        else:
            prunable.append(group)
    return prunable, skipped


def channel_step(analysis: Analysis, group: Group, round_to: int) -> int:
    """The step in channels that keeps every width the hardware sees a multiple of `round_to`.

    A channel is one position of a weight's output axis for filters and neurons, but a whole
    head (heads x head_dim positions) for heads: 12 heads of 64 dims are 768 wide, a multiple
    of 8 whatever the head count, so --round-to 8 constrains nothing there."""
    if round_to <= 1:
        return 1
    step = 1
    for att in group.members:
        if att.role != "weight_out":
            continue
        for _, expand, _ in analysis.positions(att, group):
            need = round_to // math.gcd(round_to, int(expand))
            step = step * need // math.gcd(step, need)
    return step


def _skip(analysis, group, reason):
    return {"key": group_key(analysis, group), "channels": group.channels, "kind": group.kind, "reason": reason,
            "nodes": sorted(group.node_names())}


def plan_from_json(analysis: Analysis, data: dict) -> Plan:
    removed, channels = plan_entries(data)
    plan = plan_from_removed(analysis, removed, channels)
    plan.criterion = data.get("criterion", "") + " (from plan)"
    return plan


def plan_entries(data) -> tuple[dict, dict]:
    """{key: removed indices} and {key: channel count} of a plan file's contents, or a one-line
    error naming the first entry that is not what --plan writes."""
    if not isinstance(data, dict) or data.get("format") != "onnxprune-plan/1":
        raise OptionError("plan", None, "not an onnxprune plan file (a JSON object with "
                             "\"format\": \"onnxprune-plan/1\", as a written plan has)")
    groups = data.get("groups", [])
    if not isinstance(groups, list):
        raise OptionError("plan", None, "\"groups\" must be a list")
    removed, channels = {}, {}
    for number, entry in enumerate(groups, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise OptionError("plan", None, f"group entry {number}: expected an object with a \"key\" string")
        where = f"group {entry['key']!r}"
        count, indices = entry.get("channels"), entry.get("removed")
        if not _is_int(count) or count < 1:
            raise OptionError("plan", None, f"{where}: \"channels\" must be a positive integer, got {count!r}")
        if not isinstance(indices, list) or not all(_is_int(i) for i in indices):
            raise OptionError("plan", None, f"{where}: \"removed\" must be a list of integer channel indices")
        if entry["key"] in removed:
            raise OptionError("plan", None, f"{where}: listed twice")
        removed[entry["key"]], channels[entry["key"]] = indices, count
    return removed, channels


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plan_from_removed(analysis: Analysis, removed: dict, channels: dict | None = None) -> Plan:
    """A plan removing the given channel indices from the groups named by key."""
    groups, skipped = candidate_groups(analysis)
    by_key = {group_key(analysis, g): g for g in groups}
    plan = Plan(skipped=skipped)
    for key, indices in removed.items():
        g = by_key.get(key)
        if g is None:
            raise OptionError("plan", None, f"group {key!r} is not prunable in this model")
        idx = np.array(sorted(set(int(i) for i in indices)), dtype=np.int64)
        expected = g.channels if channels is None else channels[key]
        if g.channels != expected or (idx.size and (idx.min() < 0 or idx.max() >= g.channels)):
            raise OptionError("plan", None, f"group {key!r} has {g.channels} channels, plan expects {expected}")
        if idx.size >= g.channels:
            raise OptionError("plan", None, f"group {key!r} would lose every channel")
        plan.decisions.append(GroupDecision(key, g, idx))
    return plan


def load_plan_file(path) -> dict:
    try:
        regular_file(path, "")
    except OnnxPruneError as exc:
        raise OptionError("plan", str(path), str(exc).split(": ", 1)[-1]) from None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, or bytes that are not text at all
        raise OptionError("plan", str(path), f"cannot read ({first_line(exc)})") from None
