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

from onnxprune.core.dependency import analyze_model
from onnxprune.core.plan import candidate_groups, group_key

NEUTRAL = {"bn_var": 1.0, "divisor": 1.0}


def plant_dead_channels(model: onnx.ModelProto, ratio: float, seed: int = 0, heads: bool = False,
                        input_shapes: dict | None = None):
    """Return (planted model, {group key: sorted dead channel indices}).

    heads=True plants dead attention heads only (groups of whole heads).
    """
    analysis = analyze_model(model, input_shapes, heads=heads)
    graph = analysis.graph
    groups, _ = candidate_groups(analysis)
    rng = np.random.default_rng(seed)
    values = {}
    truth = {}
    for group in groups:
        if heads and group.kind != "heads":
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
    return graph.to_model(), truth


def prune_planted(model: onnx.ModelProto, ratio: float, seed: int = 0, tolerance: float = 1e-4,
                  atol: float = 1e-6, heads: bool = False, optimized: bool = True, **options):
    """Plant dead channels, prune exactly that amount, and check the function is unchanged.

    Outputs must agree to `tolerance` relative to their largest magnitude; `atol` only
    matters for outputs that are themselves near zero (a sigmoid map far below 0.5 has a
    largest value around 1e-6, where float32 summation order alone moves it by 1e-7).
    `optimized=False` compares the graphs as written, without onnxruntime's fusions (see run_model).
    """
    from onnxprune import prune
    from onnxprune.core.metrics import random_inputs
    from onnxprune.core.shapes import concrete_input_shapes

    from conftest import max_rel_diff, run_model

    planted, truth = plant_dead_channels(model, ratio, seed, heads=heads, input_shapes=options.get("input_shapes"))
    if heads:
        result = prune(planted, filters=0.0, heads=ratio, latency_runs=0, **options)
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
