"""Where a layer's weights, bias and output channels are, for the layers recovery rewrites:
MatMul with a 2-d weight, Gemm, ungrouped Conv."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def weight_axes(node: gs.Node, index: int) -> tuple[int, int] | None:
    """(input-channel axis, output-channel axis) of a layer's weight, for the layers handled."""
    if node.op == "Conv" and index == 1 and int(node.attrs.get("group", 1)) == 1:
        return 1, 0
    if node.op == "Gemm" and index == 1:
        return (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
    if node.op == "MatMul" and index == 1:
        return 0, 1
    return None


def output_axis(node: gs.Node, graph) -> int:
    if node.op == "MatMul":
        return len(graph.shape(node.outputs[0]) or (0, 0)) - 1
    return 1



def matrix(graph, node: gs.Node, index: int) -> np.ndarray:
    """The layer's weight as [in positions, out, rest...] float64 (kernel taps last)."""
    value = np.asarray(graph.evaluate(node.inputs[index]), dtype=np.float64)
    in_axis, out_axis = weight_axes(node, index)
    value = np.moveaxis(value, (in_axis, out_axis), (0, 1))
    if node.op == "Gemm":
        value = value * float(node.attrs.get("alpha", 1.0))
    return value



def bias_tensor(graph, node: gs.Node):
    """(node, input index) holding the layer's bias constant, or None."""
    if node.op in ("Conv", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2].name and graph.const(node.inputs[2]) is not None:
            return node, 2
        return None
    users = node.outputs[0].outputs
    if len(users) == 1 and users[0].op == "Add":
        add = users[0]
        other = 1 if add.inputs[0] is node.outputs[0] else 0
        value = graph.const(add.inputs[other])
        if value is not None and value.ndim >= 1 and all(d == 1 for d in value.shape[:-1]):
            return add, other
    return None


def add_bias(graph, node: gs.Node, delta: np.ndarray) -> None:
    found = bias_tensor(graph, node)
    if found is not None:
        holder, index = found
        old = graph.const(holder.inputs[index])
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        new = (np.asarray(old, np.float64).reshape(-1) + delta / scale).reshape(old.shape)
        graph.set_const_input(holder, index, new.astype(old.dtype))
        return
    if node.op in ("Conv", "Gemm"):
        scale = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        while len(node.inputs) < 2:
            node.inputs.append(gs.Variable.empty())
        const = gs.Constant(graph.fresh_name(f"{node.name or node.op}_bias"), (delta / scale).astype(np.float32))
        if len(node.inputs) > 2:
            node.inputs[2] = const
        else:
            node.inputs.append(const)
        return
    # MatMul without a bias Add: add one behind it.
    out = node.outputs[0]
    raw = gs.Variable(graph.fresh_name(out.name), dtype=out.dtype)
    node.outputs[0] = raw
    const = gs.Constant(graph.fresh_name(f"{node.name or 'MatMul'}_bias"), delta)
    graph.gs.nodes.append(gs.Node("Add", name=graph.fresh_name(node.name or "MatMul"), inputs=[raw, const],
                                  outputs=[out]))



def finite(*arrays) -> bool:
    return all(a is None or np.isfinite(a).all() for a in arrays)
