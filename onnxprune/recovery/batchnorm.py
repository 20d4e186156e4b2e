"""BatchNorm correction (`bn`): BatchNormalization layers after a layer that lost input
channels get the per-channel affine map that best reproduces their original input from the
pruned one, measured on both models layer after layer."""
from __future__ import annotations

import numpy as np
import onnx

from ..core.progress import progress
from .layers import finite

_BN_PASSES = 16  # runs over the calibration data at most (one per layer up to this)
_BN_SAMPLES = 32  # ... and the calibration samples each run takes


def reestimate_batchnorm(pruned: onnx.ModelProto, original: onnx.ModelProto, kept: dict, calibration,
                         passes: int = _BN_PASSES, samples: int = _BN_SAMPLES) -> int:
    """Correct BatchNormalization layers for what pruning changed in their input.

    `kept` maps each layer's output tensor to the original input channels it kept (None: all).

    Each layer's input is measured in both models on the same calibration batches, and per
    channel the least-squares affine map from the pruned input to the original one is folded
    into the layer's scale and bias, so its output is the best per-channel match of the
    original's. (Matching the pruned input's own mean and variance, as recalibrating running
    statistics does, scales up whatever is left of the channel, error included.) Where nothing
    changed (dead channels removed) the map is the identity and the layer stays as it was.

    Layers are corrected in graph order, in at most `passes` runs over the data: a layer's map
    is measured after the layers before it were corrected. Measured all at once, every layer
    would also correct for errors that the earlier corrections already removed. The runs use
    about `samples` calibration samples, spread over all of the data.
    """
    from ..calibration import calibration_feeds

    nodes = [n for n in pruned.graph.node if n.op_type == "BatchNormalization" and n.output[0] in kept]
    if not nodes:
        return 0
    # Two numbers per channel need few samples; every pass runs both models over them.
    calibration = calibration_feeds(calibration, original).spread(samples)
    inits = {i.name for i in pruned.graph.initializer}
    nodes = [n for n in nodes if len(n.input) >= 5 and all(name in inits for name in n.input[1:5])]
    step = max(1, -(-len(nodes) // max(1, passes)))
    outputs = [n.output[0] for n in nodes]  # node messages are replaced while a model is probed
    done = 0
    for start in progress(range(0, len(outputs), step), "BatchNorm correction", unit="pass"):
        done += _correct_batchnorms(pruned, original, outputs[start:start + step], kept, calibration)
    drop_unread_initializers(pruned)
    return done


def _correct_batchnorms(pruned, original, outputs: list[str], kept: dict, calibration) -> int:
    from onnx import numpy_helper

    from ..calibration import collect_paired_stats

    def batchnorms():
        return [n for n in pruned.graph.node if n.op_type == "BatchNormalization" and n.output[0] in set(outputs)]

    paired = collect_paired_stats(original, pruned, calibration,
                                  {n.input[0]: (1, kept[n.output[0]]) for n in batchnorms()})
    nodes = batchnorms()  # looked up again: probing replaced the node messages by equal copies
    inits = {i.name: i for i in pruned.graph.initializer}
    done = 0
    for node in nodes:
        scale, bias, mean, var = (numpy_helper.to_array(inits[name]).astype(np.float64) for name in node.input[1:5])
        gain, offset = paired[node.input[0]].affine()
        if len(gain) != len(scale) or not finite(gain, offset):
            continue
        # BN(gain * x + offset) = (scale * gain)(x - mean) / s + bias + scale (offset + (gain - 1) mean) / s
        spread = np.sqrt(var + _attr(node, "epsilon", 1e-5))
        values = {1: scale * gain, 2: bias + scale * (offset + (gain - 1.0) * mean) / spread}
        for index, value in values.items():
            dtype = numpy_helper.to_array(inits[node.input[index]]).dtype
            name = f"{node.output[0]}_recovered_{'scale' if index == 1 else 'bias'}"
            while name in inits:
                name += "_"
            pruned.graph.initializer.append(numpy_helper.from_array(value.astype(dtype), name))
            node.input[index] = name
        done += 1
    return done


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return attr.f
    return default


def drop_unread_initializers(model: onnx.ModelProto) -> None:
    """Running stats replaced above are read by no one now (onnxruntime would warn about them)."""
    read = _names_read(model.graph) | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in read or
            any(i.name == init.name for i in model.graph.input)]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop bodies) included."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names |= _names_read(sub)
    return names