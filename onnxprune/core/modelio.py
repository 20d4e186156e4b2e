"""Loading and saving models: external data, atomic writes (files.py), never touching the input."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .disk_weights import disk_bytes, keep_on_disk, values_of, write_tensor_data
from .errors import OnnxPruneError, first_line
from .files import RunFiles, available_memory, mib, regular_file, write_files
from .progress import log, progress_bar

# protobuf refuses to serialise a single message above 2 GiB; stay well clear of it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def default_output_path(input_path: str | os.PathLike) -> Path:
    p = Path(input_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".pruned.onnx")


@dataclass
class ModelFile:
    """A model read from disk, with every file it was read from (the .onnx and its external data)."""

    path: Path
    model: onnx.ModelProto
    files: list[Path] = field(default_factory=list)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    return read_model(path).model


def read_model(path: str | os.PathLike, weights: str = "memory") -> ModelFile:
    """Load a model with its external data, refusing in one line what cannot be loaded safely:
    anything but a regular file, more data than memory or protobuf can take, external data
    that is missing, short, or outside the model's folder.

    `weights`: 'memory' loads the external data; 'disk' leaves it in its files, read tensor by
    tensor when needed (disk_weights); 'auto' does that only when loading it would not fit.
    """
    p = regular_file(path)
    size = p.stat().st_size
    if size >= PROTOBUF_LIMIT:
        raise OnnxPruneError(f"{p}: {mib(size)} in one protobuf file, above the 2 GiB protobuf can read; "
                             "models this large keep their weights in external data")
    _check_memory(p, size)
    log.info("reading %s (%s)", p, mib(size))
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise OnnxPruneError(f"{p}: not an ONNX model ({first_line(exc)})") from None
    if not model.graph.node:
        raise OnnxPruneError(f"{p}: not an ONNX model (no graph nodes)")
    external = _external_files(model, p.parent)
    if not external:
        return ModelFile(p, model, [p])
    data = sum(f.stat().st_size for f in external)
    if weights == "disk" or (weights == "auto" and not weights_fit_in_memory(data)):
        try:
            kept = keep_on_disk(model, p.parent)
        except ValueError as exc:
            raise OnnxPruneError(f"{p}: {exc}") from None
        log.info("%s of weights stay on disk, read tensor by tensor", mib(kept))
        return ModelFile(p, model, [p, *external])
    _check_memory(p, size + data)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except Exception as exc:  # onnx raises several types for unreadable external data
        raise OnnxPruneError(f"{p}: cannot read its external data ({first_line(exc)})") from None
    return ModelFile(p, model, [p, *external])


def weights_fit_in_memory(data_bytes: int) -> bool:
    """Whether pruning with the weights loaded fits: the original, the pruned copy and an
    onnxruntime session of each are held at once (measured: a peak of 4.2 times the weights
    on a 4.4 GB decoder, docs/benchmarks.md "Models larger than memory")."""
    available = available_memory()
    return available is None or 4.5 * data_bytes <= available


PROTOBUF_LIMIT = 2**31


def _check_memory(path: Path, size: int) -> None:
    # Parsing holds the bytes and the parsed message at once: about twice the file.
    available = available_memory()
    if available is not None and 2 * size > available:
        raise OnnxPruneError(f"{path}: {mib(size)} to load, and this machine has {mib(available)} of memory "
                             "available (about twice the model is needed; --weights disk keeps external "
                             "data on disk)")


def _external_files(model: onnx.ModelProto, base: Path) -> list[Path]:
    """The external data files the model's tensors point to, each checked: inside the model's
    folder, a regular file, long enough for every tensor read from it."""
    base_resolved = base.resolve()
    needed: dict[Path, tuple[int, str]] = {}
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base_resolved / loc).resolve()
        if not loc:
            raise OnnxPruneError(f"initializer {tensor.name!r}: stored as external data without a location")
        if os.path.isabs(loc) or base_resolved not in target.parents:
            raise OnnxPruneError(
                f"initializer {tensor.name!r}: external data location {loc!r} escapes the model's folder"
            )
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise OnnxPruneError(f"initializer {tensor.name!r}: external data offset/length are not "
                                 "numbers") from None
        file = base / loc
        if file not in needed or end > needed[file][0]:
            needed[file] = (end, tensor.name)
    for file, (end, name) in needed.items():
        regular_file(file, f"external data of initializer {name!r}:")
        if end > file.stat().st_size:
            raise OnnxPruneError(f"external data of initializer {name!r}: {file} holds {file.stat().st_size} "
                                 f"bytes, the model reads up to byte {end}")
    return list(needed)


def output_files(out: str | os.PathLike, model: onnx.ModelProto) -> list[Path]:
    """The files save_model writes for `model` at `out` (with external data when it is large)."""
    out = Path(out)
    if payload_bytes(model) > EXTERNAL_DATA_THRESHOLD or disk_bytes(model):
        return [out, out.with_name(out.name + ".data")]
    return [out]


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, input_path=None, protect=()) -> Path:
    """Write `model` to `path` atomically; external data is used above ~2 GB.

    Refuses to write over the model at `input_path` or any of its external data files, and
    over any of the (role, path) pairs in `protect` (RunFiles.reads).
    """
    out = Path(path)
    targets = output_files(out, model)
    log.info("writing %s", ", ".join(str(t) for t in targets))
    if input_path is not None or protect:
        files = RunFiles(reads=list(protect))
        for f in _files_of(input_path) if input_path is not None else ():
            files.read("input model", f)
        for target in targets:
            files.write("output", target)
        try:
            files.check()
        except OnnxPruneError as exc:
            raise OnnxPruneError(f"{exc} (refusing to overwrite the input model)") from None
    if len(targets) == 1:
        write_files(targets, lambda staged: onnx.save_model(model, str(staged[0])), needed_bytes=model_bytes(model))
        return out
    data = targets[1]

    def write(staged: list[Path]) -> None:  # the data first, so that the model never points at a missing file
        write_with_external_data(model, staged[1], data.name)

    write_files([data, out], write, needed_bytes=payload_bytes(model))
    return out


def _files_of(input_path) -> list[Path]:
    """The input model's file and its external data files (read without loading the data)."""
    p = Path(input_path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # not a model: only the path itself can be protected
        return [p]
    return [p, *_external_files(model, p.parent)]


def copy_without_initializers(model: onnx.ModelProto, keep=lambda tensor: False) -> onnx.ModelProto:
    """A copy of everything but the initializers (those for which `keep` is true are copied too).

    Copying a ModelProto whole would duplicate every weight; this copies the structure only.
    """
    light = onnx.ModelProto()
    _copy_fields_except(model, light, "graph")
    _copy_fields_except(model.graph, light.graph, "initializer")
    light.graph.initializer.extend(t for t in model.graph.initializer if keep(t))
    return light


def _copy_fields_except(source, target, skipped: str) -> None:
    """Copy every set field of a protobuf message but one (the big one: weights, raw bytes)."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skipped:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(target, descriptor.name, value)
        elif descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        else:  # a singular message, e.g. TensorProto.segment
            getattr(target, descriptor.name).CopyFrom(value)


def write_with_external_data(model: onnx.ModelProto, path: Path, data_name: str,
                             min_bytes: int = 1024) -> None:
    """Save with initializers of at least `min_bytes` in one external file, next to `path`.

    Unlike onnx.save_model(save_as_external_data=True) this leaves `model` untouched and
    copies no tensor payload in memory: the light parts are copied, the payloads are
    written straight from the original tensors.
    """
    light = copy_without_initializers(model)
    graph = model.graph
    offset = 0
    streamed = disk_bytes(model)  # weights read, sliced and written one by one: that takes a while
    bar = progress_bar("writing weights", total=streamed, unit="B") if streamed else None
    with open(path.parent / data_name, "wb") as data:
        for tensor in graph.initializer:
            on_disk = values_of(tensor)  # a weight still in the input's data file: read, sliced, written
            if on_disk is None:
                raw = tensor.raw_data if tensor.HasField("raw_data") else None
                if raw is None and tensor.data_location != onnx.TensorProto.EXTERNAL:
                    raw = onnx.numpy_helper.to_array(tensor).astype(
                        onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).tobytes()
                if raw is None or len(raw) < min_bytes:
                    light.graph.initializer.append(tensor)
                    continue
            pad = (-offset) % 4096  # page-aligned, so runtimes can map the file
            data.write(b"\0" * pad)
            offset += pad
            if on_disk is not None:
                length = write_tensor_data(on_disk, data)
                bar.update(length)
            else:
                length = data.write(raw)
            light.graph.initializer.append(external_stub(tensor, data_name, offset, length))
            offset += length
    if bar is not None:
        bar.close()
    with open(path, "wb") as f:
        f.write(light.SerializeToString())


def external_stub(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    """An initializer that points at `length` bytes at `offset` of the file `location`."""
    stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                            data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data (cheap: no serialisation); decides on external data.
    Weights kept on disk count with their size."""
    total = disk_bytes(model)
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size in bytes, as ByteSize() gives it, but without serializing the weights.

    protobuf's python ByteSize() serializes the whole message (over a second for a
    BERT-base-sized model, and refused above 2 GiB). The weights' raw_data are bytes fields
    whose encoded size is known from their length, so only the structure is serialized: the
    model without initializers, and each initializer without its raw_data.
    """
    light = copy_without_initializers(model)
    light_graph = light.graph.ByteSize()
    graph = light_graph + sum(_field_bytes(_tensor_bytes(t)) for t in model.graph.initializer)
    return light.ByteSize() - _field_bytes(light_graph) + _field_bytes(graph) + disk_bytes(model)


def _varint_bytes(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def _field_bytes(payload: int) -> int:
    """A length-delimited field: a one-byte tag (field numbers below 16), the length, the payload.
    Holds for GraphProto.initializer (5), ModelProto.graph (7) and TensorProto.raw_data (9)."""
    return 1 + _varint_bytes(payload) + payload


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    stub = onnx.TensorProto()
    _copy_fields_except(tensor, stub, "raw_data")
    return stub.ByteSize() + _field_bytes(len(tensor.raw_data))
