"""--zero-channels: remove exactly the channels whose coupled values are all zero (what
group-lasso fine-tuning leaves), however many per group; the function does not change."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import max_rel_diff, run_model
from planting import plant_dead_channels

from onnxprune import OptionError, prune
from onnxprune.core.metrics import random_inputs

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_resnet.onnx"


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_zero_channels_are_exactly_what_goes(ratio):
    planted, truth = plant_dead_channels(onnx.load(str(FIXTURE)), ratio, seed=4)
    result = prune(planted, zero_channels=True, latency_runs=0)
    removed = {d.key: [int(i) for i in d.removed] for d in result.plan.decisions if len(d.removed)}
    assert removed == truth and result.plan.criterion == "zero channels"
    feeds = random_inputs(planted, {"input": [1, 3, 32, 32]}, 1)
    assert max_rel_diff(run_model(planted, feeds), run_model(result.model, feeds)) < 1e-5
    assert result.report["params"]["after"] < result.report["params"]["before"]


def test_a_channel_with_any_nonzero_coupled_value_stays():
    planted, truth = plant_dead_channels(onnx.load(str(FIXTURE)), 0.5, seed=4)
    key, dead = next(iter(truth.items()))
    # one consumer weight of one dead channel made nonzero again: that channel is not dead
    result = prune(planted, zero_channels=True, latency_runs=0)
    (decision,) = [d for d in result.plan.decisions if d.key == key]
    att = next(m for m in decision.group.members if m.role == "weight_in")
    tensor = next(t for t in planted.graph.initializer if t.name == att.tensor.name)
    value = onnx.numpy_helper.to_array(tensor).copy()
    index = [0] * value.ndim
    index[att.axis] = int(result.analysis.channel_index(att, decision.group, np.array([dead[0]]))[0])
    value[tuple(index)] = 0.5
    tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
    again = prune(planted, zero_channels=True, latency_runs=0)
    (decision,) = [d for d in again.plan.decisions if d.key == key]
    assert sorted(decision.removed.tolist()) == dead[1:]


def test_zero_channels_takes_no_ratio_and_says_when_there_are_none():
    with pytest.raises(OptionError, match="zero_channels.*filters"):
        prune(onnx.load(str(FIXTURE)), zero_channels=True, filters=0.3)
    result = prune(onnx.load(str(FIXTURE)), zero_channels=True, latency_runs=0)
    assert "--zero-channels: no channel" in result.report["summary"]["nothing_removed"]
