"""Loading and saving models: external data, atomic writes, never touching the input."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxPruneError, first_line

# protobuf refuses to serialise a single message above 2 GiB; stay well clear of it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def default_output_path(input_path: str | os.PathLike) -> Path:
    p = Path(input_path)
    stem = p.name[: -len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".pruned.onnx")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    p = Path(path)
    if not p.exists():
        raise OnnxPruneError(f"{p}: no such file")
    if p.is_dir():
        raise OnnxPruneError(f"{p}: is a directory, expected an .onnx file")
    if not os.access(p, os.R_OK):
        raise OnnxPruneError(f"{p}: not readable")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise OnnxPruneError(f"{p}: not an ONNX model ({first_line(exc)})") from None
    if not model.graph.node:
        raise OnnxPruneError(f"{p}: not an ONNX model (no graph nodes)")
    _check_external_locations(model, p.parent)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
    except (OSError, ValueError) as exc:
        raise OnnxPruneError(f"{p}: cannot read its external data ({first_line(exc)})") from None
    return model


def _check_external_locations(model: onnx.ModelProto, base: Path) -> None:
    base = base.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if os.path.isabs(loc) or base not in target.parents:
            raise OnnxPruneError(
                f"initializer {tensor.name!r}: external data location {loc!r} escapes the model's folder"
            )


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, input_path=None) -> Path:
    """Write `model` to `path` atomically; external data is used above ~2 GB."""
    out = Path(path)
    if input_path is not None and out.resolve() == Path(input_path).resolve():
        raise OnnxPruneError(f"{out}: refusing to overwrite the input model; choose another -o")
    if out.is_dir():
        raise OnnxPruneError(f"{out}: is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise OnnxPruneError(f"{parent}: output folder does not exist")
    large = payload_bytes(model) > EXTERNAL_DATA_THRESHOLD
    staging = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=parent))
    try:
        staged = staging / out.name
        if large:
            data_name = out.name + ".data"
            write_with_external_data(model, staged, data_name)
            os.replace(staging / data_name, parent / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, out)
    except OSError as exc:
        raise OnnxPruneError(f"{out}: cannot write ({first_line(exc)})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


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
    for field, value in source.ListFields():
        if field.name == skipped:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(target, field.name, value)
        elif field.is_repeated:
            getattr(target, field.name).extend(value)
        else:  # a singular message, e.g. TensorProto.segment
            getattr(target, field.name).CopyFrom(value)


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
    with open(path.parent / data_name, "wb") as data:
        for tensor in graph.initializer:
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
            data.write(raw)
            stub = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                    data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
            light.graph.initializer.append(stub)
            offset += len(raw)
    with open(path, "wb") as f:
        f.write(light.SerializeToString())


def payload_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data (cheap: no serialisation); decides on external data."""
    total = 0
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
    return light.ByteSize() - _field_bytes(light_graph) + _field_bytes(graph)


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
