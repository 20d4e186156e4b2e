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

With a checkpoint folder, round k fine-tunes with its checkpoint in `round-k/`, and each
finished round leaves its model (`round-k/model.onnx`) and the state of the rounds
(`iterative.json`: the plan's counts, the rounds' reports, the channels chosen so far); the
last round's model is the output. An
interrupted run resumed with `resume` starts after the last finished round, and continues
that round's fine-tuning where it stopped if it had started.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxprune.core.errors import OnnxPruneError, OptionError
from onnxprune.core.files import write_text
from onnxprune.core.modelio import load_model, save_model
from onnxprune.core.progress import log
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
    `round_(model, keep_counts, fraction, checkpoint, resume)` prunes `model` to those counts and
    fine-tunes for `fraction` of the training (with its checkpoint in the folder given),
    returning a result with `.model` and `.report`; `state` is a (save, load) pair of functions
    for what the rounds carry from one to the next, as JSON."""

    name = "iterative"
    STATE = "iterative.json"

    def __init__(self, settings: IterativeSettings, plan: Callable, round_: Callable,
                 state: tuple[Callable, Callable] | None = None, checkpoint=None, resume: bool = False) -> None:
        self.rounds = settings.iterative
        self.rewind = settings.rewind
        self.plan, self.round = plan, round_
        self.save_state, self.load_state = state or (dict, lambda saved: None)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.resume = resume
        self.last = None  # the last round's result

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        started = time.perf_counter()
        final = self.plan(model)
        if not any(removed for _, removed in final.values()):
            raise OptionError("iterative", self.rounds, "the plan removes nothing to spread over rounds")
        current, rounds, before, done = model, [], None, 0
        if self.resume:
            current, rounds, before, done = self._resumed(final, current)
        for k in range(done + 1, self.rounds + 1):
            keep = {key: channels - math.ceil(removed * k / self.rounds) for key, (channels, removed) in final.items()}
            folder = None if self.checkpoint is None else self.checkpoint / f"round-{k}"
            resume = folder is not None and (folder / "state" / "latest").is_file()
            if resume:
                log.info("iterative: resuming round %d's fine-tuning from %s", k, folder)
            result = self.round(current, keep, 1.0 / self.rounds, folder, resume)
            if before is None:  # before: the original, as round 1 measured it
                before = {key: result.report[key]["before"] for key in ("params", "macs", "file_bytes", "latency_ms")
                          if key in result.report}
            tuned = result.report.get("finetune") or {}
            removed = sum(channels - kept for (channels, _), kept in zip(final.values(), keep.values()))
            rounds.append({"round": k, "channels_removed": removed, "params": result.report["params"]["after"],
                           "after": tuned.get("after"),
                           "before": tuned.get("before"), "steps": tuned.get("steps")})
            current, self.last = result.model, result
            if folder is not None and k < self.rounds:  # the last round's model is the output
                self._save(k, folder, current, final, rounds, before)
        report = dict(self.last.report)
        for key, value in before.items():
            if key in report:
                report[key] = {**report[key], "before": value}
        report["iterative"] = {"rounds": rounds, "rewind": self.rewind,
                               "seconds": round(time.perf_counter() - started, 2)}
        report["notes"] = list(report.get("notes", [])) + [
            f"iterative: {self.rounds} rounds of prune + fine-tune to the one-shot plan's channel counts"]
        return PassResult(current, report)

    # -- checkpoint ---------------------------------------------------------------------------------
    def _save(self, k: int, folder: Path, model: onnx.ModelProto, final: dict, rounds: list, before: dict) -> None:
        save_model(model, folder / "model.onnx")
        saved = {"rounds_total": self.rounds, "rewind": self.rewind, "done": k,
                 "final": {key: list(value) for key, value in final.items()}, "rounds": rounds, "before": before,
                 "state": self.save_state()}
        write_text(self.checkpoint / self.STATE, json.dumps(saved, default=_plain), "checkpoint")

    def _resumed(self, final: dict, model: onnx.ModelProto):
        """(model, rounds, before, rounds done) where the checkpoint left off."""
        if self.checkpoint is None:
            raise OptionError("resume", True, "needs {checkpoint} (the folder to resume from)")
        path = self.checkpoint / self.STATE
        if not path.is_file():
            if (self.checkpoint / "round-1" / "state" / "latest").is_file():
                return model, [], None, 0  # round 1 was interrupted: it resumes itself
            raise OnnxPruneError(f"resume: {self.checkpoint} holds no iterative pruning to resume from")
        saved = json.loads(path.read_text())
        made = {"rounds": saved.get("rounds_total"), "rewind": saved.get("rewind"),
                "plan": {key: list(value) for key, value in saved.get("final", {}).items()}}
        wanted = {"rounds": self.rounds, "rewind": self.rewind,
                  "plan": {key: [int(v) for v in value] for key, value in final.items()}}
        if made != wanted:
            differ = next(name for name in wanted if made[name] != wanted[name])
            raise OnnxPruneError(f"resume: {self.checkpoint} was made by another iterative run (its {differ} "
                                 "differs); start afresh in another folder")
        done = int(saved["done"])
        self.load_state(saved["state"])
        log.info("iterative: %d of %d rounds done in %s", done, self.rounds, self.checkpoint)
        current = load_model(self.checkpoint / f"round-{done}" / "model.onnx")
        return current, saved["rounds"], saved["before"], done


def _plain(value):
    """JSON for numpy values in reports and state."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")
