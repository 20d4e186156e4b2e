"""Reach a latency target: the largest MAC budget whose measured onnxruntime latency keeps at
most the asked fraction of the original's.

Latency is not a sum over groups (kernels, memory, threads), so it is measured: a bisection
over the MAC target, each step a whole pruning pipeline timed against the original on the
same inputs. The search starts at the target itself (latency roughly follows MACs). Steps
below what --min-keep allows aim higher.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from onnxprune.core.errors import OnnxPruneError, OptionError
from onnxprune.pipeline import Context, Pass, PassResult
from onnxprune.settings import Flag, open_fraction, setting

STEPS = 6  # bisection steps over the MAC budget: each is a full prune plus a timing


@dataclass
class LatencySettings:
    target_latency: float | None = setting(None, check=open_fraction, cli=Flag(
        "--target-latency", "Keep this fraction of the onnxruntime latency (searched over --target-macs, each step "
        "measured).", metavar="R", parse=float))


class TargetLatency(Pass):
    """`step(model, macs)` prunes `model` to keep `macs` of its MACs and returns the result
    (with `.report` holding `latency_ms`); the builder makes it from the same options."""

    name = "target_latency"

    def __init__(self, settings: LatencySettings, step: Callable[[onnx.ModelProto, float], object]) -> None:
        self.target = settings.target_latency
        self.step = step
        self.best = None  # the result of the step kept

    def run(self, model: onnx.ModelProto, context: Context) -> PassResult:
        target, started = self.target, time.perf_counter()
        steps, best = [], None
        low, high, macs = 0.0, 1.0, target
        for _ in range(STEPS):
            try:
                result = self.step(model, macs)
            except OptionError:  # below what --min-keep allows: aim higher
                low = macs
                macs = (low + high) / 2
                continue
            latency = result.report.get("latency_ms")
            if latency is None:
                raise OnnxPruneError(f"target_latency: the pruned model did not run in onnxruntime "
                                     f"({result.report.get('verification', {}).get('onnxruntime')})")
            reached = latency["after"] / latency["before"]
            steps.append({"target_macs": round(macs, 4), "latency_ratio": round(reached, 4)})
            if reached <= target:
                if best is None or macs > best[0]:
                    best = (macs, result, reached)
                low = macs
            else:
                high = macs
            macs = (low + high) / 2
        if best is None:
            tried = ", ".join(f"{s['target_macs']:.2f} MACs -> {s['latency_ratio']:.2f}" for s in steps) or "nothing ran"
            raise OptionError("target_latency", target, f"not reached ({tried})")
        _, self.best, reached = best
        report = dict(self.best.report)
        report["target_latency"] = {"target": target, "reached": round(reached, 4), "steps": steps}
        report["notes"] = list(report.get("notes", [])) + [
            f"target latency {target:.2f}: reached {reached:.3f} of the original (measured; {len(steps)} tries)"]
        report["seconds"] = dict(report.get("seconds", {}), total=round(time.perf_counter() - started, 3))
        return PassResult(self.best.model, report)
