"""Weights that stay on disk: pruning models larger than memory.

A model whose weights are in external data can be pruned without ever holding them all:
the model proto keeps a small stub for each external tensor (dims, type, and a reference
into this module's table), the graph reads a weight from its file only when a criterion
scores it, slicing only records which rows and columns stay, and the writer streams each
tensor, sliced, from the input's data file into the output's. At any time about one
weight is in memory (plus the largest of those a criterion scores together).

The stubs mean something only in this process: a model holding them is saved with
modelio.save_model (or PruneResult.save), which materialises each one as it writes it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

REF_KEY = "onnxprune_ref"  # external_data key of a stub: the entry of _TABLE it stands for
_STUB_LOCATION = "onnxprune-weights-on-disk"  # what other tools see, should a stub escape
_TABLE: dict[str, "DiskValues"] = {}
_refs = itertools.count()


@dataclass(frozen=True)
class _Source:
    path: Path
    offset: int
    dims: tuple
    data_type: int


class DiskValues(LazyValues):
    """A weight in a file, with the positions kept along some axes (applied when read)."""

    def __init__(self, source: _Source, takes: tuple = ()) -> None:
        # LazyValues reads a TensorProto; this reads the file itself, so it skips that __init__
        self.source = source
        self.takes = takes  # ((axis, positions), ...) in the order they were taken
        self.dtype = onnx.helper.tensor_dtype_to_np_dtype(source.data_type)
        shape = list(source.dims)
        for axis, positions in takes:
            shape[axis] = len(positions)
        self.shape = tuple(shape)
        self.ref = str(next(_refs))
        _TABLE[self.ref] = self

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def load(self) -> np.ndarray:
        count = int(np.prod(self.source.dims, dtype=np.int64))
        value = np.fromfile(self.source.path, dtype=self.dtype, count=count, offset=self.source.offset)
        if value.size != count:
            raise OSError(f"{self.source.path}: short read of a weight at byte {self.source.offset}")
        value = value.reshape(self.source.dims)
        for axis, positions in self.takes:
            value = np.take(value, positions, axis=axis)
        return value

    def take(self, positions: np.ndarray, axis: int) -> "DiskValues":
        """As ndarray.take, recorded: the positions are taken when the weight is read."""
        return DiskValues(self.source, self.takes + ((axis, np.asarray(positions, dtype=np.int64)),))

    @property
    def tensor(self) -> onnx.TensorProto:
        """The stub the exported model holds (graphsurgeon exports LazyValues through this)."""
        return stub(self)

    def __repr__(self):  # graphsurgeon logs constants by repr
        return f"DiskValues({self.source.path.name}@{self.source.offset}, shape={self.shape})"


def stub(values: DiskValues, name: str = "") -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=values.source.data_type, dims=values.shape,
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", _STUB_LOCATION), ("length", str(values.nbytes)), (REF_KEY, values.ref)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def values_of(tensor: onnx.TensorProto) -> DiskValues | None:
    """The on-disk weight a stub stands for, or None for any other tensor."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    for entry in tensor.external_data:
        if entry.key == REF_KEY:
            return _TABLE.get(entry.value)
    return None


def has_disk_weights(model: onnx.ModelProto) -> bool:
    return any(values_of(t) is not None for t in model.graph.initializer)


def disk_bytes(model: onnx.ModelProto) -> int:
    return sum(v.nbytes for v in map(values_of, model.graph.initializer) if v is not None)


def keep_on_disk(model: onnx.ModelProto, base: Path) -> int:
    """Replace the model's external tensors (read with load_external_data=False, locations
    already checked) by stubs of weights read from their files on demand. Returns the bytes."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        source = _Source((base / info["location"]).resolve(), int(info.get("offset", 0)), tuple(tensor.dims),
                         tensor.data_type)
        values = DiskValues(source)
        length = int(info.get("length", values.nbytes) or values.nbytes)
        if length != values.nbytes or tensor.data_type in _UNSTREAMABLE:
            raise ValueError(f"initializer {tensor.name!r}: {length} bytes of external data for "
                             f"{values.nbytes} bytes of {onnx.TensorProto.DataType.Name(tensor.data_type)}")
        tensor.CopyFrom(stub(values, tensor.name))
        total += values.nbytes
    return total


# Types numpy reads with another layout than ONNX stores (strings; sub-byte and bfloat types).
_UNSTREAMABLE = {onnx.TensorProto.STRING, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT4,
                 onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
                 onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ}


def attach_to_graph(graph: gs.Graph) -> bool:
    """graphsurgeon imported each stub as LazyValues of the stub: point it at the weight instead.
    Returns whether the graph has weights on disk."""
    found = False
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, DiskValues):
            found = True
        elif isinstance(values, LazyValues):
            weight = values_of(values.tensor)
            if weight is not None:
                tensor._values = weight
                found = True
    return found


def on_disk(tensor: gs.Tensor) -> DiskValues | None:
    values = getattr(tensor, "_values", None)
    return values if isinstance(values, DiskValues) else None


def write_tensor_data(values: DiskValues, out) -> int:
    """Write the weight's kept values to the open file `out`; returns the bytes written."""
    value = np.ascontiguousarray(values.load())
    out.write(memoryview(value).cast("B"))
    return value.nbytes
