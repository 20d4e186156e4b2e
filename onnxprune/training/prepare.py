"""The training copy of a model: the graph onnxruntime-training's generate_artifacts accepts.

What it needs, measured with onnxruntime-training 1.19 (docs/fine-tuning.md has the list):
- IR version at most 10 and opset at most 21 (newer are refused); the copy is converted, and
  models below opset 13 are raised to 13, which the loss graphs use.
- Weights stored in Constant nodes (Paddle, some tf2onnx exports) become initializers, so
  they can be trained; the trained values go back into the Constant nodes.
- LayerNormalization and Dropout with all their outputs (the gradient builders read them);
  BatchNormalization with one output and training_mode 0 (an export in training mode has three).
- BatchNormalization either trains as it does in torch (batch statistics, running statistics
  updated with momentum 0.1: `batchnorm="train"`) or is written as the fixed affine map of its
  running statistics with only its scale and bias trained (`batchnorm="frozen"`).
- Ops without a gradient builder are lowered (lowerings.py).
- Every float initializer is listed either as trainable or as frozen. Trainable: float32
  tensors with more than one element that the loss reaches through a differentiable input.
  Scalars (1/sqrt(d), masks), BatchNorm running statistics, shape-like inputs (Resize scales,
  Pad values) and weights that only feed other outputs are frozen: their gradients have the
  wrong shape or do not exist, and onnxruntime fails or crashes on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core.errors import OnnxPruneError
from .builder import Builder, opset_of
from .lowerings import lower, lowered_constants

MAX_IR = 10
MAX_OPSET = 21
MIN_OPSET = 13

# Inputs that carry no gradient (indices, shapes, scales, statistics).
NOT_DIFFERENTIABLE = {
    "Reshape": {1}, "Resize": {1, 2, 3}, "Upsample": {1}, "Pad": {1, 2, 3}, "Clip": {1, 2},
    "Slice": {1, 2, 3, 4}, "Gather": {1}, "GatherElements": {1}, "GatherND": {1}, "Expand": {1}, "Tile": {1},
    "Where": {0}, "BatchNormalization": {3, 4}, "Squeeze": {1}, "Unsqueeze": {1}, "Split": {1},
    "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1}, "TopK": {1}, "OneHot": {0, 1, 2},
    "Dropout": {1, 2}, "ScatterElements": {1}, "ScatterND": {1}, "CumSum": {1},
}
# Ops whose outputs carry no gradient at all.
STOPS = {"Shape", "Size", "ConstantOfShape", "Range", "ArgMax", "ArgMin", "Equal", "Less", "Greater",
         "LessOrEqual", "GreaterOrEqual", "NonZero", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Round",
         "Floor", "Ceil", "Sign", "RandomNormalLike", "RandomUniformLike", "EyeLike"}
QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
             "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QGemm"}
CONTROL_FLOW = {"If", "Loop", "Scan"}
BATCHNORM_MODES = ("train", "frozen")


class NotTrainable(OnnxPruneError):
    """The model cannot be fine-tuned through onnxruntime-training (one line naming why)."""


@dataclass
class TrainingGraph:
    """A model ready for generate_artifacts, and how its weights map back to the original."""

    model: onnx.ModelProto
    trainable: list[str]
    frozen: list[str]
    output: str  # the graph output the loss is about
    loss_input: str  # the tensor the loss reads: the output, or the logits a Softmax output is made from
    constants: list[str] = field(default_factory=list)  # Constant-node weights made initializers (by output name)
    running_stats: list[str] = field(default_factory=list)  # BatchNorm means and variances
    lowered: dict = field(default_factory=dict)  # op type -> nodes lowered
    notes: list = field(default_factory=list)
    # BatchNorms inserted for training after Convs that had none: folded back into them
    unfolded: list[UnfoldedBatchNorm] = field(default_factory=list)

    @property
    def written_back(self) -> list[str]:
        """Tensors whose trained values go back into the model (or are folded into it)."""
        return self.trainable + [name for name in self.running_stats if name not in self.trainable]


@dataclass(frozen=True)
class UnfoldedBatchNorm:
    """A BatchNormalization put after a Conv for training (scale, bias, mean, var names)."""

    conv_output: str
    weight: str
    bias: str | None
    scale: str
    shift: str
    mean: str
    var: str
    epsilon: float = 1e-5


def prepare(model: onnx.ModelProto, output: str | None = None, logits: bool = True,
            batchnorm: str = "train", input_dims: dict | None = None,
            unfold: dict[str, tuple] | None = None) -> TrainingGraph:
    """The training copy of `model`; `output` names the graph output the loss is about (default:
    the first that depends on weights). With `logits`, a Softmax/LogSoftmax output is traced
    back to its input, the logits that cross-entropy and distillation read. `input_dims` fixes
    graph input dims on the copy ({input: [dim or None to leave it]}): onnxruntime-training
    builds some gradients wrongly, or crashes, when dims it could know are symbolic (measured
    on Paddle exports with dynamic image sizes). `unfold` maps Conv outputs to per-channel
    statistics: each gets a BatchNorm for training (see _unfold_batchnorms)."""
    if batchnorm not in BATCHNORM_MODES:
        raise OnnxPruneError(f"batchnorm {batchnorm!r}: choose from {', '.join(BATCHNORM_MODES)}")
    _refuse_untrainable(model)
    outputs = [o.name for o in model.graph.output]
    chosen = output
    if output is not None and output not in outputs:
        raise NotTrainable(f"the model has no output {output!r} (outputs: {', '.join(outputs)})")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    notes = []
    copy = _supported_versions(copy, notes)
    constants = _constants_to_initializers(copy)
    # shapes are inferred afresh: exporters' value_info can be stale or hold -1 dims
    del copy.graph.value_info[:]
    if input_dims:
        _fix_input_dims(copy, input_dims)
    try:
        copy = onnx.shape_inference.infer_shapes(copy)
    except Exception as exc:  # onnx raises its own error types from C++
        raise NotTrainable(f"shape inference fails on the training copy ({str(exc).splitlines()[0]})") from None
    _complete_outputs(copy)
    unfolded = _unfold_batchnorms(copy, unfold) if unfold else []
    running = _batchnorm(copy, batchnorm)
    copy, lowered, unlowered = lower(copy)
    if chosen is None:  # the first output that depends on weights (exporters pass inputs through, too)
        output = next((name for name in outputs if _reached_weights(copy, name)), outputs[0])
        if output != outputs[0]:
            notes.append(f"the loss is about output {output!r}, the first that depends on weights (choose another "
                         "with --train-output)")
    loss_input = _logits(copy, output) if logits else output
    if loss_input != output:
        notes.append(f"the loss reads {loss_input!r}, the logits output {output!r} is computed from")
    reached = _reached_weights(copy, loss_input)
    on_path = _on_gradient_path(copy, loss_input, reached)
    for name, exc in unlowered.items():
        if name in on_path:
            raise NotTrainable(f"cannot train through {exc}")
    excluded = set(running) | lowered_constants(copy)
    trainable, frozen = [], []
    for init in copy.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                  onnx.TensorProto.BFLOAT16):
            continue
        size = int(np.prod(init.dims)) if init.dims else 1
        if (init.data_type == onnx.TensorProto.FLOAT and size > 1 and init.name in reached
                and init.name not in excluded):
            trainable.append(init.name)
        else:
            frozen.append(init.name)
    if not trainable:
        raise NotTrainable(f"no float weights reach output {output!r} through differentiable ops: nothing to train")
    constants = [name for name in constants if name in trainable]  # the others are not written back
    if unfolded:
        notes.append(f"{len(unfolded)} Conv(s) trained with a BatchNorm after them, folded back into their weights")
    return TrainingGraph(copy, trainable, frozen, output, loss_input, constants, running, lowered, notes, unfolded)


def _fix_input_dims(model: onnx.ModelProto, input_dims: dict) -> None:
    for graph_input in model.graph.input:
        dims = input_dims.get(graph_input.name)
        if dims is None or not graph_input.type.HasField("tensor_type"):
            continue
        shape = graph_input.type.tensor_type.shape
        if len(shape.dim) != len(dims):
            continue
        for dim, value in zip(shape.dim, dims):
            if value is None:
                continue
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != value:
                raise NotTrainable(f"input {graph_input.name!r} has dim {dim.dim_value}, and the data gives {value}")
            dim.Clear()
            dim.dim_value = int(value)


def _refuse_untrainable(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        where = f"node {node.name or node.output[0]!r} ({node.op_type})"
        if node.op_type in QUANTIZED:
            raise NotTrainable(f"{where}: quantized graphs cannot be fine-tuned; fine-tune the float model, "
                               "then quantize")
        if node.op_type in CONTROL_FLOW:
            raise NotTrainable(f"{where}: fine-tuning through control flow is not supported")
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE) \
                and (int(np.prod(init.dims)) if init.dims else 1) > 1:
            kind = onnx.TensorProto.DataType.Name(init.data_type).lower()
            raise NotTrainable(f"weight {init.name!r} is {kind}: fine-tuning trains float32 weights; convert the "
                               "model to float32 first")
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise NotTrainable(f"weight {init.name!r} is stored as external data: load it into the model first "
                               "(fine-tuning handles models under 2 GB)")


def _supported_versions(model: onnx.ModelProto, notes: list) -> onnx.ModelProto:
    opset = opset_of(model)
    target = MAX_OPSET if opset > MAX_OPSET else MIN_OPSET if opset < MIN_OPSET else None
    if target is not None:
        try:
            converted = onnx.version_converter.convert_version(model, target)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise NotTrainable(f"opset {opset}: onnxruntime-training 1.19 trains opsets {MIN_OPSET}-{MAX_OPSET}, "
                               f"and converting the training copy to {target} failed "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        notes.append(f"trained at opset {target} (the model has {opset}; the output keeps {opset})")
        model = converted
    model.ir_version = min(model.ir_version, MAX_IR)
    return model


def _constants_to_initializers(model: onnx.ModelProto) -> list[str]:
    """Constant nodes holding a tensor become initializers of the same name, so the training graph
    holds every constant one way; returns the float ones with more than one element, which may
    train (and are written back into their Constant nodes)."""
    kept, made, converted = [], [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                and node.attribute[0].name == "value" and node.output[0]:
            tensor = node.attribute[0].t
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(tensor), node.output[0]))
            converted += 1
            if tensor.data_type == onnx.TensorProto.FLOAT and int(np.prod(tensor.dims or [1])) > 1:
                made.append(node.output[0])
            continue
        kept.append(node)
    if converted:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return made


def convs_without_batchnorm(model: onnx.ModelProto) -> list[str]:
    """Outputs of Convs (weights as initializers or Constants) that no BatchNormalization reads:
    where an exporter folded one, or where there was none."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    filters = {i.name: (list(i.dims) or [1])[0] for i in model.graph.initializer}
    filters.update({n.output[0]: (list(n.attribute[0].t.dims) or [1])[0] for n in model.graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    found = []
    for node in model.graph.node:
        # a single-channel Conv is left alone: its BatchNorm's scale would be a scalar, never trained
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or filters.get(node.input[1], 0) < 2:
            continue
        readers = consumers.get(node.output[0], [])
        if any(r.op_type == "BatchNormalization" for r in readers):
            continue
        if node.output[0] in {o.name for o in model.graph.output}:
            continue
        found.append(node.output[0])
    return found


def _unfold_batchnorms(model: onnx.ModelProto, stats: dict) -> list[UnfoldedBatchNorm]:
    """Put a BatchNormalization after each Conv named in `stats` ({output: ((mean, var) measured
    there, (mean, var) to restore)}): running statistics are the measured ones, scale and shift
    the standard deviation and mean to restore (equal to the measured ones, it gives back its
    input). Trained with batch statistics, it conditions the Conv as its folded-away BatchNorm
    did; at the end it is folded back."""
    producers = {n.output[0]: n for n in model.graph.node if n.output}
    eps = 1e-5
    added, new_nodes = [], {}
    for output, ((mean, var), (target_mean, target_var)) in stats.items():
        conv = producers.get(output)
        if conv is None or conv.op_type != "Conv":
            continue
        base = f"onnxprune_unfolded/{output}"
        pre = f"{base}/conv"
        conv.output[0] = pre
        var = np.maximum(np.asarray(var, np.float64), 1e-6)
        target_var = np.maximum(np.asarray(target_var, np.float64), 1e-6)
        values = {"scale": np.sqrt(target_var + eps), "shift": np.asarray(target_mean), "mean": np.asarray(mean),
                  "var": var}
        for key, value in values.items():
            model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), f"{base}/{key}"))
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        new_nodes[pre] = helper.make_node("BatchNormalization", [pre] + [f"{base}/{k}" for k in values], [output],
                                          name=f"{base}/BatchNormalization", epsilon=eps)
        added.append(UnfoldedBatchNorm(output, conv.input[1], bias, f"{base}/scale", f"{base}/shift",
                                       f"{base}/mean", f"{base}/var", eps))
    if added:
        ordered = []
        for node in model.graph.node:
            ordered.append(node)
            if node.output and node.output[0] in new_nodes:
                ordered.append(new_nodes[node.output[0]])
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    return added


def _complete_outputs(model: onnx.ModelProto) -> None:
    """LayerNormalization gets its Mean and InvStdDev outputs, Dropout its mask."""
    b = Builder(model, prefix="onnxprune_train_out")
    wanted = {"LayerNormalization": 3, "Dropout": 2}
    for node in model.graph.node:
        count = wanted.get(node.op_type)
        if count is None or node.domain not in ("", "ai.onnx"):
            continue
        while len(node.output) < count:
            node.output.append(b.name(f"{node.op_type.lower()}_out{len(node.output)}"))
        for index in range(count):
            if not node.output[index]:
                node.output[index] = b.name(f"{node.op_type.lower()}_out{index}")


def _batchnorm(model: onnx.ModelProto, mode: str) -> list[str]:
    """Put every BatchNormalization in inference form, or lower it to its fixed affine map
    (mode "frozen"); returns the running statistics (frozen in either mode; in "train" mode
    onnxruntime updates them)."""
    initializers = {i.name for i in model.graph.initializer}
    info_rank = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
                 list(model.graph.input) + list(model.graph.value_info)
                 if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    b = Builder(model, prefix="onnxprune_train_bn")
    running, kept = [], []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        del node.output[1:]
        for attr in list(node.attribute):
            if attr.name in ("training_mode", "spatial", "is_test", "consumed_inputs"):
                node.attribute.remove(attr)
        running += [name for name in node.input[3:5] if name in initializers]
        if mode == "train":
            kept.append(node)
            continue
        x, scale, bias, mean, var = node.input[:5]
        rank = info_rank.get(x)
        if rank is None:
            raise NotTrainable(f"node {node.name or node.output[0]!r} (BatchNormalization): the rank of its input "
                               "is unknown, so it cannot be frozen; use batchnorm 'train'")
        eps = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"), 1e-5)
        start = len(b.nodes)
        gain = b.node("Div", [scale, b.node("Sqrt", [b.node("Add", [var, b.scalar(eps)])])])
        shift = b.node("Sub", [bias, b.node("Mul", [mean, gain])])
        per_channel = [-1] + [1] * (rank - 2)
        scaled = b.node("Mul", [x, b.reshape(gain, per_channel)])
        b.node("Add", [scaled, b.reshape(shift, per_channel)], [node.output[0]])
        kept.extend(b.nodes[start:])
    del model.graph.node[:]
    model.graph.node.extend(kept)
    model.graph.initializer.extend(b.initializers)
    return list(dict.fromkeys(running))


def _logits(model: onnx.ModelProto, output: str) -> str:
    """The input of a Softmax/LogSoftmax that makes `output` (through Identity), else `output`."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name = output
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    node = producers.get(name)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        return node.input[0]
    return output


def _on_gradient_path(model: onnx.ModelProto, tensor: str, weights: set[str]) -> set[str]:
    """Tensors the gradient flows through: computed from a trained weight, and reaching `tensor`."""
    downstream = set(weights)
    for node in model.graph.node:  # topological order: one sweep finds everything fed by a weight
        skip = NOT_DIFFERENTIABLE.get(node.op_type, set())
        if node.op_type not in STOPS and any(i in downstream for k, i in enumerate(node.input) if k not in skip):
            downstream.update(o for o in node.output if o)
    upstream = _reached_tensors(model, tensor)
    return downstream & upstream


def _reached_tensors(model: onnx.ModelProto, tensor: str) -> set[str]:
    producers = {o: n for n in model.graph.node for o in n.output if o}
    seen, stack = set(), [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None or node.op_type in STOPS:
            continue
        skip = NOT_DIFFERENTIABLE.get(node.op_type, set())
        stack.extend(inp for index, inp in enumerate(node.input) if inp and index not in skip)
    return seen


def _reached_weights(model: onnx.ModelProto, tensor: str) -> set[str]:
    """Initializers the gradient of `tensor` reaches through differentiable inputs."""
    return _reached_tensors(model, tensor) & {i.name for i in model.graph.initializer}
