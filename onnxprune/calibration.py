"""Calibration data: real inputs for a model, and per-channel statistics streamed from them.

Reading the data
----------------
``load_calibration(path, model, image_spec=None, limit=None, batch_size=8)`` reads:

* ``.npz``: one array per model input, keyed by input name; other keys are ignored. A model
  with one input also takes an ``.npz`` holding a single array under any key (``np.savez(f, x)``
  stores it as ``arr_0``). An array whose rank is the input's rank holds samples stacked on
  axis 0, the batch axis. It is cut into batches of the model's fixed batch size, or of
  ``batch_size`` where the batch dim is dynamic. An array with one axis more holds one complete
  input per entry of axis 0. That suits pre-batched data and models fixed to batch 1
  (``[N, 1, 3, 224, 224]``); the stacked form ``[N, 3, 224, 224]`` works for those models too.
  Each ``.npz`` is read whole when its turn comes.
* ``.npy``: the same, for a model with a single input. It is memory-mapped, so only the batch in
  use is read.
* a folder: either every ``.npz``/``.npy`` in it, in file-name order, or every image in it
  (``.png .jpg .jpeg .bmp``), never a mixture of the two. Subfolders are not searched and other
  files are ignored.
* images (a folder of them, or one image file): the model must have one 4-D input, and a
  preprocessing spec (below) is required. Images are batched like stacked arrays. If the batch
  size is fixed, images left over after the last full batch are dropped, and
  ``CalibrationData.notes`` says so. PIL reads them, or scikit-image when PIL is not installed.

``limit`` caps the number of samples, counted on axis 0 of each batch. The last batch is cut
to fit unless some input has a fixed batch size; then it is used whole.

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

Image spec
----------
A comma-separated list of ``key=value`` items, e.g.
``size=224x224,resize=256,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW``:

* ``size=HxW`` or ``size=S``: the model's input size. It defaults to the input's fixed dims.
* ``resize=S``: scale the shorter side to S, then crop the centre to ``size``. Without it, images
  are stretched to ``size``.
* ``mean=a/b/c``, ``std=a/b/c``: one value, or one per channel (defaults 0 and 1).
* ``scale=1/255`` (the default): a number or a fraction. Each value is
  ``(pixel * scale - mean) / std``, with the pixel in 0..255.
* ``layout=NCHW|NHWC``: defaults to the side where the model's input has 1 or 3 channels.
* ``channels=3|1``: RGB or greyscale. Defaults to the model's channel dim, else 3.
* ``order=RGB|BGR``: channel order (default RGB).

Statistics
----------
``collect_channel_stats(model, feeds, {tensor: channel_axis})`` runs the model in onnxruntime,
with the requested intermediate tensors added as graph outputs. Per channel it accumulates the
count, sum, sum of |x|, sum of x^2 and the number of exact zeros, in float64, over every axis
except the channel axis. It does this batch by batch and keeps no activations. Graph inputs are
read straight from the feeds, and initializers are fetched like any other tensor.
``collect_grams`` and ``collect_gram`` accumulate X^T X over a tensor's channel axis (the rows
are all other positions) in the same way, for least-squares refits; ``PatchGramStats`` does it
for a kxk convolution's input patches (a sample of output positions per image), and
``collect_into`` feeds any such accumulators.

Memory stays bounded. The requested tensors are split into chunks whose extra outputs for one
batch fit in ``budget_bytes`` (default 2 GiB). Sizes are estimated by shape inference at the
first batch's shapes. Each chunk is one onnxruntime session and one pass over the feeds, and
only one session exists at a time. Reductions convert at most ``_MAX_PIECE_ELEMENTS`` values to
float64 at once.
"""
from __future__ import annotations

import itertools
import math
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxPruneError, first_line
from .files import regular_file
from .modelio import load_model
from .shapes import fix_input_shapes, graph_inputs, infer_shapes, skeleton

ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
DEFAULT_BATCH_SIZE = 8
DEFAULT_BUDGET_BYTES = 2 * 1024**3
# For the report when a data-driven criterion is asked for without data.
MAGNITUDE_FALLBACK_NOTE = "no calibration data given: channels are scored by weight magnitude"

_MAX_PIECE_ELEMENTS = 1 << 24  # float64 working copies stay near 128 MB, whatever the tensor


# ---------------------------------------------------------------------------------------------
# What the model accepts


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
            raise OnnxPruneError(f"{source}: no array for input {spec.name!r} (found: {_names(feed)})")
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
    raise OnnxPruneError(f"{source}: input {spec.name!r} holds NaN/inf ({sample}, at index "
                         f"{[int(i) for i in where]}); calibration data must be finite (allow it with "
                         "--allow-nonfinite)")


def _names(keys) -> str:
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


# ---------------------------------------------------------------------------------------------
# Calibration data: validated feeds, produced lazily


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
        return CalibrationData(self.inputs, self._produce, self.description, limit, self.one_shot, self.notes,
                               self.allow_nonfinite)

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
        return CalibrationData(self.inputs, lambda: itertools.islice(produce(), 0, count, step), self.description,
                               samples, notes=self.notes, allow_nonfinite=self.allow_nonfinite)

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
    inputs = model_inputs(_as_model(model))
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


def _numbered(feeds: Iterable) -> Iterator[tuple[str, Mapping]]:
    for number, feed in enumerate(feeds, start=1):
        yield f"calibration batch {number}", feed


def _as_model(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


# ---------------------------------------------------------------------------------------------
# Reading files


def load_calibration(path, model: onnx.ModelProto | str | Path, image_spec: ImageSpec | str | None = None,
                     limit: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     allow_nonfinite: bool = False) -> CalibrationData:
    """Calibration data from an .npz/.npy file or a folder of them or of images (see the module doc)."""
    model = _as_model(model)
    if batch_size < 1:
        raise OnnxPruneError(f"calibration batch size {batch_size}: give a positive number")
    inputs = model_inputs(model)
    path = Path(path)
    if not path.exists():
        raise OnnxPruneError(f"{path}: no such file or folder")
    if path.is_dir():
        arrays, images = _folder_files(path)
        if images:
            return _image_data(inputs, images, path, image_spec, limit, batch_size, allow_nonfinite)
        if image_spec is not None:
            raise OnnxPruneError(f"{path}: holds array files, and image preprocessing (--calib-images) applies "
                                 "to image files only; drop it")
        files, description = arrays, f"{path} ({len(arrays)} array files)"
    elif path.suffix.lower() in ARRAY_SUFFIXES:
        if image_spec is not None:
            raise OnnxPruneError(f"{path}: holds arrays, and image preprocessing (--calib-images) applies "
                                 "to image files only; drop it")
        files, description = [regular_file(path, "calibration data")], str(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        return _image_data(inputs, [regular_file(path, "calibration image")], path, image_spec, limit, batch_size,
                           allow_nonfinite)
    else:
        raise OnnxPruneError(f"{path}: expected an .npz or .npy file, or a folder of them or of images")

    def produce():
        for file in files:
            yield from _array_file_batches(file, inputs, batch_size)

    return CalibrationData(inputs, produce, description, limit, allow_nonfinite=allow_nonfinite)


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if arrays and images:
        raise OnnxPruneError(f"{folder}: holds both arrays ({arrays[0].name}) and images ({images[0].name}); "
                             "keep one kind per folder")
    if not arrays and not images:
        raise OnnxPruneError(f"{folder}: no .npz, .npy or image files ({', '.join(IMAGE_SUFFIXES)})")
    return arrays, images


def _array_file_batches(file: Path, inputs: list[InputSpec], batch_size: int) -> Iterator[tuple[str, dict]]:
    arrays = _read_arrays(file, inputs)
    for number, (first, feed) in enumerate(_split_batches(arrays, inputs, batch_size, file), start=1):
        yield f"{file} (batch {number}, from sample {first})", feed


def _read_arrays(file: Path, inputs: list[InputSpec]) -> dict[str, np.ndarray]:
    """The arrays of one .npz/.npy file, keyed by input name; every input must have one."""
    try:
        if file.suffix.lower() == ".npy":
            if len(inputs) != 1:
                raise OnnxPruneError(f"{file}: an .npy file holds one array, and the model has inputs "
                                     f"{_names(s.name for s in inputs)}: use an .npz keyed by input name")
            return {inputs[0].name: np.load(file, mmap_mode="r", allow_pickle=False)}
        with np.load(file, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if len(inputs) == 1 and len(keys) == 1:  # np.savez(f, x) for a one-input model
                return {inputs[0].name: npz[keys[0]]}
            for spec in inputs:
                if spec.name not in keys:
                    raise OnnxPruneError(f"{file}: no array for input {spec.name!r} (found: {_names(keys)})")
            return {spec.name: npz[spec.name] for spec in inputs}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OnnxPruneError(f"{file}: not a readable {file.suffix.lower()} file ({first_line(exc)})") from None


def _split_batches(arrays: dict, inputs: list[InputSpec], batch_size: int, file: Path) -> Iterator[tuple[int, dict]]:
    """Cut a file's arrays into feeds (with the index of each one's first sample): samples
    stacked on axis 0, or one feed per entry."""
    per_entry = {spec.name: _holds_entries(arrays[spec.name], spec, file) for spec in inputs}
    lengths = {name: arrays[name].shape[0] for name in per_entry}
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{name!r}: {n}" for name, n in lengths.items())
        raise OnnxPruneError(f"{file}: arrays disagree on the number of samples on axis 0 ({counts})")
    step = 1 if any(per_entry.values()) else _stacked_step(arrays, inputs, batch_size, file)
    length = next(iter(lengths.values()), 0)
    for start in range(0, length, step):
        yield start, {name: arrays[name][start] if entries else arrays[name][start:start + step]
                      for name, entries in per_entry.items()}


def _holds_entries(array: np.ndarray, spec: InputSpec, file: Path) -> bool:
    """True when each entry of axis 0 is one whole input, False when axis 0 stacks samples."""
    rank = None if spec.dims is None else len(spec.dims)
    if rank is not None and array.ndim == rank + 1:
        return True
    if array.ndim >= 1 and (rank is None or array.ndim == rank):
        return False
    raise OnnxPruneError(f"{file}: input {spec.name!r} is {spec.describe()}: expected an array of rank {rank} "
                         f"(samples on axis 0) or {None if rank is None else rank + 1} (one input per entry), "
                         f"got shape {list(array.shape)}")


def _stacked_step(arrays: dict, inputs: list[InputSpec], batch_size: int, file: Path) -> int:
    """Samples per batch: the model's fixed batch size where it has one, else `batch_size`."""
    fixed = {spec.fixed_batch for spec in inputs if spec.fixed_batch is not None}
    if len(fixed) > 1:
        raise OnnxPruneError(f"{file}: the model's inputs have different fixed batch sizes ({sorted(fixed)}); "
                             "give one input per entry (an array with one more axis)")
    if not fixed:
        return batch_size
    step = fixed.pop()
    length = arrays[inputs[0].name].shape[0]
    if length % step:
        raise OnnxPruneError(f"{file}: input {inputs[0].name!r} has a fixed batch of {step}, and {length} "
                             "samples do not divide into it")
    return step


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageSpec:
    """How images become model input; `ImageSpec.parse("size=224x224,mean=...")`, see the module doc."""

    size: tuple[int, int] | None = None  # (H, W); None: the model input's fixed dims
    resize: int | None = None  # shorter side first, then a centre crop; None: stretch to size
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255
    layout: str | None = None  # "NCHW" or "NHWC"; None: from the model input
    channels: int | None = None  # 3 (RGB) or 1 (greyscale); None: from the model input, else 3
    order: str = "RGB"

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        fields = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _SPEC_PARSERS:
                raise OnnxPruneError(f"image spec {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                                     f"{', '.join(_SPEC_PARSERS)}")
            try:
                fields[key] = _SPEC_PARSERS[key](value.strip())
            except (ValueError, ZeroDivisionError) as exc:
                raise OnnxPruneError(f"image spec {text!r}: {item!r}: {first_line(exc)}") from None
        return cls(**fields)

    def __str__(self) -> str:
        parts = []
        if self.size:
            parts.append(f"size={self.size[0]}x{self.size[1]}")
        if self.resize:
            parts.append(f"resize={self.resize}")
        parts += [f"mean={'/'.join(f'{v:g}' for v in self.mean)}", f"std={'/'.join(f'{v:g}' for v in self.std)}",
                  f"scale={self.scale:g}"]
        parts += [f"{key}={getattr(self, key)}" for key in ("layout", "channels") if getattr(self, key)]
        return ",".join(parts + [f"order={self.order}"])

    def resolved(self, spec: InputSpec) -> ImageSpec:
        """This spec with size, layout and channels filled in from a 4-D model input."""
        where = f"image calibration for input {spec.name!r} ({spec.describe()})"
        if spec.dims is None or len(spec.dims) != 4:
            raise OnnxPruneError(f"{where}: images need a 4-D input")
        layout = self.layout or _guess_layout(spec.dims)
        if layout is None:
            raise OnnxPruneError(f"{where}: cannot tell the channel axis; add layout=NCHW or layout=NHWC to the spec")
        channel_dim = spec.dims[1] if layout == "NCHW" else spec.dims[3]
        fixed_channels = channel_dim if isinstance(channel_dim, int) else None
        channels = self.channels or fixed_channels or 3
        if fixed_channels is not None and channels != fixed_channels:
            raise OnnxPruneError(f"{where}: the input has {fixed_channels} channels, the spec says {channels}")
        spatial = spec.dims[2:] if layout == "NCHW" else spec.dims[1:3]
        size = self.size or (tuple(spatial) if all(isinstance(d, int) for d in spatial) else None)
        if size is None:
            raise OnnxPruneError(f"{where}: the input's height and width are not fixed; add size=HxW to the spec")
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, channels):
                raise OnnxPruneError(f"{where}: {key} has {len(getattr(self, key))} values for {channels} channels")
        return replace(self, size=size, layout=layout, channels=channels)


def _guess_layout(dims: tuple) -> str | None:
    if dims[1] in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3):
        return "NHWC"
    return None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise ValueError("expected HxW or a single size")
    return _positive(parts[0]), _positive(parts[1])


def _number(text: str) -> float:
    numerator, sep, denominator = text.partition("/")
    return float(numerator) / float(denominator) if sep else float(text)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split("/"))


def _std(text: str) -> tuple[float, ...]:
    values = _floats(text)
    if any(v <= 0 for v in values):
        raise ValueError("std values must be positive")
    return values


def _choice(*options):
    def parse(text: str) -> str:
        if text.upper() not in options:
            raise ValueError(f"choose {' or '.join(options)}")
        return text.upper()
    return parse


def _channels(text: str) -> int:
    value = int(text)
    if value not in (1, 3):
        raise ValueError("choose 3 (RGB) or 1 (greyscale)")
    return value


_SPEC_PARSERS = {"size": _size, "resize": _positive, "mean": _floats, "std": _std, "scale": _number,
                 "layout": _choice("NCHW", "NHWC"), "channels": _channels, "order": _choice("RGB", "BGR")}


def _image_data(inputs: list[InputSpec], images: list[Path], where: Path, image_spec, limit,
                batch_size: int, allow_nonfinite: bool = False) -> CalibrationData:
    if len(inputs) != 1:
        raise OnnxPruneError(f"{where}: image calibration needs a model with one input; this one has "
                             f"{_names(s.name for s in inputs)}")
    if image_spec is None:
        raise OnnxPruneError(f"{where}: images need a preprocessing spec, e.g. "
                             "'size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW'")
    spec = ImageSpec.parse(image_spec) if isinstance(image_spec, str) else image_spec
    spec = spec.resolved(inputs[0])
    step = inputs[0].fixed_batch or batch_size
    usable = len(images) - len(images) % step if inputs[0].fixed_batch else len(images)
    if not usable:
        raise OnnxPruneError(f"{where}: {len(images)} images, fewer than the model's fixed batch of {step}")
    notes = []
    if usable < len(images):
        notes.append(f"{len(images) - usable} of {len(images)} images left out: the model's batch is fixed at {step}")
    name = inputs[0].name

    def produce():
        for start in range(0, usable, step):
            group = images[start:start + step]
            source = str(group[0]) if len(group) == 1 else f"{group[0]} .. {group[-1].name}"
            yield source, {name: np.stack([_image_array(path, spec) for path in group])}

    description = f"{where} ({len(images)} images, {spec})"
    return CalibrationData(inputs, produce, description, limit, notes=notes, allow_nonfinite=allow_nonfinite)


def _image_array(path: Path, spec: ImageSpec) -> np.ndarray:
    """One image as model input without the batch axis, laid out and normalised per `spec`."""
    pixels = _load_pixels(path, spec.channels)
    height, width = spec.size
    if spec.resize:
        shorter = min(pixels.shape[:2])
        scaled = (round(pixels.shape[0] * spec.resize / shorter), round(pixels.shape[1] * spec.resize / shorter))
        pixels = _resize_pixels(pixels, (max(scaled[0], height), max(scaled[1], width)))
        top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
        pixels = pixels[top:top + height, left:left + width]
    elif pixels.shape[:2] != (height, width):
        pixels = _resize_pixels(pixels, (height, width))
    values = pixels.astype(np.float32) * np.float32(spec.scale)
    if spec.order == "BGR":
        values = values[..., ::-1]
    values = (values - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(values.transpose(2, 0, 1) if spec.layout == "NCHW" else values)


def _image_backend() -> str:
    try:
        import PIL.Image  # noqa: F401
        return "pil"
    except ImportError:
        pass
    try:
        import skimage.io  # noqa: F401
        import skimage.transform  # noqa: F401
        return "skimage"
    except ImportError:
        raise OnnxPruneError("reading images needs Pillow or scikit-image: pip install pillow") from None


def _load_pixels(path: Path, channels: int) -> np.ndarray:
    """The image as uint8 [H, W, channels]."""
    try:
        if _image_backend() == "pil":
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
        else:
            import skimage.io

            pixels = _to_channels(np.asarray(skimage.io.imread(str(path))), channels)
    except OnnxPruneError:
        raise
    except Exception as exc:  # decoders raise many types for broken files
        raise OnnxPruneError(f"{path}: cannot read image ({first_line(exc)})") from None
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """scikit-image's decoded array (grey, RGB or RGBA, any integer depth) as uint8 with `channels`."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    pixels = pixels.astype(np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] in (1, 2) else pixels[..., :3]
    if channels == 3:
        return rgb
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's "L"
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]


def _resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 [H, W, C] to `size` (H, W)."""
    height, width = size
    if _image_backend() == "pil":
        from PIL import Image

        channels = pixels.shape[2]
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        resized = np.asarray(image.resize((width, height), Image.BILINEAR))
        return resized.reshape(height, width, channels)
    import skimage.transform

    resized = skimage.transform.resize(pixels, (height, width), order=1, preserve_range=True, anti_aliasing=True)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Streaming accumulators


class _Accumulator:
    """Takes one tensor's values batch by batch, as float64 rows of channels."""

    def __init__(self, axis: int, name: str = "tensor") -> None:
        self.axis = axis
        self.name = name
        self.count = 0  # values seen per channel (rows)

    def add(self, values: np.ndarray) -> None:
        for rows in _channel_rows(np.asarray(values), self.axis, self.name):
            self._check_channels(rows.shape[1])
            self._add_rows(rows)
            self.count += rows.shape[0]

    def _check_channels(self, channels: int) -> None:
        known = self.channels
        if known is not None and known != channels:
            raise OnnxPruneError(f"tensor {self.name!r}: {channels} channels on axis {self.axis} in one batch, "
                                 f"{known} in an earlier one")

    @property
    def channels(self) -> int | None:
        raise NotImplementedError

    def _add_rows(self, rows: np.ndarray) -> None:
        raise NotImplementedError


def _channel_rows(values: np.ndarray, axis: int, name: str) -> Iterator[np.ndarray]:
    """`values` as float64 [positions, channels] pieces of bounded size (channel axis last)."""
    if not -values.ndim <= axis < values.ndim:
        raise OnnxPruneError(f"tensor {name!r}: channel axis {axis} is out of range for its shape "
                             f"{list(values.shape)}")
    axis %= values.ndim
    channels = values.shape[axis]
    if axis == 0 or values.ndim == 1:
        yield np.moveaxis(values, axis, -1).reshape(-1, channels).astype(np.float64)
        return
    per_entry = max(1, values[:1].size)
    step = max(1, _MAX_PIECE_ELEMENTS // per_entry)
    for start in range(0, values.shape[0], step):  # slices of axis 0 bound the float64 copies
        piece = values[start:start + step]
        yield np.moveaxis(piece, axis, -1).reshape(-1, channels).astype(np.float64)


class ChannelStats(_Accumulator):
    """Per-channel sums of one tensor over all positions and batches (float64).

    mean_abs and l2_norm serve input-norm / Wanda scores, apoz the average percentage of zeros,
    mean bias compensation.
    """

    def __init__(self, axis: int, name: str = "tensor") -> None:
        super().__init__(axis, name)
        self.sum = self.sum_abs = self.sum_sq = self.zeros = None

    @property
    def channels(self) -> int | None:
        return None if self.sum is None else len(self.sum)

    def _add_rows(self, rows: np.ndarray) -> None:
        if self.sum is None:
            channels = rows.shape[1]
            self.sum, self.sum_abs, self.sum_sq = (np.zeros(channels) for _ in range(3))
            self.zeros = np.zeros(channels, dtype=np.int64)
        self.sum += rows.sum(axis=0)
        self.sum_abs += np.abs(rows).sum(axis=0)
        self.sum_sq += np.einsum("ij,ij->j", rows, rows)
        self.zeros += np.count_nonzero(rows == 0, axis=0)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sum_abs / self.count

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.sum_sq / self.count)

    @property
    def l2_norm(self) -> np.ndarray:
        """sqrt(sum of x^2) over every position seen: Wanda's ||X_j||_2."""
        return np.sqrt(self.sum_sq)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.sum_sq / self.count - self.mean ** 2, 0.0)

    @property
    def apoz(self) -> np.ndarray:
        """Fraction of values exactly zero."""
        return self.zeros / self.count


class GramStats(_Accumulator):
    """X^T X over a tensor's channel axis, rows being every other position (float64)."""

    def __init__(self, axis: int, name: str = "tensor") -> None:
        super().__init__(axis, name)
        self.gram = self.sum = None

    @property
    def channels(self) -> int | None:
        return None if self.sum is None else len(self.sum)

    def _add_rows(self, rows: np.ndarray) -> None:
        if self.gram is None:
            self.gram = np.zeros((rows.shape[1], rows.shape[1]))
            self.sum = np.zeros(rows.shape[1])
        self.gram += rows.T @ rows
        self.sum += rows.sum(axis=0)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        return self.gram / self.count - np.outer(self.mean, self.mean)


class PatchGramStats:
    """X^T X of a convolution's input patches: rows are output positions, columns the
    [channel, kernel tap] entries the kernel reads there (zero padding included).

    At most `positions_per_sample` output positions per sample are taken, at random but
    reproducibly, which bounds both the patch copy and the cost of the Gram (rows x cols^2).
    """

    def __init__(self, kernel, strides=None, pads=None, dilations=None, name: str = "tensor",
                 positions_per_sample: int = 256, seed: int = 0) -> None:
        rank = len(kernel)
        self.kernel = tuple(int(k) for k in kernel)
        self.strides = tuple(int(v) for v in (strides or [1] * rank))
        self.pads = tuple(int(v) for v in (pads or [0] * (2 * rank)))
        self.dilations = tuple(int(v) for v in (dilations or [1] * rank))
        self.name, self.positions_per_sample = name, positions_per_sample
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.gram = self.sum = None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        rank = len(self.kernel)
        if values.ndim != rank + 2:
            raise OnnxPruneError(f"tensor {self.name!r}: shape {list(values.shape)} does not fit a "
                                 f"{rank}-d convolution's input")
        padded = np.pad(values, [(0, 0), (0, 0)] + [(self.pads[i], self.pads[i + rank]) for i in range(rank)])
        out = [(padded.shape[2 + i] - self.dilations[i] * (self.kernel[i] - 1) - 1) // self.strides[i] + 1
               for i in range(rank)]
        if min(out) <= 0:
            return
        per_sample = math.prod(out)
        taken = min(per_sample, self.positions_per_sample)
        for n in range(values.shape[0]):
            flat = (self.rng.choice(per_sample, taken, replace=False) if taken < per_sample
                    else np.arange(per_sample))
            where = np.unravel_index(flat, out)
            taps = np.unravel_index(np.arange(math.prod(self.kernel)), self.kernel)
            index = [where[i][:, None] * self.strides[i] + taps[i][None, :] * self.dilations[i] for i in range(rank)]
            patches = padded[n][(slice(None), *index)]  # [channels, rows, taps]
            rows = np.moveaxis(patches, 1, 0).reshape(taken, -1).astype(np.float64)
            if self.gram is None:
                self.gram = np.zeros((rows.shape[1], rows.shape[1]))
                self.sum = np.zeros(rows.shape[1])
            elif rows.shape[1] != len(self.sum):
                raise OnnxPruneError(f"tensor {self.name!r}: {values.shape[1]} channels in one batch, "
                                     f"{len(self.sum) // math.prod(self.kernel)} in an earlier one")
            self.gram += rows.T @ rows
            self.sum += rows.sum(axis=0)
            self.count += taken

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.count


class PairedStats:
    """Per-channel sums of one tensor in two models run on the same batches (float64).

    `a` is the reference (original model), `b` the candidate; `positions` picks the reference's
    channels that the candidate kept. Gives the least-squares affine map b -> a per channel.
    """

    def __init__(self, axis: int, name: str = "tensor", positions: np.ndarray | None = None) -> None:
        self.axis, self.name, self.positions = axis, name, positions
        self.count = 0
        self.sums = None  # rows: a, b, a*a, b*b, a*b

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a)
        if self.positions is not None:
            a = np.take(a, self.positions, axis=self.axis)
        if a.shape != np.shape(b):
            raise OnnxPruneError(f"tensor {self.name!r}: shape {list(np.shape(b))} in the pruned model, "
                                 f"{list(a.shape)} expected from the original")
        for rows_a, rows_b in zip(_channel_rows(a, self.axis, self.name), _channel_rows(np.asarray(b), self.axis,
                                                                                        self.name)):
            part = np.stack([rows_a.sum(0), rows_b.sum(0), np.einsum("ij,ij->j", rows_a, rows_a),
                             np.einsum("ij,ij->j", rows_b, rows_b), np.einsum("ij,ij->j", rows_a, rows_b)])
            self.sums = part if self.sums is None else self.sums + part
            self.count += rows_a.shape[0]

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(gain, offset) minimising E[(gain * b + offset - a)^2] per channel; gain 1 where b is constant."""
        mean_a, mean_b, aa, bb, ab = self.sums / self.count
        var_b = bb - mean_b ** 2
        cov = ab - mean_a * mean_b
        flat = var_b <= 1e-12 * np.maximum(aa, 1e-30)
        gain = np.where(flat, 1.0, cov / np.where(flat, 1.0, var_b))
        return gain, mean_a - gain * mean_b


# ---------------------------------------------------------------------------------------------
# Running the model


def collect_channel_stats(model: onnx.ModelProto | str | Path, feeds, tensors: dict[str, int],
                          budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict[str, ChannelStats]:
    """Per-channel statistics of the named tensors ({name: channel axis}) over all calibration batches.

    `feeds` is CalibrationData or anything calibration_feeds() takes. See the module doc for memory.
    """
    return _collect(model, feeds, tensors, ChannelStats, budget_bytes)


def collect_grams(model: onnx.ModelProto | str | Path, feeds, tensors: dict[str, int],
                  budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict[str, GramStats]:
    """X^T X, mean and row count of each named tensor's channel axis ({name: channel axis})."""
    return _collect(model, feeds, tensors, GramStats, budget_bytes)


def collect_gram(model: onnx.ModelProto | str | Path, feeds, tensor: str, axis: int,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[np.ndarray, np.ndarray, int]:
    """(X^T X [C, C], mean [C], rows) of one tensor, X being its values with the channel axis last."""
    gram = collect_grams(model, feeds, {tensor: axis}, budget_bytes)[tensor]
    return gram.gram, gram.mean, gram.count


def _collect(model, feeds, tensors: dict[str, int], make: type[_Accumulator], budget_bytes: int) -> dict:
    model = _as_model(model)
    _check_tensors(model, tensors)
    accumulators = {name: make(axis, name) for name, axis in tensors.items()}
    collect_into(model, feeds, list(accumulators.items()), budget_bytes)
    return accumulators


def collect_into(model, feeds, accumulators: list[tuple[str, object]],
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
    """Give every (tensor name, accumulator) pair the tensor's values, batch by batch.

    An accumulator is anything with `add(values)`; several may share a tensor.
    """
    model = _as_model(model)
    data = calibration_feeds(feeds, model)
    _check_tensors(model, {name: 0 for name, _ in accumulators})
    if not accumulators:
        return
    by_tensor: dict[str, list] = {}
    for name, accumulator in accumulators:
        by_tensor.setdefault(name, []).append(accumulator)
    input_names = {spec.name for spec in data.inputs}
    from_feeds = [name for name in by_tensor if name in input_names]
    fetched = [name for name in by_tensor if name not in input_names]
    elem_types, chunks = _passes(model, data, fetched, budget_bytes)
    for number, chunk in enumerate(chunks or [[]]):
        run = _probe(model, chunk, elem_types) if chunk else None
        for batch, feed in enumerate(data, start=1):
            if number == 0:
                for name in from_feeds:
                    for accumulator in by_tensor[name]:
                        accumulator.add(feed[name])
            if run is not None:
                for name, values in zip(chunk, run(feed, batch)):
                    for accumulator in by_tensor[name]:
                        accumulator.add(values)
        del run  # one session at a time


def collect_paired_stats(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds,
                         tensors: dict[str, tuple[int, np.ndarray | None]],
                         budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict[str, PairedStats]:
    """PairedStats of tensors present under the same name in both models ({name: (channel axis,
    reference positions the candidate kept or None)}), both run batch by batch on the same feeds."""
    reference, candidate = _as_model(reference), _as_model(candidate)
    data = calibration_feeds(feeds, reference)
    _check_tensors(reference, {name: axis for name, (axis, _) in tensors.items()})
    _check_tensors(candidate, {name: axis for name, (axis, _) in tensors.items()})
    accumulators = {name: PairedStats(axis, name, positions) for name, (axis, positions) in tensors.items()}
    names = list(tensors)
    if not names:
        return accumulators
    elem_types, chunks = _passes(reference, data, names, budget_bytes, models=2)
    for chunk in chunks:
        run_a, run_b = _probe(reference, chunk, elem_types), _probe(candidate, chunk, elem_types)
        for batch, feed in enumerate(data, start=1):
            for name, a, b in zip(chunk, run_a(feed, batch), run_b(feed, batch)):
                accumulators[name].add(a, b)
        del run_a, run_b
    return accumulators


def _passes(model: onnx.ModelProto, data: CalibrationData, names: list[str], budget_bytes: int,
            models: int = 1) -> tuple[dict, list[list[str]]]:
    """Element types of `names`, and the chunks of them fetched per pass over the data, so that
    one batch's extra outputs (from `models` models at once) stay within the budget."""
    elem_types, sizes = _tensor_sizes(model, data.first(), names)
    chunks = _chunks(names, {name: models * size for name, size in sizes.items()}, budget_bytes)
    if len(chunks) > 1 and data.one_shot:
        raise OnnxPruneError(f"{data.description}: {len(names)} tensors need {len(chunks)} passes to stay within "
                             f"{budget_bytes} bytes, and a one-shot iterator allows one; pass a list or a function "
                             "that returns a fresh iterator")
    return elem_types, chunks


def _check_tensors(model: onnx.ModelProto, tensors: dict[str, int]) -> None:
    known = {name for node in model.graph.node for name in node.output if name}
    known |= {inp.name for inp in model.graph.input} | {init.name for init in model.graph.initializer}
    for name, axis in tensors.items():
        if name not in known:
            raise OnnxPruneError(f"tensor {name!r}: not in the model's main graph")
        if not isinstance(axis, (int, np.integer)):
            raise OnnxPruneError(f"tensor {name!r}: channel axis {axis!r} is not an integer")


def _tensor_sizes(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]):
    """Element types and estimated bytes per batch of `names`, by shape inference at `feed`'s shapes.

    A tensor whose size stays unknown counts as the largest one known, to err on the safe side.
    """
    light = skeleton(model)
    fix_input_shapes(light, {name: list(value.shape) for name, value in feed.items()})
    del light.graph.value_info[:]  # stored shapes may be for another batch size
    infer_shapes(light)
    elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    shapes = {}
    for vi in itertools.chain(light.graph.input, light.graph.value_info, light.graph.output):
        tensor_type = vi.type.tensor_type
        if tensor_type.elem_type:
            elem_types[vi.name] = tensor_type.elem_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[vi.name] = [d.dim_value for d in tensor_type.shape.dim]
    for init in model.graph.initializer:
        elem_types[init.name] = init.data_type
        shapes[init.name] = list(init.dims)
    known = {name: _bytes(shapes[name], elem_types.get(name)) for name in shapes}
    fallback = max(itertools.chain(known.values(), (v.nbytes for v in feed.values())), default=0)
    return elem_types, {name: known.get(name, fallback) for name in names}


def _bytes(dims: list[int], elem_type: int | None) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize if elem_type else 4
    return math.prod(dims) * itemsize


def _chunks(names: list[str], sizes: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """Consecutive groups of `names` whose sizes add up to at most the budget (a larger one alone)."""
    chunks, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > budget_bytes:
            chunks.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    if current:
        chunks.append(current)
    return chunks


def _probe(model: onnx.ModelProto, names: list[str], elem_types: dict[str, int]):
    """A function running the model on a feed and returning the values of `names`.

    `model` is left equal to what it was, but its node messages are new objects: look nodes
    up again rather than holding on to them across a collection."""
    from .verify import session

    declared = {out.name for out in model.graph.output}
    added = [_output_info(name, elem_types.get(name)) for name in names if name not in declared]
    # The outputs are added to the model itself only while the session is built: a copy would
    # double the memory of a large model. Input dims are left free for the same time, and stored
    # shapes set aside: a model analysed at a fixed --input-shape still takes the calibration
    # batches the user's model takes. Nodes that the fetched tensors do not depend on are set
    # aside too: onnxruntime would run them all (and the graph outputs become just `names`).
    needed = _nodes_needed(model.graph, names)
    all_nodes = outputs = None
    if needed is not None:
        all_nodes = [_copy(node) for node in model.graph.node]
        outputs = [_copy(vi) for vi in model.graph.output]
        kept = [all_nodes[i] for i in needed]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        kept_outputs = [vi for vi in outputs if vi.name in set(names)]
        del model.graph.output[:]
        model.graph.output.extend(kept_outputs)
    model.graph.output.extend(added)
    inputs = [_copy(vi) for vi in model.graph.input]
    stored = [_copy(vi) for vi in model.graph.value_info]
    for i, vi in enumerate(model.graph.input):
        for j, dim in enumerate(vi.type.tensor_type.shape.dim):
            dim.dim_param = f"calibration_{i}_{j}"
    del model.graph.value_info[:]
    try:
        sess = session(model)
    except OnnxPruneError:
        raise
    except Exception as exc:
        raise OnnxPruneError(f"onnxruntime cannot load the model with calibration outputs "
                             f"({first_line(exc)})") from None
    finally:
        if added:
            del model.graph.output[len(model.graph.output) - len(added):]
        if all_nodes is not None:
            del model.graph.node[:]
            model.graph.node.extend(all_nodes)
            del model.graph.output[:]
            model.graph.output.extend(outputs)
        for vi, kept in zip(model.graph.input, inputs):
            vi.CopyFrom(kept)
        model.graph.value_info.extend(stored)

    def run(feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        try:
            return sess.run(names, feed)
        except Exception as exc:
            raise OnnxPruneError(f"onnxruntime failed on calibration batch {batch} ({first_line(exc)})") from None

    return run


def _copy(message):
    kept = type(message)()
    kept.CopyFrom(message)
    return kept


def _nodes_needed(graph: onnx.GraphProto, names: list[str]) -> list[int] | None:
    """Indices, in order, of the nodes that `names` depend on; None when that is all of them or
    when a node holds subgraphs (their outer-scope reads are not listed as inputs)."""
    producer = {}
    for index, node in enumerate(graph.node):
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            return None
        for out in node.output:
            producer[out] = index
    needed, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        stack.extend(producer[i] for i in graph.node[index].input if i in producer)
    if not needed or len(needed) == len(graph.node):  # only inputs/initializers, or everything
        return None
    return sorted(needed)


def _output_info(name: str, elem_type: int | None) -> onnx.ValueInfoProto:
    if not elem_type:
        return onnx.ValueInfoProto(name=name)  # onnxruntime infers what it is not told
    return onnx.helper.make_tensor_value_info(name, elem_type, None)


__all__ = ["CalibrationData", "ChannelStats", "GramStats", "ImageSpec", "InputSpec", "PairedStats", "PatchGramStats",
           "calibration_feeds", "collect_channel_stats", "collect_gram", "collect_grams", "collect_into",
           "collect_paired_stats", "load_calibration", "model_inputs",
           "MAGNITUDE_FALLBACK_NOTE"]
