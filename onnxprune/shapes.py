"""Shape inference, and fixing dynamic input dims (`--input-shape name:1,3,224,224`)."""
from __future__ import annotations

import onnx

from .errors import OnnxPruneError

DEFAULT_DYNAMIC_DIM = 1  # batch-like dims; other unknown dims get DEFAULT_SPATIAL_DIM
DEFAULT_SPATIAL_DIM = 64


def parse_input_shapes(specs) -> dict[str, list[int]]:
    shapes = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",")] if sep and name else None
        except ValueError:
            values = None
        if not values or any(v <= 0 for v in values):
            raise OnnxPruneError(f"--input-shape {spec!r}: expected NAME:D1,D2,... with positive integers")
        shapes[name] = values
    return shapes


def graph_inputs(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Write the given dims into the graph inputs (in place)."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, dims in shapes.items():
        if name not in inputs:
            raise OnnxPruneError(f"--input-shape {name!r}: the model has no input of that name "
                                 f"(inputs: {', '.join(inputs)})")
        tensor_type = inputs[name].type.tensor_type
        if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != len(dims):
            raise OnnxPruneError(f"--input-shape {name!r}: the input has rank {len(tensor_type.shape.dim)}, "
                                 f"not {len(dims)}")
        tensor_type.shape.Clear()
        for d in dims:
            tensor_type.shape.dim.add().dim_value = d


def concrete_input_shapes(model: onnx.ModelProto, given=None) -> tuple[dict[str, list[int]], list[str]]:
    """A concrete shape for every input: given ones, static ones, and defaults for the rest."""
    given = given or {}
    shapes, guessed = {}, []
    for inp in graph_inputs(model):
        if inp.name in given:
            shapes[inp.name] = list(given[inp.name])
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(DEFAULT_DYNAMIC_DIM if i == 0 else DEFAULT_SPATIAL_DIM)
                guessed.append(f"{inp.name}[{i}]")
        shapes[inp.name] = dims
    return shapes, guessed


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation; falls back to the model unchanged."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            return model


def static_copy(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of the model with all inputs fixed to concrete shapes, shapes inferred."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fix_input_shapes(copy, shapes)
    for vi in list(copy.graph.value_info):
        copy.graph.value_info.remove(vi)
    return infer_shapes(copy)
