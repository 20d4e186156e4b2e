"""Iterative pruning: reach the requested removal in K rounds of prune, then fine-tune.

The one-shot plan on the original model says how many channels each group loses in the end
(with every option as given: ratios, targets, --round-to, --exclude). Round k removes the
first k/K of that, per group, choosing the channels again on the model the previous round
fine-tuned (importance changes as the network adapts), then fine-tunes for 1/K of the
epochs. The result has exactly the one-shot plan's channel counts. Whole-block removal
(--layers) is not iterated.

With `rewind` (the lottery ticket, as Frankle & Carbin's rewinding): each round still chooses
the channels on the model the previous round fine-tuned, but the network it fine-tunes is the
original one cut to all channels chosen so far, its surviving weights rewound to the
original's, not the fine-tuned survivors.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from onnxprune.core.errors import OptionError
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import Flag, integer, setting, switch


@dataclass
class IterativeSettings:
    iterative: int = setting(1, check=integer(1, 100), cli=Flag(
        "--iterative", "Reach the ratio in K rounds of prune + fine-tune (--epochs split between them).",
        metavar="K", parse=int, show_default=True))
    rewind: bool = setting(False, check=switch, cli=Flag(
        "--rewind", "With --iterative: each round rewinds the surviving weights to the original's before "
        "fine-tuning (lottery ticket).", is_flag=True))


class IterativePruning(Pass):
    """`plan(model)` returns {group key: (channels, channels removed)} of the one-shot plan;
    `round_(model, keep_counts, fraction)` prunes `model` to those counts and fine-tunes for
    `fraction` of the training, returning a result with `.model` and `.report`."""

    name = "iterative"

    def __init__(self, settings: IterativeSettings, plan: Callable, round_: Callable) -> None:
        self.rounds = settings.iterative
        self.rewind = settings.rewind
        self.plan, self.round = plan, round_
        self.last = None  # the last round's result

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        started = time.perf_counter()
        final = self.plan(model)
        if not any(removed for _, removed in final.values()):
            raise OptionError("iterative", self.rounds, "the plan removes nothing to spread over rounds")
        current, rounds, first = model, [], None
        for k in range(1, self.rounds + 1):
            keep = {key: channels - math.ceil(removed * k / self.rounds) for key, (channels, removed) in final.items()}
            result = self.round(current, keep, 1.0 / self.rounds)
            first = first or result.report
            tuned = result.report.get("finetune") or {}
            removed = sum(channels - kept for (channels, _), kept in zip(final.values(), keep.values()))
            rounds.append({"round": k, "channels_removed": removed, "params": result.report["params"]["after"],
                           "after": tuned.get("after"),
                           "before": tuned.get("before"), "steps": tuned.get("steps")})
            current = result.model
            self.last = result
        report = dict(self.last.report)
        for key in ("params", "macs", "file_bytes", "latency_ms"):  # before: the original, as round 1 measured it
            if key in report and key in first:
                report[key] = {**report[key], "before": first[key]["before"]}
        report["iterative"] = {"rounds": rounds, "rewind": self.rewind,
                               "seconds": round(time.perf_counter() - started, 2)}
        report["notes"] = list(report.get("notes", [])) + [
            f"iterative: {self.rounds} rounds of prune + fine-tune to the one-shot plan's channel counts"]
        return PassResult(current, report)
