"""Shape inference, and fixing dynamic input dims (`--input-shape name:1,3,224,224`)."""
from __future__ import annotations

import contextlib
import logging
import tempfile

import numpy as np
import onnx

from .errors import OptionError
from .modelio import copy_without_initializers

DEFAULT_DYNAMIC_DIM = 1  # batch-like dims; other unknown dims get DEFAULT_SPATIAL_DIM
DEFAULT_SPATIAL_DIM = 64
# the other unknown dims of integer inputs (token ids: a sequence), and of every input sharing
# such a dim by name: short enough for the position tables of small text models
DEFAULT_SEQUENCE_DIM = 16


def parse_input_shapes(specs) -> dict[str, list[int]]:
    shapes = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            values = [int(d) for d in dims.split(",")] if sep and name else None
        except ValueError:
            values = None
        if not values or any(v <= 0 for v in values):
            raise OptionError("input_shapes", spec, "expected NAME:D1,D2,... with positive integers")
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
            raise OptionError("input_shapes", name, f"the model has no input of that name (inputs: {', '.join(inputs)})")
        tensor_type = inputs[name].type.tensor_type
        if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != len(dims):
            raise OptionError("input_shapes", name, f"the input has rank {len(tensor_type.shape.dim)}, not {len(dims)}")
        tensor_type.shape.Clear()
        for d in dims:
            tensor_type.shape.dim.add().dim_value = d


# a second set of defaults, to check that a pruned model still takes other dims
ALTERNATE_DIMS = {"batch": 2, "sequence": 13, "spatial": 96}


def concrete_input_shapes(model: onnx.ModelProto, given=None, alternate: bool = False
                          ) -> tuple[dict[str, list[int]], list[str]]:
    """A concrete shape for every input: given ones, static ones, and defaults for the rest
    (`alternate`: other defaults, ALTERNATE_DIMS)."""
    given = given or {}
    batch, seq, spatial = ((ALTERNATE_DIMS["batch"], ALTERNATE_DIMS["sequence"], ALTERNATE_DIMS["spatial"])
                           if alternate else (DEFAULT_DYNAMIC_DIM, DEFAULT_SEQUENCE_DIM, DEFAULT_SPATIAL_DIM))
    shapes, guessed = {}, []
    sequence = set()  # names of dims that integer inputs have after the batch axis
    for inp in graph_inputs(model):
        if inp.name not in given and _is_integer(inp):
            sequence.update(d.dim_param for d in list(inp.type.tensor_type.shape.dim)[1:] if d.dim_param)
    for inp in graph_inputs(model):
        if inp.name in given:
            shapes[inp.name] = list(given[inp.name])
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                if i == 0:
                    dims.append(batch)
                elif _is_integer(inp) or (d.dim_param and d.dim_param in sequence):
                    dims.append(seq)
                else:
                    dims.append(spatial)
                guessed.append(f"{inp.name}[{i}]")
        shapes[inp.name] = dims
    return shapes, guessed


def _is_integer(inp: onnx.ValueInfoProto) -> bool:
    elem = inp.type.tensor_type.elem_type
    return bool(elem) and np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(elem), np.integer)


_SKELETON_MIN_ELEMENTS = 64  # initializers this large are shape-only for inference purposes


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without the payload of large initializers: they become typed graph inputs.

    Shape inference then costs what the graph structure costs, not what the weights weigh.
    Small initializers (shape targets, split sizes, axes) keep their values for data propagation.
    """
    heavy = [t for t in model.graph.initializer if _elements(t) >= _SKELETON_MIN_ELEMENTS]
    light = copy_without_initializers(model, keep=lambda t: _elements(t) < _SKELETON_MIN_ELEMENTS)
    declared = {i.name for i in light.graph.input}
    for t in heavy:
        if t.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _elements(tensor: onnx.TensorProto) -> int:
    n = 1
    for d in tensor.dims:
        n *= d
    return n


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with value_info from onnx shape inference (data propagation on); in place."""
    inferred = _infer(skeleton(model))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    outputs = {o.name: o for o in inferred.graph.output}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in outputs:
            out.CopyFrom(outputs[out.name])
    return model


def static_copy(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A weightless copy with all inputs fixed to concrete shapes, shapes inferred (for counting)."""
    copy = skeleton(model)
    fix_input_shapes(copy, shapes)
    del copy.graph.value_info[:]
    # declared output dims that are names (batch, sequence) would be counted as 1: infer them
    declared = {}
    for output in copy.graph.output:
        dims = output.type.tensor_type.shape.dim
        if output.type.tensor_type.HasField("shape") and any(not d.HasField("dim_value") for d in dims):
            declared[output.name] = onnx.TypeProto()
            declared[output.name].CopyFrom(output.type)
            output.type.tensor_type.ClearField("shape")
    copy = complete_shapes(copy)
    for output in copy.graph.output:  # where inference could not say, the declared shape stays
        if output.name in declared and not output.type.tensor_type.HasField("shape"):
            output.type.CopyFrom(declared[output.name])
    return copy


def complete_shapes(model: onnx.ModelProto, rounds: int = 64) -> onnx.ModelProto:
    """Shape inference, then fill in outputs that onnx could not infer from what op rules know.

    onnx's data propagation stops at some Shape -> Slice -> Concat chains, and it has no
    shape functions for contrib ops (com.microsoft attention). An op rule may offer
    `output_shape(node, graph)`: the shape is written as value_info and inference runs
    again to carry it downstream. Chains of such ops take a round each (PP-OCR's recognizer
    needs six); rounds stop as soon as one adds nothing.
    """
    from .graph import Graph
    from .rules import rule_for

    infer_shapes(model)
    _symbolic_shapes(model)
    for _ in range(rounds):
        known = {vi.name for vi in model.graph.value_info if _fully_known(vi)}
        known |= {o.name for o in model.graph.output if _fully_known(o)}
        pending = [n for n in model.graph.node if n.output and n.output[0] not in known
                   and getattr(rule_for(n.op_type, n.domain), "output_shape", None)]
        if not pending:
            break
        graph = Graph(model)
        added = []
        for node in graph.gs.nodes:
            rule = rule_for(node.op, node.domain or "")
            if not node.outputs or node.outputs[0].name in known or not hasattr(rule, "output_shape"):
                continue
            out = rule.output_shape(node, graph)
            dtype = node.inputs[0].dtype if node.inputs else None
            if out is None or dtype is None or out == graph.shape(node.outputs[0]):
                continue
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            dims = [d if d is not None else f"{node.outputs[0].name}_{i}" for i, d in enumerate(out)]
            added.append(onnx.helper.make_tensor_value_info(node.outputs[0].name, elem, dims))
        if not added:
            break
        names = {vi.name for vi in added}
        kept = [vi for vi in model.graph.value_info if vi.name not in names]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept + added)
        infer_shapes_keep(model)
    return model


def _symbolic_shapes(model: onnx.ModelProto) -> None:
    """Where onnx shape inference left dims it could not name, use onnxruntime's symbolic
    shape inference (when onnxruntime is installed), in place.

    onnx gives up on shapes computed at run time, e.g. an attention mask expanded to
    Where(Equal(shape, -1), ones, shape): its heads axis is unknown, although it is 1 for any
    batch and sequence, and a head cannot be pruned past it. The symbolic inference computes
    such shapes in terms of the input dims. Its result replaces onnx's only when it covers every
    tensor onnx did, so that one naming of the symbolic dims holds throughout.
    """
    if not any(_unnamed(d) for vi in model.graph.value_info for d in vi.type.tensor_type.shape.dim):
        return
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except Exception:  # no onnxruntime (or an old one): onnx's shapes stay
        return
    light = skeleton(model)
    del light.graph.value_info[:]
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # it logs every op it cannot read; onnx's shapes cover those
    try:
        # When it cannot finish it saves its partial model as ./sym_shape_infer_temp.onnx: run it
        # in a folder of its own, so that nothing lands in the user's working directory.
        with tempfile.TemporaryDirectory(prefix="onnxprune-shapes-") as scratch, contextlib.chdir(scratch):
            inferred = SymbolicShapeInference.infer_shapes(light, auto_merge=True, guess_output_rank=False)
    except Exception:
        return
    finally:
        logger.setLevel(level)
    if inferred is None:
        return
    found = {vi.name: vi for vi in inferred.graph.value_info if vi.type.tensor_type.HasField("shape")}
    if any(vi.name not in found for vi in model.graph.value_info if vi.type.tensor_type.HasField("shape")):
        return
    known = {vi.name for vi in model.graph.value_info}
    del model.graph.value_info[:]
    model.graph.value_info.extend(vi for name, vi in found.items() if name in known or not name.startswith("_"))


def _unnamed(dim) -> bool:
    return not dim.HasField("dim_value") and (not dim.dim_param or dim.dim_param.startswith("unk__"))


def infer_shapes_keep(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that starts from (and keeps) the model's current value_info."""
    inferred = _infer(skeleton(model))
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _fully_known(vi) -> bool:
    t = vi.type.tensor_type
    return t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)


def restore_interface(model: onnx.ModelProto, interface: dict, keep_value_info: bool) -> None:
    """Give the pruned model's inputs and outputs back the types the user's model declared,
    and keep its convention of storing inferred shapes (value_info) or not.

    --input-shape fixes dynamic dims for the analysis only: a model that took any batch or
    width still does. Pruning never changes interface dims (graph inputs and outputs keep
    their channels), so the declared types carry over as they are.
    """
    changed = False
    weights = {i.name for i in model.graph.initializer}  # IR < 4 lists them as inputs too
    for vi in list(model.graph.input) + list(model.graph.output):
        declared = None if vi.name in weights else interface.get(vi.name)
        if declared is not None and declared.type != vi.type:
            vi.type.CopyFrom(declared.type)
            changed = True
    if keep_value_info:
        del model.graph.value_info[:]
        infer_shapes(model)
    elif changed:
        del model.graph.value_info[:]
