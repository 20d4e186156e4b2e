"""Running a model on calibration data with intermediate tensors fetched as outputs.

``collect_channel_stats(model, feeds, {tensor: channel_axis})`` runs the model in onnxruntime,
with the requested intermediate tensors added as graph outputs. Per channel it accumulates the
count, sum, sum of |x|, sum of x^2 and the number of exact zeros, in float64, over every axis
except the channel axis. It does this batch by batch and keeps no activations. Graph inputs are
read straight from the feeds, and initializers are fetched like any other tensor.
``collect_grams`` and ``collect_gram`` accumulate X^T X over a tensor's channel axis (the rows
are all other positions) in the same way, for least-squares refits; ``PatchGramStats`` does it
for a kxk convolution's input patches (a sample of output positions per image), and
``collect_into`` feeds any such accumulators, and ``collect_paired_into`` feeds accumulators
that take a tensor of each of two models run on the same batches.

Memory stays bounded. The requested tensors are split into chunks whose extra outputs for one
batch fit in ``budget_bytes`` (default 2 GiB). Sizes are estimated by shape inference at the
first batch's shapes. Each chunk is one onnxruntime session and one pass over the feeds, and
only one session exists at a time. Reductions convert at most ``_MAX_PIECE_ELEMENTS`` values to
float64 at once.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import OnnxPruneError, first_line
from ..core.progress import progress
from ..core.shapes import fix_input_shapes, infer_shapes, skeleton
from .data import CalibrationData, as_model, calibration_feeds
from .stats import Accumulator, ChannelStats, GramStats, PairedStats

DEFAULT_BUDGET_BYTES = 2 * 1024**3


def collect_channel_stats(model: onnx.ModelProto | str | Path, feeds, tensors: dict[str, int],
                          budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict[str, ChannelStats]:
    """Per-channel statistics of the named tensors ({name: channel axis}) over all calibration batches.

    `feeds` is CalibrationData or anything calibration_feeds() takes. See the module doc for memory.
    """
    return _collect(model, feeds, tensors, ChannelStats, budget_bytes)


def collect_grams(model: onnx.ModelProto | str | Path, feeds, tensors: dict[str, int],
                  budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict[str, GramStats]:
    """X^T X, mean and row count of each named tensor's channel axis ({name: channel axis})."""
    return _collect(model, feeds, tensors, GramStats, budget_bytes)


def collect_gram(model: onnx.ModelProto | str | Path, feeds, tensor: str, axis: int,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[np.ndarray, np.ndarray, int]:
    """(X^T X [C, C], mean [C], rows) of one tensor, X being its values with the channel axis last."""
    gram = collect_grams(model, feeds, {tensor: axis}, budget_bytes)[tensor]
    return gram.gram, gram.mean, gram.count


def _collect(model, feeds, tensors: dict[str, int], make: type[Accumulator], budget_bytes: int) -> dict:
    model = as_model(model)
    _check_tensors(model, tensors)
    accumulators = {name: make(axis, name) for name, axis in tensors.items()}
    collect_into(model, feeds, list(accumulators.items()), budget_bytes)
    return accumulators


def collect_into(model, feeds, accumulators: list[tuple[str, object]],
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
    """Give every (tensor name, accumulator) pair the tensor's values, batch by batch.

    An accumulator is anything with `add(values, keep=...)` (`keep`: the batch's real-token
    positions, or None); several may share a tensor.
    """
    model = as_model(model)
    data = calibration_feeds(feeds, model)
    _check_tensors(model, {name: 0 for name, _ in accumulators})
    if not accumulators:
        return
    by_tensor: dict[str, list] = {}
    for name, accumulator in accumulators:
        by_tensor.setdefault(name, []).append(accumulator)
    input_names = {spec.name for spec in data.inputs}
    from_feeds = [name for name in by_tensor if name in input_names]
    fetched = [name for name in by_tensor if name not in input_names]
    elem_types, chunks = _passes(model, data, fetched, budget_bytes)
    passes = len(chunks or [[]])
    for number, chunk in enumerate(chunks or [[]]):
        run = _probe(model, chunk, elem_types) if chunk else None
        batches = progress(data, f"calibration pass {number + 1}/{passes}", unit="batch")
        for batch, feed in enumerate(batches, start=1):
            keep = data.positions(feed)
            if number == 0:
                for name in from_feeds:
                    for accumulator in by_tensor[name]:
                        accumulator.add(feed[name], keep=keep)
            if run is not None:
                for name, values in zip(chunk, run(feed, batch)):
                    for accumulator in by_tensor[name]:
                        accumulator.add(values, keep=keep)
        del run  # one session at a time


def collect_paired_stats(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds,
                         tensors: dict[str, tuple[int, np.ndarray | None]],
                         budget_bytes: int = DEFAULT_BUDGET_BYTES) -> dict[str, PairedStats]:
    """PairedStats of tensors present under the same name in both models ({name: (channel axis,
    reference positions the candidate kept or None)}), both run batch by batch on the same feeds."""
    reference, candidate = as_model(reference), as_model(candidate)
    data = calibration_feeds(feeds, reference)
    _check_tensors(reference, {name: axis for name, (axis, _) in tensors.items()})
    _check_tensors(candidate, {name: axis for name, (axis, _) in tensors.items()})
    accumulators = {name: PairedStats(axis, name, positions) for name, (axis, positions) in tensors.items()}
    names = list(tensors)
    if not names:
        return accumulators
    elem_types, chunks = _passes(reference, data, names, budget_bytes, models=2)
    for number, chunk in enumerate(chunks):
        run_a, run_b = _probe(reference, chunk, elem_types), _probe(candidate, chunk, elem_types)
        batches = progress(data, f"paired statistics {number + 1}/{len(chunks)}", unit="batch")
        for batch, feed in enumerate(batches, start=1):
            keep = data.positions(feed)
            for name, a, b in zip(chunk, run_a(feed, batch), run_b(feed, batch)):
                accumulators[name].add(a, b, keep=keep)
        del run_a, run_b
    return accumulators


def collect_paired_into(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds,
                        pairs: list[tuple[str, str, object]], budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
    """Run both models on the same batches and give every (reference tensor, candidate tensor,
    accumulator) triple both values: ``accumulator.add(reference_value, candidate_value)``.

    The triples are split into chunks whose extra outputs of both models fit the budget; each
    chunk is one pass over the data with one session per model."""
    reference, candidate = as_model(reference), as_model(candidate)
    data = calibration_feeds(feeds, reference)
    _check_tensors(reference, {ref: 0 for ref, _, _ in pairs})
    _check_tensors(candidate, {cand: 0 for _, cand, _ in pairs})
    if not pairs:
        return
    ref_types, ref_sizes = _tensor_sizes(reference, data.first(), sorted({ref for ref, _, _ in pairs}))
    cand_types, cand_sizes = _tensor_sizes(candidate, data.first(), sorted({cand for _, cand, _ in pairs}))
    keys = [str(i) for i in range(len(pairs))]
    sizes = {key: ref_sizes[ref] + cand_sizes[cand] for key, (ref, cand, _) in zip(keys, pairs)}
    chunks = _chunks(keys, sizes, budget_bytes)
    if len(chunks) > 1 and data.one_shot:
        raise OnnxPruneError(f"{data.description}: {len(pairs)} tensor pairs need {len(chunks)} passes to stay "
                             f"within {budget_bytes} bytes, and a one-shot iterator allows one; pass a list or a "
                             "function that returns a fresh iterator")
    inputs = {spec.name for spec in data.inputs}
    for number, chunk in enumerate(chunks):
        chosen = [pairs[int(key)] for key in chunk]
        ref_names = [n for n in dict.fromkeys(ref for ref, _, _ in chosen) if n not in inputs]
        cand_names = [n for n in dict.fromkeys(cand for _, cand, _ in chosen) if n not in inputs]
        run_ref = _probe(reference, ref_names, ref_types) if ref_names else None
        run_cand = _probe(candidate, cand_names, cand_types) if cand_names else None
        batches = progress(data, f"paired statistics {number + 1}/{len(chunks)}", unit="batch")
        for batch, feed in enumerate(batches, start=1):
            ref_values = dict(feed, **dict(zip(ref_names, run_ref(feed, batch) if run_ref else [])))
            cand_values = dict(feed, **dict(zip(cand_names, run_cand(feed, batch) if run_cand else [])))
            keep = data.positions(feed)
            for ref, cand, accumulator in chosen:
                accumulator.add(ref_values[ref], cand_values[cand], keep=keep)
        del run_ref, run_cand


def _passes(model: onnx.ModelProto, data: CalibrationData, names: list[str], budget_bytes: int,
            models: int = 1) -> tuple[dict, list[list[str]]]:
    """Element types of `names`, and the chunks of them fetched per pass over the data, so that
    one batch's extra outputs (from `models` models at once) stay within the budget."""
    elem_types, sizes = _tensor_sizes(model, data.first(), names)
    chunks = _chunks(names, {name: models * size for name, size in sizes.items()}, budget_bytes)
    if len(chunks) > 1 and data.one_shot:
        raise OnnxPruneError(f"{data.description}: {len(names)} tensors need {len(chunks)} passes to stay within "
                             f"{budget_bytes} bytes, and a one-shot iterator allows one; pass a list or a function "
                             "that returns a fresh iterator")
    return elem_types, chunks


def _check_tensors(model: onnx.ModelProto, tensors: dict[str, int]) -> None:
    known = {name for node in model.graph.node for name in node.output if name}
    known |= {inp.name for inp in model.graph.input} | {init.name for init in model.graph.initializer}
    for name, axis in tensors.items():
        if name not in known:
            raise OnnxPruneError(f"tensor {name!r}: not in the model's main graph")
        if not isinstance(axis, (int, np.integer)):
            raise OnnxPruneError(f"tensor {name!r}: channel axis {axis!r} is not an integer")


def _tensor_sizes(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]):
    """Element types and estimated bytes per batch of `names`, by shape inference at `feed`'s shapes.

    A tensor whose size stays unknown counts as the largest one known, to err on the safe side.
    """
    light = skeleton(model)
    fix_input_shapes(light, {name: list(value.shape) for name, value in feed.items()})
    del light.graph.value_info[:]  # stored shapes may be for another batch size
    infer_shapes(light)
    elem_types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    shapes = {}
    for vi in itertools.chain(light.graph.input, light.graph.value_info, light.graph.output):
        tensor_type = vi.type.tensor_type
        if tensor_type.elem_type:
            elem_types[vi.name] = tensor_type.elem_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[vi.name] = [d.dim_value for d in tensor_type.shape.dim]
    for init in model.graph.initializer:
        elem_types[init.name] = init.data_type
        shapes[init.name] = list(init.dims)
    known = {name: _bytes(shapes[name], elem_types.get(name)) for name in shapes}
    fallback = max(itertools.chain(known.values(), (v.nbytes for v in feed.values())), default=0)
    return elem_types, {name: known.get(name, fallback) for name in names}


def _bytes(dims: list[int], elem_type: int | None) -> int:
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize if elem_type else 4
    return math.prod(dims) * itemsize


def _chunks(names: list[str], sizes: dict[str, int], budget_bytes: int) -> list[list[str]]:
    """Consecutive groups of `names` whose sizes add up to at most the budget (a larger one alone)."""
    chunks, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > budget_bytes:
            chunks.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    if current:
        chunks.append(current)
    return chunks


def _probe(model: onnx.ModelProto, names: list[str], elem_types: dict[str, int]):
    """A function running the model on a feed and returning the values of `names`.

    `model` is left equal to what it was, but its node messages are new objects: look nodes
    up again rather than holding on to them across a collection."""
    from ..core.verify import session

    declared = {out.name for out in model.graph.output}
    added = [_output_info(name, elem_types.get(name)) for name in names if name not in declared]
    # The outputs are added to the model itself only while the session is built: a copy would
    # double the memory of a large model. Input dims are left free for the same time, and stored
    # shapes set aside: a model analysed at a fixed --input-shape still takes the calibration
    # batches the user's model takes. Nodes that the fetched tensors do not depend on are set
    # aside too: onnxruntime would run them all (and the graph outputs become just `names`).
    needed = _nodes_needed(model.graph, names)
    all_nodes = outputs = None
    if needed is not None:
        all_nodes = [_copy(node) for node in model.graph.node]
        outputs = [_copy(vi) for vi in model.graph.output]
        kept = [all_nodes[i] for i in needed]
        del model.graph.node[:]
        model.graph.node.extend(kept)
        kept_outputs = [vi for vi in outputs if vi.name in set(names)]
        del model.graph.output[:]
        model.graph.output.extend(kept_outputs)
    model.graph.output.extend(added)
    inputs = [_copy(vi) for vi in model.graph.input]
    stored = [_copy(vi) for vi in model.graph.value_info]
    for i, vi in enumerate(model.graph.input):
        for j, dim in enumerate(vi.type.tensor_type.shape.dim):
            dim.dim_param = f"calibration_{i}_{j}"
    del model.graph.value_info[:]
    try:
        sess = session(model)
    except OnnxPruneError:
        raise
    except Exception as exc:
        raise OnnxPruneError(f"onnxruntime cannot load the model with calibration outputs "
                             f"({first_line(exc)})") from None
    finally:
        if added:
            del model.graph.output[len(model.graph.output) - len(added):]
        if all_nodes is not None:
            del model.graph.node[:]
            model.graph.node.extend(all_nodes)
            del model.graph.output[:]
            model.graph.output.extend(outputs)
        for vi, kept in zip(model.graph.input, inputs):
            vi.CopyFrom(kept)
        model.graph.value_info.extend(stored)

    def run(feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        try:
            return sess.run(names, feed)
        except Exception as exc:
            raise OnnxPruneError(f"onnxruntime failed on calibration batch {batch} ({first_line(exc)})") from None

    return run


def _copy(message):
    kept = type(message)()
    kept.CopyFrom(message)
    return kept


def _nodes_needed(graph: onnx.GraphProto, names: list[str]) -> list[int] | None:
    """Indices, in order, of the nodes that `names` depend on; None when that is all of them or
    when a node holds subgraphs (their outer-scope reads are not listed as inputs)."""
    producer = {}
    for index, node in enumerate(graph.node):
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            return None
        for out in node.output:
            producer[out] = index
    needed, stack = set(), [producer[n] for n in names if n in producer]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        stack.extend(producer[i] for i in graph.node[index].input if i in producer)
    if not needed or len(needed) == len(graph.node):  # only inputs/initializers, or everything
        return None
    return sorted(needed)


def _output_info(name: str, elem_type: int | None) -> onnx.ValueInfoProto:
    if not elem_type:
        return onnx.ValueInfoProto(name=name)  # onnxruntime infers what it is not told
    return onnx.helper.make_tensor_value_info(name, elem_type, None)
