"""Training data: batches of (feeds, labels) for fine-tuning one model.

``load_training_data(source, model, labels="labels", ...)`` reads:

* an ``.npz`` file holding one array per model input, keyed by input name, samples stacked on
  axis 0, plus the labels under the key ``labels`` (or the key given): class ids for
  cross-entropy, or float targets for mse. Without that key the data is unlabelled (fine for
  distillation from a teacher).
* a folder of such ``.npz`` files, concatenated in file-name order.
* an image folder with one subfolder per class (the class ids follow the subfolders' names in
  sorted order), or a folder of images alone (unlabelled); images need a preprocessing spec,
  as for calibration (``--calib-images``).
* from Python, any re-iterable of ``(feeds, labels)`` pairs or of feed dicts (unlabelled),
  used as the batches they are. Arrays are held in memory; images are read batch by batch.

Every batch is checked against the model's inputs as calibration data is (types cast when
nothing is lost, dims checked, NaN/inf refused). Arrays and images are shuffled each epoch
from the seed; a model with a fixed batch dim is fed batches of exactly that size.
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from ..calibration.data import InputSpec, conform, model_inputs, quoted_names
from ..calibration.images import IMAGE_SUFFIXES, ImageSpec, image_array
from ..core.errors import OnnxPruneError, first_line
from ..core.files import regular_file

DEFAULT_LABELS = "labels"


class TrainingData:
    """Batches of (feeds, labels or None) for one model, epoch after epoch."""

    def __init__(self, inputs: list[InputSpec], description: str, has_labels: bool, samples: int | None,
                 batch_size: int, notes=()) -> None:
        self.inputs = inputs
        self.description = description
        self.has_labels = has_labels
        self.samples = samples
        self.batch_size = batch_size
        self.notes = list(notes)
        self.drop_last = False  # every batch full (a training graph built at a fixed batch size)

    def batches_per_epoch(self) -> int | None:
        raise NotImplementedError

    def sample_dims(self) -> dict[str, tuple] | None:
        """Each input's dims after the batch axis when every sample has the same (None if not)."""
        raise NotImplementedError

    def epoch(self, number: int, seed: int, shuffle: bool = True) -> Iterator[tuple[dict, np.ndarray | None]]:
        raise NotImplementedError

    def _conform(self, feed, labels, source: str):
        feed = conform(feed, self.inputs, source)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.dtype.kind == "f" and not np.isfinite(labels).all():
                raise OnnxPruneError(f"{source}: the labels hold NaN/inf")
        return feed, labels


class ArrayData(TrainingData):
    """Samples stacked on axis 0 of in-memory arrays."""

    def __init__(self, inputs, arrays: dict[str, np.ndarray], labels: np.ndarray | None, description: str,
                 batch_size: int) -> None:
        count = {len(a) for a in arrays.values()} | ({len(labels)} if labels is not None else set())
        if len(count) != 1:
            sizes = ", ".join(f"{name!r}: {len(a)}" for name, a in arrays.items())
            extra = f", labels: {len(labels)}" if labels is not None else ""
            raise OnnxPruneError(f"{description}: arrays disagree on the number of samples ({sizes}{extra})")
        samples = count.pop()
        batch_size, notes = _batch_size(inputs, batch_size, samples, description)
        super().__init__(inputs, description, labels is not None, samples, batch_size, notes)
        self.arrays, self.labels = arrays, labels

    def batches_per_epoch(self) -> int:
        whole = self.drop_last or _fixed_batch(self.inputs)
        return self.samples // self.batch_size if whole else -(-self.samples // self.batch_size)

    def epoch(self, number: int, seed: int, shuffle: bool = True):
        order = _order(self.samples, number, seed, shuffle)
        for batch in range(self.batches_per_epoch()):
            take = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            feed = {name: array[take] for name, array in self.arrays.items()}
            labels = self.labels[take] if self.labels is not None else None
            yield self._conform(feed, labels, f"{self.description} (batch {batch + 1})")

    def sample_dims(self) -> dict[str, tuple]:
        return {name: tuple(array.shape[1:]) for name, array in self.arrays.items()}


class BlockData(TrainingData):
    """Blocks of arrays whose samples differ in dims (token sequences of different lengths, one
    .npz per length): every batch comes from one block; the batches of all blocks are shuffled
    together each epoch."""

    def __init__(self, blocks: list[ArrayData], description: str) -> None:
        first = blocks[0]
        notes = [note for block in blocks for note in block.notes]
        super().__init__(first.inputs, description, first.has_labels, sum(b.samples for b in blocks),
                         first.batch_size, notes)
        self.blocks = blocks

    def batches_per_epoch(self) -> int:
        for block in self.blocks:
            block.drop_last = self.drop_last
        return sum(block.batches_per_epoch() for block in self.blocks)

    def epoch(self, number: int, seed: int, shuffle: bool = True):
        self.batches_per_epoch()  # hands drop_last on
        batches = [(index, batch) for index, block in enumerate(self.blocks)
                   for batch in range(block.batches_per_epoch())]
        if shuffle:
            batches = [batches[i] for i in np.random.default_rng([seed, number, 1]).permutation(len(batches))]
        streams = [block.epoch(number, seed, shuffle) for block in self.blocks]
        cached: dict[int, list] = {}
        for index, _ in batches:  # each block's batches come in its own order; blocks interleave
            pending = cached.setdefault(index, [])
            if not pending:
                pending.append(next(streams[index]))
            yield pending.pop()

    def sample_dims(self) -> None:
        return None


class ImageData(TrainingData):
    """Images read batch by batch; labels from their class subfolders, if any."""

    def __init__(self, inputs, images: list[Path], classes: list[int] | None, spec: ImageSpec, description: str,
                 batch_size: int, class_names: list[str] | None = None) -> None:
        if len(inputs) != 1:
            raise OnnxPruneError(f"{description}: image data needs a model with one input; this one has "
                                 f"{quoted_names(s.name for s in inputs)}")
        batch_size, notes = _batch_size(inputs, batch_size, len(images), description)
        super().__init__(inputs, description, classes is not None, len(images), batch_size, notes)
        self.images, self.classes, self.class_names = images, classes, class_names
        self.spec = spec.resolved(inputs[0])

    def batches_per_epoch(self) -> int:
        whole = self.drop_last or _fixed_batch(self.inputs)
        return self.samples // self.batch_size if whole else -(-self.samples // self.batch_size)

    def epoch(self, number: int, seed: int, shuffle: bool = True):
        order = _order(self.samples, number, seed, shuffle)
        name = self.inputs[0].name
        for batch in range(self.batches_per_epoch()):
            take = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            feed = {name: np.stack([image_array(self.images[i], self.spec) for i in take])}
            labels = np.asarray([self.classes[i] for i in take], np.int64) if self.classes is not None else None
            yield self._conform(feed, labels, f"{self.images[take[0]]}")


    def sample_dims(self) -> dict[str, tuple]:
        feed, _ = next(self.epoch(0, 0, shuffle=False))
        return {name: tuple(value.shape[1:]) for name, value in feed.items()}


class GivenBatches(TrainingData):
    """Batches from Python, as given: (feeds, labels) pairs or feed dicts."""

    def __init__(self, inputs, batches: Iterable, description: str = "training batches") -> None:
        if iter(batches) is batches:
            raise OnnxPruneError(f"{description}: a one-shot iterator cannot be read once per epoch; pass a list "
                                 "(or any re-iterable) of (feeds, labels) pairs")
        first = next(iter(batches), None)
        if first is None:
            raise OnnxPruneError(f"{description}: no batches")
        has_labels = not isinstance(first, Mapping) and _pair(first, description)[1] is not None
        count = len(batches) if hasattr(batches, "__len__") else None
        super().__init__(inputs, description, has_labels, None, 0)
        self.given = batches
        self.count = count

    def batches_per_epoch(self) -> int | None:
        return self.count

    def uniform_batch(self) -> int | None:
        """The batch size when every batch has the same, else None."""
        sizes = {len(next(iter((item if isinstance(item, Mapping) else _pair(item, self.description)[0]).values())))
                 for item in self.given}
        return sizes.pop() if len(sizes) == 1 else None

    def sample_dims(self) -> dict[str, tuple] | None:
        seen = None
        for item in self.given:
            feed = item if isinstance(item, Mapping) else _pair(item, self.description)[0]
            dims = {name: tuple(np.shape(value)[1:]) for name, value in feed.items()}
            if seen is not None and dims != seen:
                return None
            seen = dims
        return seen

    def epoch(self, number: int, seed: int, shuffle: bool = True):
        for index, item in enumerate(self.given, start=1):
            feed, labels = (item, None) if isinstance(item, Mapping) else _pair(item, self.description)
            if (labels is not None) != self.has_labels:
                raise OnnxPruneError(f"{self.description} (batch {index}): some batches have labels and some do not")
            yield self._conform(feed, labels, f"{self.description} (batch {index})")


def _pair(item, description: str):
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], Mapping):
        raise OnnxPruneError(f"{description}: expected (feeds, labels) pairs or feed dicts, got "
                             f"{type(item).__name__}")
    return item[0], item[1]


def _order(samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(samples)
    return np.random.default_rng([seed, epoch]).permutation(samples)


def _fixed_batch(inputs: list[InputSpec]) -> int | None:
    fixed = {spec.fixed_batch for spec in inputs if spec.fixed_batch is not None}
    return fixed.pop() if len(fixed) == 1 else None


def _batch_size(inputs, batch_size: int, samples: int, description: str) -> tuple[int, list[str]]:
    fixed = _fixed_batch(inputs)
    notes = []
    if fixed is not None and fixed != batch_size:
        notes.append(f"batches of {fixed}: the model's batch dim is fixed at {fixed} (batch size {batch_size} "
                     "not used)")
        batch_size = fixed
    if fixed is not None and samples % fixed:
        notes.append(f"{samples % fixed} of {samples} samples left out of every epoch: the model's batch is fixed "
                     f"at {fixed}")
    if samples < (fixed or 1):
        raise OnnxPruneError(f"{description}: {samples} samples, fewer than the model's fixed batch of {fixed}")
    return batch_size, notes


def load_training_data(source, model: onnx.ModelProto, labels: str = DEFAULT_LABELS, image_spec=None,
                       batch_size: int = 32, limit: int | None = None) -> TrainingData:
    """Training (or validation) data from a path or Python batches; see the module doc."""
    if isinstance(source, TrainingData):
        return source
    inputs = model_inputs(model)
    if not isinstance(source, (str, Path)):
        if isinstance(source, Mapping) or not isinstance(source, Iterable):
            raise OnnxPruneError("training data: expected a path, or a list of (feeds, labels) pairs or feed dicts")
        return GivenBatches(inputs, source)
    path = Path(source)
    if not path.exists():
        raise OnnxPruneError(f"{path}: no such file or folder")
    if path.is_dir():
        subfolders = sorted(p for p in path.iterdir() if p.is_dir())
        files = sorted(p for p in path.iterdir() if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        arrays = [p for p in files if p.suffix.lower() == ".npz"]
        if subfolders and not arrays and not images:
            return _class_folders(inputs, path, subfolders, image_spec, batch_size, limit)
        if images and not arrays:
            images = images[:limit] if limit else images
            return ImageData(inputs, images, None, _spec(image_spec, path), f"{path} ({len(images)} images, "
                             "unlabelled)", batch_size)
        if not arrays:
            raise OnnxPruneError(f"{path}: no .npz files, images, or class subfolders of images")
        return _arrays(inputs, arrays, labels, f"{path} ({len(arrays)} .npz files)", batch_size, limit)
    if path.suffix.lower() != ".npz":
        raise OnnxPruneError(f"{path}: expected an .npz file, or a folder of them or of class subfolders of images")
    return _arrays(inputs, [regular_file(path, "training data")], labels, str(path), batch_size, limit)


def _spec(image_spec, where: Path) -> ImageSpec:
    if image_spec is None:
        raise OnnxPruneError(f"{where}: images need a preprocessing spec, e.g. "
                             "'size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=NCHW'")
    return ImageSpec.parse(image_spec) if isinstance(image_spec, str) else image_spec


def _class_folders(inputs, path: Path, subfolders: list[Path], image_spec, batch_size: int, limit) -> ImageData:
    images, classes, names = [], [], []
    for folder in subfolders:
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            continue
        names.append(folder.name)
        images += found
        classes += [len(names) - 1] * len(found)
    if not images:
        raise OnnxPruneError(f"{path}: its subfolders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    if limit:  # a spread over the classes, not the first class only
        keep = np.sort(np.random.default_rng(0).permutation(len(images))[:limit])
        images, classes = [images[i] for i in keep], [classes[i] for i in keep]
    description = f"{path} ({len(images)} images in {len(names)} classes)"
    return ImageData(inputs, images, classes, _spec(image_spec, path), description, batch_size, names)


def _arrays(inputs, files: list[Path], labels_key: str, description: str, batch_size: int, limit) -> ArrayData:
    parts: dict[str, list] = {spec.name: [] for spec in inputs}
    label_parts, with_labels = [], None
    for file in files:
        try:
            with np.load(file, allow_pickle=False) as npz:
                keys = list(npz.keys())
                for spec in inputs:
                    if spec.name not in keys:
                        raise OnnxPruneError(f"{file}: no array for input {spec.name!r} (found: {quoted_names(keys)})")
                    parts[spec.name].append(npz[spec.name])
                has = labels_key in keys
                if with_labels is not None and has != with_labels:
                    raise OnnxPruneError(f"{file}: some files have labels {labels_key!r} and some do not")
                with_labels = has
                if has:
                    label_parts.append(npz[labels_key])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise OnnxPruneError(f"{file}: not a readable .npz file ({first_line(exc)})") from None
    for spec in inputs:
        rank = None if spec.dims is None else len(spec.dims)
        for part, file in zip(parts[spec.name], files):
            if rank is not None and part.ndim != rank:
                raise OnnxPruneError(f"{file}: input {spec.name!r} is {spec.describe()}: expected samples stacked on "
                                     f"axis 0 (rank {rank}), got shape {list(part.shape)}")
    # files whose samples have the same dims are joined; different dims make separate blocks
    by_dims: dict[tuple, list[int]] = {}
    for index in range(len(files)):
        by_dims.setdefault(tuple(parts[spec.name][index].shape[1:] for spec in inputs), []).append(index)
    blocks, left = [], limit
    for indices in by_dims.values():
        arrays = {spec.name: np.concatenate([parts[spec.name][i] for i in indices]) for spec in inputs}
        label_array = np.concatenate([label_parts[i] for i in indices]) if with_labels else None
        if left is not None:
            arrays = {name: a[:left] for name, a in arrays.items()}
            label_array = label_array[:left] if label_array is not None else None
            left -= len(next(iter(arrays.values())))
        if len(next(iter(arrays.values()))):
            blocks.append(ArrayData(inputs, arrays, label_array, description, batch_size))
        if left is not None and left <= 0:
            break
    if len(blocks) == 1:
        return blocks[0]
    return BlockData(blocks, f"{description}, {len(blocks)} sample shapes")
