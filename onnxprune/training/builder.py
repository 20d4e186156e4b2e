"""Writing nodes into a training copy of a graph: fresh names, scalar and shape constants, and
the ops whose form changed between opsets (axes as an attribute or as an input)."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Builder:
    """Makes nodes for one graph. Names start with a prefix no exporter uses, so they cannot
    collide with the model's own tensors."""

    def __init__(self, model: onnx.ModelProto, prefix: str = "onnxprune_train") -> None:
        self.model = model
        self.opset = opset_of(model)
        self.prefix = prefix
        self._counter = itertools.count()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._counter)}"

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=self.name(op), **attrs))
        return names[0] if len(names) == 1 else names

    def constant(self, value, dtype=np.float32, hint: str = "const") -> str:
        """An initializer (never trainable: the parameter rule skips scalars and int tensors,
        and the caller lists every one it makes as frozen)."""
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def scalar(self, value: float) -> str:
        return self.constant(np.float32(value), hint="scalar")

    def reduce(self, op: str, x: str, axes: list[int] | None, keepdims: bool, output: str | None = None) -> str:
        """ReduceSum/ReduceMean/... over `axes` (None: all), spelled for the model's opset: axes
        became an input in opset 13 for ReduceSum and in opset 18 for the others."""
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        inputs, attrs = [x], {"keepdims": int(keepdims)}
        if axes is not None:
            if as_input:
                inputs.append(self.constant(np.asarray(axes, np.int64), np.int64, "axes"))
            else:
                attrs["axes"] = list(axes)
        outputs = [output] if output else 1
        return self.node(op, inputs, outputs, **attrs)

    def squeeze(self, x: str, axes: list[int], output: str | None = None) -> str:
        outputs = [output] if output else 1
        if self.opset >= 13:
            return self.node("Squeeze", [x, self.constant(np.asarray(axes, np.int64), np.int64, "axes")], outputs)
        return self.node("Squeeze", [x], outputs, axes=list(axes))

    def reshape(self, x: str, shape: list[int], output: str | None = None) -> str:
        outputs = [output] if output else 1
        return self.node("Reshape", [x, self.constant(np.asarray(shape, np.int64), np.int64, "shape")], outputs)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def neg(self, x: str) -> str:
        return self.node("Mul", [x, self.scalar(-1.0)])


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1
