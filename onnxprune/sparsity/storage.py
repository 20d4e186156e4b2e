"""Sparse storage: weights with many zeros written as ONNX `sparse_initializer`s.

ONNX stores a sparse tensor as coordinates (COO): the nonzero values, and their positions as
int64 (the onnx checker refuses any other index type), here one linear position each. A
nonzero then costs its value plus 8 bytes, so a float32 weight gets smaller only with more
than 2/3 zeros (float16: 4/5); below that a tensor stays dense. onnxruntime turns sparse
initializers back into dense tensors when it loads a model: the file shrinks, memory and
speed do not change (measured, docs/benchmarks.md).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

INDEX_BYTES = 8  # int64 positions


def sparse_bytes(value: np.ndarray) -> int:
    """Bytes of `value`'s values and positions stored as a sparse tensor."""
    nonzero = int(np.count_nonzero(value))
    return nonzero * (value.dtype.itemsize + INDEX_BYTES)


def storage_estimate(values: dict[str, np.ndarray]) -> dict:
    """What storing each of `values` sparse would give, where that is smaller than dense."""
    dense = sum(v.nbytes for v in values.values())
    smaller = {name: sparse_bytes(v) for name, v in values.items() if sparse_bytes(v) < v.nbytes}
    stored = sum(smaller.values()) + sum(v.nbytes for name, v in values.items() if name not in smaller)
    return {"tensors": len(values), "tensors_smaller_sparse": len(smaller), "dense_bytes": dense,
            "bytes_with_sparse": stored}


def store_sparse(model: onnx.ModelProto, names) -> dict[str, tuple[int, int]]:
    """Move the initializers `names` into graph.sparse_initializer where that makes them
    smaller (in place). Returns {name: (dense bytes, sparse bytes)} of those moved."""
    graph = model.graph
    inputs = {i.name for i in graph.input}  # an initializer that is also an input stays as it is
    wanted = set(names) - inputs
    moved, gone = {}, []
    for index, tensor in enumerate(graph.initializer):
        if tensor.name not in wanted or tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        value = numpy_helper.to_array(tensor)
        size = sparse_bytes(value)
        if size >= value.nbytes:
            continue
        flat = value.reshape(-1)
        positions = np.flatnonzero(flat)
        sparse = onnx.helper.make_sparse_tensor(numpy_helper.from_array(flat[positions], tensor.name),
                                                numpy_helper.from_array(positions.astype(np.int64), tensor.name
                                                                        + "_positions"), list(value.shape))
        graph.sparse_initializer.append(sparse)
        moved[tensor.name] = (value.nbytes, size)
        gone.append(index)
    for index in reversed(gone):
        del graph.initializer[index]
    return moved


def densify(model: onnx.ModelProto) -> int:
    """Turn the main graph's sparse initializers into dense ones, in place (as onnxruntime does
    on loading), so that the rest of the tool sees ordinary weights. Returns how many."""
    graph = model.graph
    count = len(graph.sparse_initializer)
    for sparse in graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        positions = numpy_helper.to_array(sparse.indices).astype(np.int64)
        dims = tuple(sparse.dims)
        dense = np.zeros(dims, dtype=values.dtype)
        if positions.ndim == 2:  # [NNZ, rank] coordinates
            positions = np.ravel_multi_index(tuple(positions.T), dims) if positions.size else positions.reshape(-1)
        dense.reshape(-1)[positions] = values
        graph.initializer.append(numpy_helper.from_array(dense, sparse.values.name))
    del graph.sparse_initializer[:]
    return count
