"""Checking a pruned model: onnx checker, onnxruntime load and run, numeric comparison."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from . import metrics
from .disk_weights import disk_bytes, has_disk_weights, values_of
from .errors import OnnxPruneError, first_line
from .files import mib
from .modelio import (
    EXTERNAL_DATA_THRESHOLD,
    copy_without_initializers,
    external_stub,
    payload_bytes,
    write_with_external_data,
)
from .runtime import has_runtime, require_runtime


@dataclass
class Verification:
    checker: str = "not run"
    ort: str = "not run"
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    max_abs_output: float | None = None  # what max_rel_diff is relative to: the largest |original output|
    outputs_compared: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checker.startswith(("passed", "skipped")) and not self.ort.startswith("failed")

    def to_json(self) -> dict:
        return {"checker": self.checker, "onnxruntime": self.ort, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "max_abs_output": self.max_abs_output,
                "outputs_compared": self.outputs_compared}


def check(model: onnx.ModelProto, serialized: bytes | None = None) -> str:
    """The onnx checker's verdict; `serialized` is the model's bytes when already at hand."""
    if has_disk_weights(model):
        return _check_structure(model)
    if serialized is None and payload_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        return "skipped (model above 2 GB; checked after saving)"
    try:
        onnx.checker.check_model(model if serialized is None else serialized)
        return "passed"
    except Exception as exc:  # checker raises several exception types
        return f"failed: {first_line(exc)}"


def _check_structure(model: onnx.ModelProto) -> str:
    """The checker on a model whose weights stay on disk: its structure is saved with every
    weight pointing into one empty file (the checker reads no tensor data, only that its file
    is there), so nothing is read or written but the graph."""
    light = copy_without_initializers(model)
    for tensor in model.graph.initializer:
        weight = values_of(tensor)
        light.graph.initializer.append(tensor if weight is None else external_stub(tensor, "weights", 0, weight.nbytes))
    with tempfile.TemporaryDirectory(prefix="onnxprune-check-") as tmp:
        (Path(tmp) / "weights").touch()
        path = Path(tmp) / "model.onnx"
        path.write_bytes(light.SerializeToString())
        try:
            onnx.checker.check_model(str(path))
            return "passed (structure; weights on disk)"
        except Exception as exc:  # checker raises several exception types
            return f"failed: {first_line(exc)}"


def serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None above 2 GB (where protobuf cannot serialise it)."""
    return model.SerializeToString() if payload_bytes(model) <= EXTERNAL_DATA_THRESHOLD else None


def session(model: onnx.ModelProto, threads: int = 0, data: bytes | None = None):
    ort = require_runtime("running the model")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 4  # failures are reported by onnxprune, not logged by onnxruntime
    if data is not None or payload_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        data = model.SerializeToString() if data is None else data
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    # Above 2 GB protobuf cannot serialise the model: hand it over as a file with external data.
    with tempfile.TemporaryDirectory(prefix="onnxprune-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_with_external_data(model, path, "model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(original_outputs, pruned_outputs, names) -> tuple[float, float, float, list[str]]:
    """Largest |difference| over all outputs, the largest difference relative to its output's
    largest |value|, the largest |value| of the original outputs, and the outputs compared.
    NaN/inf must sit at the same places in both; elsewhere the difference is infinite."""
    worst_abs, worst_rel, largest, compared = 0.0, 0.0, 0.0, []
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
        largest = max(largest, scale)
        compared.append(name)
    return worst_abs, worst_rel, largest, compared


class Checker:
    """Checks candidate models against the original: checker, then an onnxruntime run.

    `seed=None` means no onnxruntime run (the checker still runs). The original's
    session, inputs and outputs are made once and reused for every candidate. An input
    that fails the checker, or whose outputs are NaN/inf throughout, is refused here: a
    pruned model could never be told good against it.
    """

    def __init__(self, working: onnx.ModelProto, shapes: dict, seed: int | None, guessed: bool = False,
                 alternate: dict | None = None, interface: dict | None = None, feeds: dict | None = None) -> None:
        """`alternate` (other dims for the inputs whose dims were guessed) with `interface` (the
        user's declared inputs and outputs): candidates are also run at those dims, with their
        interface given back first, so a model that must take any batch or length still does.
        `feeds` (real inputs, e.g. a calibration batch) replace the random ones at `shapes`."""
        self.notes: list[str] = []
        self.session = self.feeds = self.outputs = None
        self.alternate = self.alt_feeds = self.alt_outputs = None
        self.interface = interface
        self.last_session = self.last_outputs = None
        self._last_model = None
        self._verdict: tuple = (None, "not run")  # (model, checker verdict) of the last model checked
        self._reference = working
        if seed is None:
            return
        if has_disk_weights(working):
            self.notes.append(f"onnxruntime not run: the {mib(disk_bytes(working))} of weights stay on disk "
                              "(--weights memory runs it where memory allows)")
            return
        if not has_runtime():
            self.notes.append("no onnxruntime installed: checked with the onnx checker only")
            return
        try:
            self.session = session(working)
            self.feeds, self.outputs = None, None
            if feeds is not None:
                try:
                    self.outputs = self.session.run(None, feeds)
                    self.feeds = feeds
                except Exception:  # the real inputs do not fit the analysed dims: random ones at them
                    self.outputs = None
            if self.feeds is None:
                self.feeds = metrics.random_inputs(working, shapes, seed)
                self.outputs = self.session.run(None, self.feeds)
        except Exception as exc:  # custom ops, unsupported opsets: nothing to compare against
            if _invalid_model(exc, self.session is not None, guessed, self.feeds):
                raise OnnxPruneError(f"the input model does not run in onnxruntime ({first_line(exc)[:300]}); "
                                     "--no-verify prunes it unchecked") from None
            self.session = self.feeds = self.outputs = None
            hint = " (some input dims were guessed: --input-shape gives the real ones)" if guessed else ""
            self.notes.append(f"onnxruntime cannot run the input model ({first_line(exc)}){hint}: "
                              "checked with the onnx checker only")
            return
        self._check_original_outputs(working)
        if alternate and interface and alternate != shapes:
            try:
                self.alt_feeds = metrics.random_inputs(working, alternate, seed + 1)
                self.alt_outputs = self.session.run(None, self.alt_feeds)
                self.alternate = alternate
            except Exception:  # the original does not take those dims either: nothing to hold candidates to
                self.alt_feeds = self.alt_outputs = None

    def _check_original_outputs(self, working: onnx.ModelProto) -> None:
        """Refuse outputs that are NaN/inf everywhere; note those that are in part."""
        for meta, value in zip(self.session.get_outputs(), self.outputs):
            value = np.asarray(value)
            if value.dtype.kind not in "fc" or not value.size:
                continue
            bad = int(np.count_nonzero(~np.isfinite(value)))
            if not bad:
                continue
            cause = _nonfinite_weight(working)
            cause = f" ({cause})" if cause else ""
            if bad == value.size:
                raise OnnxPruneError(f"the input model's output {meta.name!r} is NaN/inf everywhere on the random "
                                     f"test input{cause}: nothing to verify the pruned model against "
                                     "(--no-verify skips the check)")
            self.notes.append(f"the input model's output {meta.name!r} is NaN/inf at {bad} of {value.size} values "
                              f"on the random test input{cause}; the pruned model must have them at the same places")

    def failure(self, model: onnx.ModelProto) -> str | None:
        """Why `model` is not acceptable, or None. With an interface, the candidate is given the
        user's input and output types first (in place): it is run on feeds the user's model
        takes (calibration batches, other dims), not only at the dims it was analysed at."""
        if self.interface:
            from .shapes import restore_interface

            restore_interface(model, self.interface, keep_value_info=False)
        data = serialized(model)
        result = check(model, data)
        self._verdict = (model, result)
        if not result.startswith(("passed", "skipped")):
            self._refuse_failing_input()
            return f"onnx checker {result}"
        if self.session is None:
            return None
        try:
            sess = session(model, data=data)
            outputs = sess.run(None, self.feeds)
        except Exception as exc:
            return f"onnxruntime {first_line(exc)[:300]}"
        for meta, before, after in zip(sess.get_outputs(), self.outputs, outputs):
            if np.shape(before) != np.shape(after):
                return f"output {meta.name!r} changed shape {np.shape(before)} -> {np.shape(after)}"
            if _new_nonfinite(before, after):
                return f"output {meta.name!r} is NaN/inf where the original's is finite"
        if self.alternate is not None:
            failure = self._alternate_failure(sess)
            if failure is not None:
                return failure
        self._last_model, self.last_session, self.last_outputs = model, sess, outputs
        return None

    def _alternate_failure(self, sess) -> str | None:
        """The candidate's session (the user's interface) at the other input dims."""
        dims = ", ".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in self.alternate.items())
        try:
            outputs = sess.run(None, self.alt_feeds)
        except Exception as exc:
            return f"at input dims {dims}: onnxruntime {first_line(exc)[:300]}"
        for before, after in zip(self.alt_outputs, outputs):
            if np.shape(before) != np.shape(after):
                return f"at input dims {dims}: an output changed shape {np.shape(before)} -> {np.shape(after)}"
        return None

    def _refuse_failing_input(self) -> None:
        """A candidate failed the checker: if the input fails it too, the input is at fault.
        Checked only then, so that a run that goes well never pays for it."""
        verdict = check(self._reference)
        if not verdict.startswith(("passed", "skipped")):
            raise OnnxPruneError(f"the input model fails the onnx checker ({verdict[len('failed: '):]}); "
                                 "onnxprune writes only models that pass it")

    def verification(self, model: onnx.ModelProto) -> Verification:
        failure = None if self._last_model is model else self.failure(model)
        result = Verification(checker=self._verdict[1] if self._verdict[0] is model else check(model))
        if not result.checker.startswith(("passed", "skipped")):
            self._refuse_failing_input()
        if self.session is None:
            return result
        if failure is not None:
            result.ort = f"failed: {failure}"
            return result
        result.ort = "passed"
        names = [o.name for o in self.last_session.get_outputs()]
        result.max_abs_diff, result.max_rel_diff, result.max_abs_output, result.outputs_compared = compare(
            self.outputs, self.last_outputs, names)
        return result


def _invalid_model(exc: Exception, loaded: bool, guessed: bool, feeds) -> bool:
    """Whether onnxruntime's failure on the input says the model is broken (bad types, shapes,
    attributes), as opposed to onnxruntime lacking a kernel (custom ops, newer opsets), input
    dims guessed wrong, or made-up values for integer inputs (token ids out of a vocabulary),
    which say nothing about the model."""
    text, kind = str(exc), type(exc)
    if not kind.__module__.startswith("onnxruntime") or kind.__name__ == "NotImplemented" \
            or "not a registered function/op" in text:
        return False
    if kind.__name__ == "InvalidGraph" or "Type Error" in text:
        return True
    if guessed:
        return False
    return not loaded or all(np.asarray(v).dtype.kind in "fc" for v in (feeds or {}).values())


def _new_nonfinite(before, after) -> bool:
    before, after = np.asarray(before), np.asarray(after)
    if after.dtype.kind not in "fc" or before.dtype.kind not in "fc":
        return False
    return bool(np.any(~np.isfinite(after) & np.isfinite(before)))


def _nonfinite_weight(model: onnx.ModelProto) -> str | None:
    """The first float initializer holding NaN (or inf, where no NaN is found), described."""
    found_inf = None
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        value = numpy_helper.to_array(tensor)
        if np.isnan(value).any():
            return f"initializer {tensor.name!r} holds NaN"
        if found_inf is None and np.isinf(value).any():
            found_inf = f"initializer {tensor.name!r} holds inf"
    return found_inf


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}
