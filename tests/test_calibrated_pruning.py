"""prune() and the CLI with calibration data: criteria, recovery, targets, and the fallbacks."""
import json

import numpy as np
import onnx
import pytest
from planting import plant_dead_channels, prune_planted

from onnxprune import prune
from onnxprune.cli import main
from onnxprune.core.errors import OnnxPruneError

FIXTURE = "fixtures/tiny_resnet.onnx"


def _feeds(model, batches=4, seed=3):
    [inp] = [i for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]


@pytest.mark.parametrize("importance", ["act", "apoz", "wanda", "recon"])
@pytest.mark.parametrize("recover", ["none", "bias", "lsq,bn"])
def test_planted_dead_channels_go_exactly_with_data_criteria_and_recovery(importance, recover):
    model = onnx.load(FIXTURE)
    planted, _ = plant_dead_channels(model, 0.5)
    result = prune_planted(model, 0.5, importance=importance, calib=_feeds(planted), recover=recover)
    assert result.report["criterion"] == importance
    assert result.report["calibration"]


def test_data_criterion_without_data_falls_back_to_magnitude_and_says_so():
    result = prune(FIXTURE, filters=0.3, importance="wanda", latency_runs=0)
    assert result.report["criterion"] == "l2"
    assert any("no calibration data" in n for n in result.report["notes"])


def test_recovery_needs_data():
    with pytest.raises(OnnxPruneError, match="recover='bias': needs calibration data"):
        prune(FIXTURE, filters=0.3, recover="bias", latency_runs=0)


def test_bias_recovery_brings_outputs_closer_on_calibration_data():
    model = onnx.load(FIXTURE)
    feeds = _feeds(model, batches=8)
    plain = prune(model, filters=0.5, importance="recon", calib=feeds, latency_runs=0)
    recovered = prune(model, filters=0.5, importance="recon", calib=feeds, recover="bias", latency_runs=0)
    assert recovered.report["recovery"]["layers_compensated"] > 0
    assert recovered.report["verification"]["max_abs_diff"] < plain.report["verification"]["max_abs_diff"]


def test_target_macs_is_met_and_noted():
    result = prune(FIXTURE, target_macs=0.6, latency_runs=0)
    reached = result.report["macs"]["after"] / result.report["macs"]["before"]
    assert abs(reached - 0.6) <= 0.02 * 0.6 or reached <= 0.6
    assert any(n.startswith("target macs 0.60") for n in result.report["notes"])


def test_fixed_input_shape_is_for_analysis_only(tmp_path):
    model = onnx.load(FIXTURE)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "batch"
    result = prune(model, filters=0.3, input_shapes={model.graph.input[0].name: [2, 3, 32, 32]}, latency_runs=0)
    assert result.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_with_calibration_file(tmp_path):
    model = onnx.load(FIXTURE)
    feeds = _feeds(model, batches=3)
    name = next(iter(feeds[0]))
    np.savez(tmp_path / "calib.npz", **{name: np.concatenate([f[name] for f in feeds])})
    report = tmp_path / "report.json"
    code = main([FIXTURE, "--filters", "0.3", "--importance", "act", "--calib", str(tmp_path / "calib.npz"),
                 "--recover", "bias,bn", "-o", str(tmp_path / "out.onnx"), "--report", str(report), "--no-verify"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["criterion"] == "act" and data["recovery"]["methods"] == ["bias", "bn"]


def test_cli_refuses_recovery_without_data(tmp_path, capsys):
    code = main([FIXTURE, "--filters", "0.3", "--recover", "lsq", "-o", str(tmp_path / "o.onnx")])
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


class _FakeResult:
    model = None

    def __init__(self, ratio):
        self.report = {"latency_ms": {"before": 10.0, "after": 10.0 * ratio}, "notes": [], "seconds": {}}


def _search(target, step):
    from onnxprune.passes.latency import LatencySettings, TargetLatency
    from onnxprune.pipeline import Context

    search = TargetLatency(LatencySettings(target_latency=target), step=step)
    return search(onnx.load(FIXTURE), Context())


def test_latency_target_searches_the_largest_mac_budget_that_meets_it():
    tried = []

    def fake_step(model, macs):  # latency falls with MACs, but not in proportion
        tried.append(macs)
        return _FakeResult(0.3 + 0.6 * macs)

    result = _search(0.7, fake_step)
    best = max(m for m in tried if 0.3 + 0.6 * m <= 0.7)
    assert result.report["target_latency"]["reached"] == pytest.approx(0.3 + 0.6 * best, abs=1e-4)
    assert 0.3 + 0.6 * best > 0.68  # bisection got close to the boundary (2/3 of the MACs)
    assert len(result.report["target_latency"]["steps"]) == len(tried)


def test_unreachable_latency_target_is_a_one_line_error():
    with pytest.raises(OnnxPruneError, match="target_latency=0.5: not reached"):
        _search(0.5, lambda model, macs: _FakeResult(0.95))


def test_calibration_batches_need_not_match_the_analysis_input_shape():
    # --input-shape fixes batch 1 for the analysis; the user's model takes any batch, so do its
    # calibration batches. Paddle-style "?" dims are anonymous, not one shared size.
    model = onnx.load(FIXTURE)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for i in (0, 2, 3):
        dims[i].Clear()
        dims[i].dim_param = "?"
    name = model.graph.input[0].name
    feeds = [{name: np.random.default_rng(0).standard_normal((4, 3, 32, 24)).astype(np.float32)}]
    result = prune(model, filters=0.3, importance="act", calib=feeds, recover="bias",
                   input_shapes={name: [1, 3, 32, 32]}, latency_runs=0)
    assert result.report["criterion"] == "act" and result.report["recovery"]["layers_compensated"] > 0
