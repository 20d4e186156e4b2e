"""Checking a pruned model: onnx checker, onnxruntime load and run, numeric comparison."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .modelio import EXTERNAL_DATA_THRESHOLD, payload_bytes, write_with_external_data
from . import metrics
from .errors import first_line
from .runtime import has_runtime, require_runtime


@dataclass
class Verification:
    checker: str = "not run"
    ort: str = "not run"
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    outputs_compared: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checker == "passed" and self.ort in ("passed", "not run")

    def to_json(self) -> dict:
        return {"checker": self.checker, "onnxruntime": self.ort, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "outputs_compared": self.outputs_compared}


def check(model: onnx.ModelProto) -> str:
    if payload_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        return "skipped (model above 2 GB; checked after saving)"
    try:
        onnx.checker.check_model(model)
        return "passed"
    except Exception as exc:  # checker raises several exception types
        return f"failed: {first_line(exc)}"


def session(model: onnx.ModelProto, threads: int = 0):
    ort = require_runtime("running the model")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 4  # failures are reported by onnxprune, not logged by onnxruntime
    if payload_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    # Above 2 GB protobuf cannot serialise the model: hand it over as a file with external data.
    with tempfile.TemporaryDirectory(prefix="onnxprune-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_with_external_data(model, path, "model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(original_outputs, pruned_outputs, names) -> tuple[float, float, list[str]]:
    worst_abs, worst_rel, compared = 0.0, 0.0, []
    for name, a, b in zip(names, original_outputs, pruned_outputs):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:  # graph outputs keep their shapes: anything else is a defect
            worst_abs = worst_rel = float("inf")
            compared.append(name)
            continue
        if not np.issubdtype(a.dtype, np.number):
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite_a, finite_b = np.isfinite(a64), np.isfinite(b64)
        if not np.array_equal(finite_a, finite_b):
            worst_abs = worst_rel = float("inf")  # NaN/inf where the other has numbers
            compared.append(name)
            continue
        a64, b64 = a64[finite_a], b64[finite_a]
        diff = float(np.max(np.abs(a64 - b64))) if a64.size else 0.0
        scale = float(np.max(np.abs(a64))) if a64.size else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else diff)
        compared.append(name)
    return worst_abs, worst_rel, compared


class Checker:
    """Checks candidate models against the original: checker, then an onnxruntime run.

    `seed=None` means no onnxruntime run (the checker still runs). The original's
    session, inputs and outputs are made once and reused for every candidate.
    """

    def __init__(self, working: onnx.ModelProto, shapes: dict, seed: int | None) -> None:
        self.notes: list[str] = []
        self.session = self.feeds = self.outputs = None
        self.last_session = self.last_outputs = None
        self._last_model = None
        if seed is None:
            return
        if not has_runtime():
            self.notes.append("no onnxruntime installed: checked with the onnx checker only")
            return
        try:
            self.session = session(working)
            self.feeds = metrics.random_inputs(working, shapes, seed)
            self.outputs = self.session.run(None, self.feeds)
        except Exception as exc:  # custom ops, unsupported opsets: nothing to compare against
            self.session = self.feeds = self.outputs = None
            self.notes.append(f"onnxruntime cannot run the input model ({first_line(exc)}): "
                              "checked with the onnx checker only")

    def failure(self, model: onnx.ModelProto) -> str | None:
        """Why `model` is not acceptable, or None."""
        result = check(model)
        if not result.startswith(("passed", "skipped")):
            return f"onnx checker {result}"
        if self.session is None:
            return None
        try:
            sess = session(model)
            outputs = sess.run(None, self.feeds)
        except Exception as exc:
            return f"onnxruntime {first_line(exc)[:300]}"
        for meta, before, after in zip(sess.get_outputs(), self.outputs, outputs):
            if np.shape(before) != np.shape(after):
                return f"output {meta.name!r} changed shape {np.shape(before)} -> {np.shape(after)}"
        self._last_model, self.last_session, self.last_outputs = model, sess, outputs
        return None

    def verification(self, model: onnx.ModelProto) -> Verification:
        result = Verification(checker=check(model))
        if self.session is None:
            return result
        failure = None if self._last_model is model else self.failure(model)
        if failure is not None:
            result.ort = f"failed: {failure}"
            return result
        result.ort = "passed"
        names = [o.name for o in self.last_session.get_outputs()]
        result.max_abs_diff, result.max_rel_diff, result.outputs_compared = compare(
            self.outputs, self.last_outputs, names)
        return result
