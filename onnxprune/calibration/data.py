"""Calibration data: validated feed dicts for a model, produced lazily.

Every batch is checked against the model's graph inputs. Every input must be present, the rank
must match, fixed dims must match, and inputs that share a symbolic dim (``seq``) must agree on
it. Arrays are converted to the input's element type when nothing is lost: widening casts
(int32 token ids for an int64 input), integer or float values that survive the round trip
(0/1 float masks for an int64 or bool input, integral pixels for a uint8 input), and float to
float, since rounding to the model's own precision cannot matter to calibration (values that
would overflow are refused). A mismatch raises ``OnnxPruneError`` with a one-line message that
names the input and the file or batch.

From Python, ``calibration_feeds(feeds, model)`` takes any iterable of ``{input name: array}``
dicts, or a function that returns a fresh one. The dicts are used as given (same checks, no
re-batching). Lists, ``CalibrationData`` and functions can be read several times. A one-shot
iterator (a generator, say) can be read only once, which suffices when the statistics fit in one
pass.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import OnnxPruneError, OptionError
from ..core.modelio import load_model
from ..core.shapes import graph_inputs


@dataclass(frozen=True)
class InputSpec:
    """A graph input: element type and dims (int when fixed, the symbol's name or None if not)."""

    name: str
    dtype: np.dtype
    dims: tuple | None  # None: rank unknown

    @property
    def fixed_batch(self) -> int | None:
        if self.dims and isinstance(self.dims[0], int):
            return self.dims[0]
        return None

    def describe(self) -> str:
        if self.dims is None:
            return f"{self.dtype}[?]"
        return f"{self.dtype}[{','.join('?' if d is None else str(d) for d in self.dims)}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for inp in graph_inputs(model):
        tensor_type = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not tensor_type.elem_type:
            raise OnnxPruneError(f"input {inp.name!r} is not a tensor: calibration data cannot feed it")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                         for d in tensor_type.shape.dim)
        specs.append(InputSpec(inp.name, dtype, dims))
    return specs


def conform(feed, inputs: list[InputSpec], source: str, allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """`feed` checked against the model's inputs and cast to their types, or a one-line error.
    NaN/inf values are refused unless allowed: statistics and refits built on them are NaN."""
    if not isinstance(feed, Mapping):
        raise OnnxPruneError(f"{source}: expected a dict of input name -> array, got {type(feed).__name__}")
    conformed, symbols = {}, {}
    for spec in inputs:
        if spec.name not in feed:
            raise OnnxPruneError(f"{source}: no array for input {spec.name!r} (found: {quoted_names(feed)})")
        value = _cast(np.asarray(feed[spec.name]), spec, source)
        _check_shape(value, spec, source, symbols)
        if not allow_nonfinite:
            _check_finite(value, spec, source)
        conformed[spec.name] = np.ascontiguousarray(value)
    return conformed


def _check_finite(value: np.ndarray, spec: InputSpec, source: str) -> None:
    if value.dtype.kind not in "fc" or np.isfinite(value).all():
        return
    where = np.argwhere(~np.isfinite(value))[0]
    sample = f"sample {int(where[0])} of the batch" if value.ndim and spec.fixed_batch != 1 else "the sample"
    raise OptionError("calib", None, f"{source}: input {spec.name!r} holds NaN/inf ({sample}, at index "
                      f"{[int(i) for i in where]}); calibration data must be finite (allow it with "
                      "{allow_nonfinite})")


def quoted_names(keys) -> str:
    return ", ".join(repr(k) for k in keys) or "nothing"


def _cast(value: np.ndarray, spec: InputSpec, source: str) -> np.ndarray:
    have, want = value.dtype, spec.dtype
    if have == want:
        return value
    if np.can_cast(have, want, "safe"):
        return value.astype(want)
    if have.kind == "f" and want.kind == "f":
        with np.errstate(over="ignore"):
            cast = value.astype(want)
        if np.array_equal(np.isfinite(cast), np.isfinite(value)):
            return cast
        raise OnnxPruneError(f"{source}: input {spec.name!r} takes {want}, and some {have} values overflow it")
    if have.kind in "biuf" and want.kind in "biu":
        with np.errstate(invalid="ignore", over="ignore"):
            cast = value.astype(want)
            if np.array_equal(cast.astype(have), value):  # the values survive the round trip
                return cast
    raise OnnxPruneError(f"{source}: input {spec.name!r} takes {want}, got {have} values that do not "
                         "convert without loss")


# Names exporters give every unknown dim alike (Paddle writes "?"): they tie nothing together.
_ANONYMOUS_DIMS = frozenset({"?", "-1", "unk", "None"})


def _check_shape(value: np.ndarray, spec: InputSpec, source: str, symbols: dict) -> None:
    if spec.dims is None:
        return
    if value.ndim != len(spec.dims):
        raise OnnxPruneError(f"{source}: input {spec.name!r} is {spec.describe()} (rank {len(spec.dims)}), "
                             f"got an array of shape {list(value.shape)}")
    for axis, (want, got) in enumerate(zip(spec.dims, value.shape)):
        if isinstance(want, int) and want != got:
            raise OnnxPruneError(f"{source}: input {spec.name!r} is {spec.describe()}, got shape "
                                 f"{list(value.shape)} ({got} on axis {axis})")
        if isinstance(want, str) and want not in _ANONYMOUS_DIMS:
            size, owner = symbols.setdefault(want, (got, spec.name))
            if size != got:
                raise OnnxPruneError(f"{source}: inputs {owner!r} and {spec.name!r} disagree on dim {want!r} "
                                     f"({size} vs {got})")


class CalibrationData:
    """Validated feed dicts for one model, produced lazily. Iterate it once per pass.

    `produce` returns a fresh iterator of (source, feed) pairs, `source` naming the file or
    batch for error messages. With `one_shot`, `produce` can be called only once.
    """

    def __init__(self, inputs: list[InputSpec], produce: Callable[[], Iterable[tuple[str, Mapping]]],
                 description: str, limit: int | None = None, one_shot: bool = False, notes=(),
                 allow_nonfinite: bool = False):
        if limit is not None and limit < 1:
            raise OnnxPruneError(f"calibration limit {limit}: give a positive number of samples")
        self.inputs = inputs
        self.description = description
        self.limit = limit
        self.one_shot = one_shot
        self.notes = list(notes)
        self.allow_nonfinite = allow_nonfinite
        # the input whose zeros mark padding ([batch, sequence]): statistics leave those rows out
        self.mask_input = _attention_mask(inputs)
        self.labels = None  # one class id per sample, in order, where the data holds them (gradient criteria)
        self._produce = produce
        self._used = False
        self._resume = None  # a one-shot source's iterator after first() peeked at it

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._resume is not None:
            resume, self._resume = self._resume, None
            yield from resume
            return
        if self.one_shot and self._used:
            raise OnnxPruneError(f"{self.description}: a one-shot iterator cannot be read twice; pass a list "
                                 "or a function that returns a fresh iterator")
        self._used = True
        yielded = 0
        for source, feed in self._produce():
            feed = conform(feed, self.inputs, source, self.allow_nonfinite)
            if self.limit is not None:
                feed = self._cut(feed, self.limit - yielded)
            yield feed
            yielded += self._samples(feed)
            if self.limit is not None and yielded >= self.limit:
                return
        if not yielded:
            raise OnnxPruneError(f"{self.description}: no calibration batches")

    def first(self) -> dict[str, np.ndarray]:
        """The first batch, without using up a one-shot source."""
        batches = iter(self)
        batch = next(batches)
        if self.one_shot:
            self._resume = itertools.chain([batch], batches)
        else:
            batches.close()
        return batch

    def limited(self, limit: int | None) -> CalibrationData:
        """The same data capped at `limit` samples."""
        data = CalibrationData(self.inputs, self._produce, self.description, limit, self.one_shot, self.notes,
                               self.allow_nonfinite)
        data.mask_input = self.mask_input
        data.labels = self.labels
        return data

    def with_mask(self, name: str | None) -> CalibrationData:
        """Padding marked by the input `name` (None: no padding), instead of the attention mask
        found by name."""
        if name is not None:
            spec = next((s for s in self.inputs if s.name == name), None)
            if spec is None or spec.dims is None or len(spec.dims) != 2:
                raise OnnxPruneError(f"calibration mask {name!r}: not a [batch, sequence] input of the model "
                                     f"(inputs: {', '.join(s.name for s in self.inputs)})")
        self.mask_input = name
        return self

    def positions(self, feed: dict[str, np.ndarray]) -> np.ndarray | None:
        """Which [batch, sequence] positions of this batch are real tokens (None: all)."""
        if self.mask_input is None or self.mask_input not in feed:
            return None
        return np.asarray(feed[self.mask_input]) != 0

    def spread(self, samples: int) -> CalibrationData:
        """About `samples` samples taken evenly from all of the data: every k-th batch, cut at
        `samples`. For passes that need few samples, but of every kind (data is often ordered).
        Counting the batches reads the data once; a one-shot source is only cut."""
        if self.one_shot:
            return self.limited(min(samples, self.limit or samples))
        sizes = [self._samples(feed) for feed in self]
        total = sum(sizes)
        if total <= samples:
            return self
        step = -(-total // samples)  # batches of equal size: every step-th one gives about `samples`
        produce, count = self._produce, len(sizes)
        data = CalibrationData(self.inputs, lambda: itertools.islice(produce(), 0, count, step), self.description,
                               samples, notes=self.notes, allow_nonfinite=self.allow_nonfinite)
        data.mask_input = self.mask_input
        return data

    def _samples(self, feed: dict[str, np.ndarray]) -> int:
        lead = feed[self.inputs[0].name] if self.inputs else None
        return lead.shape[0] if lead is not None and lead.ndim else 1

    def _cut(self, feed: dict[str, np.ndarray], wanted: int) -> dict[str, np.ndarray]:
        """The first `wanted` samples of `feed`, where every input's axis 0 is a dynamic batch."""
        count = self._samples(feed)
        cuttable = all(spec.fixed_batch is None and feed[spec.name].ndim and feed[spec.name].shape[0] == count
                       for spec in self.inputs)
        if wanted >= count or not cuttable:
            return feed
        return {name: value[:wanted] for name, value in feed.items()}


def calibration_feeds(feeds, model: onnx.ModelProto | str | Path, limit: int | None = None,
                      allow_nonfinite: bool = False) -> CalibrationData:
    """Calibration data from Python: an iterable of {input name: array} dicts, or a function
    returning a fresh one each time. A single dict counts as one batch."""
    if isinstance(feeds, CalibrationData):
        return feeds if limit is None else feeds.limited(limit)
    inputs = model_inputs(as_model(model))
    if isinstance(feeds, Mapping):
        feeds = [feeds]
    if callable(feeds):
        return CalibrationData(inputs, lambda: _numbered(feeds()), "calibration feeds", limit,
                               allow_nonfinite=allow_nonfinite)
    if not isinstance(feeds, Iterable):
        raise OnnxPruneError(f"calibration feeds: expected an iterable of dicts, got {type(feeds).__name__}")
    one_shot = iter(feeds) is feeds
    return CalibrationData(inputs, lambda: _numbered(feeds), "calibration feeds", limit, one_shot=one_shot,
                           allow_nonfinite=allow_nonfinite)


def _attention_mask(inputs: list[InputSpec]) -> str | None:
    """The input named like an attention mask, integer or bool, [batch, sequence]."""
    for spec in inputs:
        if "attention_mask" in spec.name.lower() and spec.dims is not None and len(spec.dims) == 2 \
                and (spec.dtype == np.bool_ or np.issubdtype(spec.dtype, np.integer)):
            return spec.name
    return None


def _numbered(feeds: Iterable) -> Iterator[tuple[str, Mapping]]:
    for number, feed in enumerate(feeds, start=1):
        yield f"calibration batch {number}", feed


def as_model(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)
