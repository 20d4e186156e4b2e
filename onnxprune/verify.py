"""Checking a pruned model: onnx checker, onnxruntime load and run, numeric comparison."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .modelio import EXTERNAL_DATA_THRESHOLD, payload_bytes
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
        return f"failed: {str(exc).splitlines()[0]}"


def session(model: onnx.ModelProto, threads: int = 0):
    ort = require_runtime("running the model")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def compare(original_outputs, pruned_outputs, names) -> tuple[float, float, list[str]]:
    worst_abs, worst_rel, compared = 0.0, 0.0, []
    for name, a, b in zip(names, original_outputs, pruned_outputs):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or not np.issubdtype(a.dtype, np.number):
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


def verify(original_session, pruned: onnx.ModelProto, feeds, original_outputs) -> tuple[Verification, object]:
    result = Verification(checker=check(pruned))
    if not has_runtime():
        return result, None
    try:
        sess = session(pruned)
        outputs = sess.run(None, feeds)
    except Exception as exc:
        result.ort = f"failed: {str(exc).splitlines()[0][:300]}"
        return result, None
    result.ort = "passed"
    names = [o.name for o in sess.get_outputs()]
    result.max_abs_diff, result.max_rel_diff, result.outputs_compared = compare(original_outputs, outputs, names)
    return result, sess
