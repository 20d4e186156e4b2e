"""Plant dead structure: make chosen channels contribute nothing, exactly.

For every prunable group, a fraction of its channels gets all of its coupled
weights zeroed: producer filters, biases, normalization scale/shift/mean (variance
and divisors set to 1), and the consumers' input weights. Those channels then carry
nothing any surviving channel reads, so removing exactly them must leave every
output unchanged, while any mistake in coupling, slicing or shape rewriting shows
up as a wrong output or an invalid model.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnxprune.passes.analyze import analyze_dynamic

from onnxprune import blocks as blk
from onnxprune.core.dependency import with_input_shapes
from onnxprune.core.graph import Graph
from onnxprune.core.plan import candidate_groups, group_key
from onnxprune.core.shapes import complete_shapes, concrete_input_shapes, restore_interface

NEUTRAL = {"bn_var": 1.0, "divisor": 1.0}


def plant_dead_channels(model: onnx.ModelProto, ratio: float, seed: int = 0, heads: bool = False,
                        input_shapes: dict | None = None, head_dim: bool = False, hidden: bool = False):
    """Return (planted model, {group key: sorted dead channel indices}).

    heads=True plants dead attention heads only (groups of whole heads); head_dim=True dead
    dims inside heads only; hidden=True dead channels of the model width only (embedding and
    residual, every normalization's scale zero there); otherwise every other group (dims
    inside heads and the width go only on request).
    """
    # the analysis a prune run makes: with dynamic dims, perhaps at the measuring dims
    working = complete_shapes(with_input_shapes(model, input_shapes))
    shapes, guessed = concrete_input_shapes(working, input_shapes)
    analysis, _ = analyze_dynamic(working, shapes if guessed else None, heads, hidden)
    graph = analysis.graph
    groups, _ = candidate_groups(analysis)
    rng = np.random.default_rng(seed)
    values = {}
    truth = {}
    for group in groups:
        if heads and group.kind != "heads" or head_dim != (group.kind == "head_dim") \
                or hidden != (group.kind == "hidden"):
            continue
        n = math.floor(ratio * group.channels)
        if n == 0:
            continue
        dead = np.sort(rng.choice(group.channels, size=n, replace=False))
        truth[group_key(analysis, group)] = [int(i) for i in dead]
        for att in group.members:
            use = (id(att.node), att.input_index)
            if use not in values:
                values[use] = (att.node, np.array(graph.const(att.tensor), copy=True))
            arr = values[use][1]
            index = [slice(None)] * arr.ndim
            index[att.axis] = analysis.channel_index(att, group, dead)
            arr[tuple(index)] = NEUTRAL.get(att.role, 0.0)
    for (_, input_index), (node, arr) in values.items():
        graph.set_const_input(node, input_index, arr)
    planted = graph.to_model()
    # the analysis may have fixed dynamic dims: the planted model takes what the model took
    restore_interface(planted, {vi.name: vi for vi in model.graph.input}, False)
    return planted, truth


def prune_planted(model: onnx.ModelProto, ratio: float, seed: int = 0, tolerance: float = 1e-4,
                  atol: float = 1e-6, heads: bool = False, optimized: bool = True, head_dim: bool = False,
                  hidden: bool = False, **options):
    """Plant dead channels, prune exactly that amount, and check the function is unchanged.

    Outputs must agree to `tolerance` relative to their largest magnitude; `atol` only
    matters for outputs that are themselves near zero (a sigmoid map far below 0.5 has a
    largest value around 1e-6, where float32 summation order alone moves it by 1e-7).
    `optimized=False` compares the graphs as written, without onnxruntime's fusions (see run_model).
    """
    from conftest import max_rel_diff, run_model

    from onnxprune import prune
    from onnxprune.core.metrics import random_inputs
    from onnxprune.core.shapes import concrete_input_shapes

    planted, truth = plant_dead_channels(model, ratio, seed, heads=heads, input_shapes=options.get("input_shapes"),
                                         head_dim=head_dim, hidden=hidden)
    if heads:
        result = prune(planted, filters=0.0, heads=ratio, latency_runs=0, **options)
    elif head_dim:
        result = prune(planted, filters=0.0, head_dim=ratio, latency_runs=0, **options)
    elif hidden:
        result = prune(planted, filters=0.0, hidden=ratio, latency_runs=0, **options)
    else:
        result = prune(planted, filters=ratio, latency_runs=0, **options)
    assert result.verification.checker == "passed", result.verification.checker
    assert result.verification.ort == "passed", result.verification.ort
    removed = {d.key: [int(i) for i in d.removed] for d in result.plan.decisions if len(d.removed)}
    assert removed == truth
    shapes, _ = concrete_input_shapes(planted, options.get("input_shapes"))
    for feed_seed in (seed + 1, seed + 2):
        feeds = random_inputs(planted, shapes, feed_seed)
        diff = max_rel_diff(run_model(planted, feeds, optimized), run_model(result.model, feeds, optimized),
                            atol=atol / tolerance)
        assert diff <= tolerance, f"pruned model differs from the planted original: rel {diff:.3g}"
    return result


def plant_identity_blocks(model: onnx.ModelProto, count: int, first: int | None = None):
    """Zero the last layer of `count` blocks' branches (and the per-channel constants after it),
    so those blocks add exactly zero: every other block, or `count` adjacent ones from block
    `first`. Returns (planted model, their keys)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = Graph(complete_shapes(copy))
    blocks = blk.find_blocks(graph)
    # every other block, not simply the first ones; or adjacent ones
    chosen = blocks[1::2][:count] if first is None else blocks[first:first + count]
    for block in chosen:
        for node in blk.branch_tail(block):
            for i, t in enumerate(node.inputs):  # any side: exporters write Add(bias, x) too
                keep = (node.op == "BatchNormalization" and i == 4) or (node.op == "Div" and i == 1)
                value = graph.const(t)
                if value is not None and value.dtype.kind == "f" and not keep:
                    graph.set_const_input(node, i, np.zeros_like(value))
    return graph.to_model(), [b.key for b in chosen]
