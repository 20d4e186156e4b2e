"""Reading calibration data from files: arrays, folders of them, images.

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
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import OnnxPruneError, OptionError, first_line
from ..core.files import regular_file
from .data import CalibrationData, InputSpec, as_model, model_inputs, quoted_names
from .images import IMAGE_SUFFIXES, ImageSpec, image_data

ARRAY_SUFFIXES = (".npz", ".npy")
DEFAULT_BATCH_SIZE = 8


def load_calibration(path, model: onnx.ModelProto | str | Path, image_spec: ImageSpec | str | None = None,
                     limit: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     allow_nonfinite: bool = False) -> CalibrationData:
    """Calibration data from an .npz/.npy file or a folder of them or of images (see the module doc)."""
    model = as_model(model)
    if batch_size < 1:
        raise OnnxPruneError(f"calibration batch size {batch_size}: give a positive number")
    inputs = model_inputs(model)
    path = Path(path)
    if not path.exists():
        raise OnnxPruneError(f"{path}: no such file or folder")
    if path.is_dir():
        arrays, images = _folder_files(path)
        if images:
            return image_data(inputs, images, path, image_spec, limit, batch_size, allow_nonfinite)
        if image_spec is not None:
            raise OptionError("image_spec", None, f"{path} holds array files, and image preprocessing applies "
                                 "to image files only; drop it")
        files, description = arrays, f"{path} ({len(arrays)} array files)"
    elif path.suffix.lower() in ARRAY_SUFFIXES:
        if image_spec is not None:
            raise OptionError("image_spec", None, f"{path} holds arrays, and image preprocessing applies "
                                 "to image files only; drop it")
        files, description = [regular_file(path, "calibration data")], str(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        return image_data(inputs, [regular_file(path, "calibration image")], path, image_spec, limit, batch_size,
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
                                     f"{quoted_names(s.name for s in inputs)}: use an .npz keyed by input name")
            return {inputs[0].name: np.load(file, mmap_mode="r", allow_pickle=False)}
        with np.load(file, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if len(inputs) == 1 and len(keys) == 1:  # np.savez(f, x) for a one-input model
                return {inputs[0].name: npz[keys[0]]}
            for spec in inputs:
                if spec.name not in keys:
                    raise OnnxPruneError(f"{file}: no array for input {spec.name!r} (found: {quoted_names(keys)})")
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
