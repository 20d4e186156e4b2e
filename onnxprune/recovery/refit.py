"""Sequential refit (`refit`): each layer from the first pruned one on is refitted, in graph
order, to reproduce the original model's output from the inputs the pruned network actually
gives it.

lsq refits a layer on the original model's activations, as if its kept inputs were what they
were. Past the first pruned layer they are not: every layer inherits the errors of the ones
before it. Refit runs both models on the same calibration batches and, per layer, streams the
moments of the pruned model's input x (a kxk convolution's input patches) against the
original's output y at the kept output channels (paired statistics), then solves

    [W; b] = argmin E ||W^T x + b - y||^2 + ridge ||[W; b] - [W0; b0]||^2

with [W0; b0] the layer's current weights, so a layer whose input did not change (dead
channels removed) comes back as it was. Calibration batches are dealt alternately into two
halves: a layer is refitted only if the fit on each half lowers the error on the other
(against the current weights); otherwise it is fitting noise, and keeps its weights. Layers are refitted in graph order, in at most
`passes` runs over the data (more where the moments of a run's layers would pass
MOMENT_BUDGET_BYTES): the layers of one run are measured after the runs before them were
written, so each sees the inputs of an already refitted upstream.

Layers: MatMul with a constant 2-d weight, Gemm (transA=0), ungrouped Conv with explicit
padding; a bias is fitted where the layer has one or can take one (Conv/Gemm input,
MatMul followed by an Add of a constant vector), otherwise only the weights.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..core.graph import Graph
from ..core.layout import kept_positions
from ..core.progress import progress_bar
from .layers import bias_tensor, finite

PASSES = 16  # runs over the calibration data at most (one per layer up to this)
RIDGE = 1e-4  # relative to the moment matrix's mean diagonal, towards the current weights
ROWS_PER_INPUT = 4  # fewer calibration rows than this per fitted input and the fit follows the noise
MOMENT_BUDGET_BYTES = 2 * 1024**3  # the moments of the layers refitted in one run over the data


@dataclass
class RefitTarget:
    """A layer to refit: its output after the bias (the same name in both models), and the
    original's output channels the pruned layer kept (None: all of them)."""

    output: str
    axis: int
    positions: np.ndarray | None = None


# -- which layers ------------------------------------------------------------------------------
def _bias_add(node: gs.Node, graph: Graph) -> gs.Node | None:
    """The Add of a constant vector right after a MatMul: its bias."""
    found = bias_tensor(graph, node) if node.op == "MatMul" else None
    return found[0] if found is not None else None


def _layer_ready(node: gs.Node, graph: Graph) -> bool:
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return False
    weight = graph.const(node.inputs[1])
    if weight is None or graph.is_const(node.inputs[0]) or not np.issubdtype(weight.dtype, np.floating):
        return False
    if node.op == "Conv":
        return (int(node.attrs.get("group", 1)) == 1 and weight.ndim >= 3
                and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or weight.ndim != 2:
            return False
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = graph.const(node.inputs[2])
            return bias is not None and bias.size in (1, weight.shape[0 if node.attrs.get("transB", 0) else 1])
        return True
    return weight.ndim == 2


def _target_tensor(node: gs.Node, graph: Graph) -> gs.Tensor:
    add = _bias_add(node, graph)
    return add.outputs[0] if add is not None else node.outputs[0]


def refit_targets(analysis, kept, start: list[gs.Node]) -> list[RefitTarget]:
    """The refittable layers among `start` (the layers that lost inputs) and downstream of them,
    in the graph of `analysis` before the plan is applied, with the original output channels
    each one keeps (`kept`: the plan's kept channels by atom)."""
    graph = analysis.graph
    reached, stack = set(), list(start)
    while stack:
        node = stack.pop()
        if id(node) in reached:
            continue
        reached.add(id(node))
        for out in node.outputs:
            stack.extend(out.outputs)
    targets = []
    for node in graph.gs.nodes:
        if id(node) not in reached or not _layer_ready(node, graph):
            continue
        tensor = _target_tensor(node, graph)
        rank = graph.rank(tensor) if node.op == "MatMul" else 2
        if rank is None:
            continue
        axis = rank - 1 if node.op == "MatMul" else 1
        layout = analysis.layouts.get(tensor.name, {}).get(axis)
        positions = None if layout is None else kept_positions(layout, analysis.atoms, kept)
        targets.append(RefitTarget(tensor.name, axis, positions))
    return targets


# -- fitting -----------------------------------------------------------------------------------
def _geometry(node: gs.Node, weight: np.ndarray):
    if node.op != "Conv":
        return None
    rank = weight.ndim - 2
    kernel = tuple(int(k) for k in weight.shape[2:])
    strides = tuple(int(v) for v in (node.attrs.get("strides") or [1] * rank))
    pads = tuple(int(v) for v in (node.attrs.get("pads") or [0] * (2 * rank)))
    dilations = tuple(int(v) for v in (node.attrs.get("dilations") or [1] * rank))
    if all(k == 1 for k in kernel) and not any(pads) and all(s == 1 for s in strides):
        return None  # a 1x1 convolution reads one position per output: no patches needed
    return kernel, strides, pads, dilations


def _as_matrix(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as float64 [inputs (channel-major, then kernel taps), outputs]."""
    w = np.asarray(weight, np.float64)
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1).T
    if node.op == "Gemm":
        w = w.T if int(node.attrs.get("transB", 0)) else w
        return w * float(node.attrs.get("alpha", 1.0))
    return w


def _from_matrix(node: gs.Node, matrix: np.ndarray, like: np.ndarray) -> np.ndarray:
    if node.op == "Conv":
        return matrix.T.reshape(like.shape).astype(like.dtype)
    if node.op == "Gemm":
        matrix = matrix / float(node.attrs.get("alpha", 1.0))
        matrix = matrix.T if int(node.attrs.get("transB", 0)) else matrix
    return matrix.astype(like.dtype)


def _current_bias(node: gs.Node, graph: Graph, outputs: int) -> tuple[np.ndarray, bool]:
    """(the layer's bias as a float64 vector, whether a fitted bias can be written)."""
    if node.op == "Conv":
        value = graph.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        return (np.zeros(outputs) if value is None else np.asarray(value, np.float64)), True
    if node.op == "Gemm":
        value = graph.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        beta = float(node.attrs.get("beta", 1.0))
        if value is None:
            return np.zeros(outputs), True
        return np.broadcast_to(np.asarray(value, np.float64).reshape(-1) * beta, (outputs,)).copy(), True
    add = _bias_add(node, graph)
    if add is None:
        return np.zeros(outputs), False
    value = graph.const(add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0])
    return np.asarray(value, np.float64).reshape(-1), True


def _normal_equations(stats, w0: np.ndarray, b0: np.ndarray, with_bias: bool):
    """(E[z z^T], E[z y^T], current [W; b]) with z = [x; 1] (or x, the bias kept)."""
    n = stats.count
    k = w0.shape[0]
    size = k + 1 if with_bias else k
    a = np.empty((size, size))
    rhs = np.empty((size, w0.shape[1]))
    a[:k, :k] = stats.xx / n
    rhs[:k] = stats.xy / n
    current = w0
    if with_bias:
        a[:k, k] = a[k, :k] = stats.x_sum / n
        a[k, k] = 1.0
        rhs[k] = stats.y_sum / n
        current = np.vstack([w0, b0[None, :]])
    else:  # the bias stays: fit what is left of the output
        rhs[:k] -= np.outer(stats.x_sum / n, b0)
    return a, rhs, current


def _solve(stats, w0: np.ndarray, b0: np.ndarray, with_bias: bool) -> np.ndarray:
    """The refitted [W; b] (or W), ridge towards the current weights."""
    a, rhs, current = _normal_equations(stats, w0, b0, with_bias)
    ridge = RIDGE * max(float(np.mean(np.diag(a))), 1e-12)
    return np.linalg.solve(a + ridge * np.eye(len(a)), rhs + ridge * current)


def _loss(stats, solution: np.ndarray, w0: np.ndarray, b0: np.ndarray, with_bias: bool) -> float:
    """E||A^T z - y||^2 on `stats`, up to E||y||^2 (the same for every A compared)."""
    a, rhs, _ = _normal_equations(stats, w0, b0, with_bias)
    return float(np.sum(solution * (a @ solution)) - 2.0 * np.sum(solution * rhs))


class _Halves:
    """Calibration batches dealt alternately to two accumulators: a refit is fitted on one half
    and judged on the other, so that a layer refitted to noise keeps its weights."""

    def __init__(self, make) -> None:
        self.halves = (make(), make())
        self.calls = 0

    def add(self, y, x, keep=None) -> None:
        self.halves[self.calls % 2].add(y, x, keep=keep)
        self.calls += 1

    def whole(self):
        a, b = self.halves
        if b.xx is None:
            return a
        merged = copy.copy(a)
        merged.count = a.count + b.count
        merged.xx, merged.xy = a.xx + b.xx, a.xy + b.xy
        merged.x_sum, merged.y_sum = a.x_sum + b.x_sum, a.y_sum + b.y_sum
        return merged


def _carries_over(halves: _Halves, w0: np.ndarray, b0: np.ndarray, with_bias: bool) -> bool:
    """Whether fitting on one half of the data lowers the error on the other half, both ways,
    against the current weights. True when there is one half only (one calibration batch)."""
    a, b = halves.halves
    if a.xx is None or b.xx is None:
        return True
    current = _normal_equations(a, w0, b0, with_bias)[2]
    refit = _loss(b, _solve(a, w0, b0, with_bias), w0, b0, with_bias) + \
        _loss(a, _solve(b, w0, b0, with_bias), w0, b0, with_bias)
    kept = _loss(a, current, w0, b0, with_bias) + _loss(b, current, w0, b0, with_bias)
    return refit < kept


def _write(node: gs.Node, graph: Graph, weight: np.ndarray, bias: np.ndarray, old_weight: np.ndarray) -> None:
    graph.set_const_input(node, 1, _from_matrix(node, weight, old_weight))
    dtype = old_weight.dtype
    if node.op == "MatMul":
        add = _bias_add(node, graph)
        if add is None:
            return
        index = 1 if add.inputs[0] is node.outputs[0] else 0
        old = graph.const(add.inputs[index])
        graph.set_const_input(add, index, bias.reshape(old.shape).astype(old.dtype))
        return
    if node.op == "Gemm":
        bias = bias / float(node.attrs.get("beta", 1.0))
    old = graph.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if old is not None and old.size == bias.size:
        graph.set_const_input(node, 2, bias.reshape(old.shape).astype(old.dtype))
        return
    const = gs.Constant(graph.fresh_name(f"{node.name or node.op}_bias"), bias.astype(dtype))
    while len(node.inputs) < 2:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) > 2:
        node.inputs[2] = const
    else:
        node.inputs.append(const)


def refit_layers(pruned: onnx.ModelProto, original: onnx.ModelProto, targets: list[RefitTarget], calibration,
                 passes: int = PASSES, notes: list | None = None) -> int:
    """Refit `targets` of `pruned` (edited in place) against `original`, layer after layer.

    Returns how many layers were refitted; `notes` gets a line for layers left as they were."""
    from ..calibration import RegressionStats, calibration_feeds, collect_paired_into

    notes = [] if notes is None else notes
    if not targets:
        return 0
    calibration = calibration_feeds(calibration, original)
    original_names = {out for node in original.graph.node for out in node.output}
    targets = [t for t in targets if t.output in original_names]
    step = max(1, math.ceil(len(targets) / max(1, passes)))
    done, short, odd, unsure = 0, [], [], []
    position, runs = 0, progress_bar("sequential refit", total=len(targets), unit="layer")
    while position < len(targets):
        graph = Graph(pruned)
        tensors = graph.gs.tensors()
        chunk, used = [], 0
        while position < len(targets) and len(chunk) < step:
            target = targets[position]
            tensor = tensors.get(target.output)
            node = graph.producer(tensor) if tensor is not None else None
            if node is not None and node.op == "Add":
                node = next((graph.producer(t) for t in node.inputs if graph.producer(t) is not None
                             and graph.producer(t).op == "MatMul"), None)
            if node is None or not _layer_ready(node, graph):
                position += 1
                continue
            weight = graph.const(node.inputs[1])
            inputs, outputs = _as_matrix(node, weight).shape
            size = 2 * 8 * ((inputs + 1) ** 2 + (inputs + 1) * outputs)  # the float64 moments of two halves
            if chunk and used + size > MOMENT_BUDGET_BYTES:
                break
            used += size
            x_axis = 1 if node.op in ("Conv", "Gemm") else -1
            geometry = _geometry(node, weight)
            stats = _Halves(lambda: RegressionStats(x_axis, target.axis, geometry, target.positions,
                                                    name=target.output))
            chunk.append((node, weight, target, stats))
            position += 1
        if not chunk:
            continue
        collect_paired_into(original, pruned, calibration,
                            [(target.output, node.inputs[0].name, stats) for node, _, target, stats in chunk])
        for node, weight, target, halves in chunk:
            runs.update(1)
            w0 = _as_matrix(node, weight)
            stats = halves.whole()
            if stats.xx is None or stats.xy.shape != (w0.shape[0], w0.shape[1]):
                odd.append(target.output)
                continue
            b0, with_bias = _current_bias(node, graph, w0.shape[1])
            if stats.count < ROWS_PER_INPUT * (w0.shape[0] + with_bias):
                short.append(target.output)
                continue
            if not _carries_over(halves, w0, b0, with_bias):
                unsure.append(target.output)
                continue
            solution = _solve(stats, w0, b0, with_bias)
            w, b = solution[:w0.shape[0]], (solution[w0.shape[0]] if with_bias else b0)
            if not finite(w, b):
                odd.append(target.output)
                continue
            _write(node, graph, w, b, weight)
            done += 1
        del chunk
        pruned.CopyFrom(graph.to_model())
    runs.close()
    if short:
        notes.append(f"refit skipped for {len(short)} layer(s) with fewer than {ROWS_PER_INPUT} calibration rows per "
                     f"input (it would fit the noise), e.g. {short[0]!r}: give more calibration data")
    if unsure:
        notes.append(f"refit left {len(unsure)} layer(s) as they were: fitted on half of the calibration data, "
                     f"they did worse on the other half (too few rows for their inputs), e.g. {unsure[0]!r}")
    if odd:
        notes.append(f"refit skipped for {len(odd)} layer(s) whose statistics do not fit the layer or are not "
                     f"finite, e.g. {odd[0]!r}")
    return done
