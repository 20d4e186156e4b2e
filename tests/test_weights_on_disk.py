"""Weights that stay on disk (--weights disk): a model with external data is pruned reading one
weight at a time from its file, and the result must be the one pruning in memory gives, byte for
byte; planted dead structure must still go exactly. (The time and memory this saves on 1B/7B
decoders is measured in benchmarks/bench_large_model.py.)"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from planting import plant_dead_channels

from fixtures.llama_decoder import PRESETS, write_decoder
from onnxprune import prune
from onnxprune.core.errors import OptionError
from onnxprune.core.metrics import random_inputs
from onnxprune.core.shapes import concrete_input_shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder") / "tiny.onnx"
    write_decoder(path, **PRESETS["tiny"], progress=False)
    return path


def _initializers(path):
    model = onnx.load(str(path))  # loads the external data too
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _outputs(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("options", [dict(heads=0.5, neurons=0.25), dict(layers=1), dict(hidden=0.25)],
                         ids=["channels", "layers", "width"])
def test_on_disk_gives_what_in_memory_gives(decoder, tmp_path, options):
    on_disk = prune(decoder, weights="disk", latency_runs=0, **options)
    in_memory = prune(decoder, weights="memory", latency_runs=0, **options)
    assert on_disk.report["params"] == in_memory.report["params"]
    assert on_disk.report["params"]["after"] < on_disk.report["params"]["before"]
    assert on_disk.verification.checker.startswith("passed")
    assert on_disk.verification.ort == "not run"
    assert any("stay on disk" in note for note in on_disk.report["notes"])
    assert in_memory.verification.ort == "passed"
    a, b = on_disk.save(tmp_path / "disk.onnx"), in_memory.save(tmp_path / "memory.onnx")
    assert (tmp_path / "disk.onnx.data").exists()  # weights on disk are always written as external data
    weights_a, weights_b = _initializers(a), _initializers(b)
    assert sorted(weights_a) == sorted(weights_b)
    for name, value in weights_a.items():
        np.testing.assert_array_equal(value, weights_b[name], err_msg=name)
    onnx.checker.check_model(str(a), full_check=True)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (1, 16)).astype(np.int64)}
    np.testing.assert_array_equal(_outputs(a, feeds)[0], _outputs(b, feeds)[0])


def test_planted_dead_filters_go_exactly_from_disk(tmp_path):
    model = onnx.load(str(ROOT / "fixtures" / "tiny_resnet.onnx"))
    planted, truth = plant_dead_channels(model, 0.3)
    source = tmp_path / "planted.onnx"
    onnx.save_model(planted, str(source), save_as_external_data=True, location="planted.onnx.data",
                    size_threshold=0)
    result = prune(source, filters=0.3, weights="disk", latency_runs=0)
    assert {d.key: [int(i) for i in d.removed] for d in result.plan.decisions if len(d.removed)} == truth
    out = result.save(tmp_path / "pruned.onnx")
    feeds = random_inputs(planted, concrete_input_shapes(planted, None)[0], 1)
    expected, got = _outputs(source, feeds), _outputs(out, feeds)
    for e, g in zip(expected, got):
        assert np.abs(e - g).max() <= 1e-4 * np.abs(e).max()


def test_ratio_zero_writes_the_same_weights(decoder, tmp_path):
    out = prune(decoder, filters=0.0, weights="disk", latency_runs=0).save(tmp_path / "same.onnx")
    before, after = _initializers(decoder), _initializers(out)
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_auto_keeps_weights_on_disk_when_they_would_not_fit(decoder, monkeypatch):
    import onnxprune.core.modelio as modelio

    monkeypatch.setattr(modelio, "available_memory", lambda: 1 << 20)  # 1 MiB: 0.4 MiB of weights x 4.5 won't fit
    result = prune(decoder, neurons=0.25, latency_runs=0)
    assert any("stay on disk" in note for note in result.report["notes"])
    monkeypatch.setattr(modelio, "available_memory", lambda: 1 << 34)
    assert prune(decoder, neurons=0.25, latency_runs=0).verification.ort == "passed"


def test_options_that_run_the_model_need_the_weights_in_memory(decoder, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.zeros((2, 1, 16), np.int64))
    with pytest.raises(OptionError, match="calib.*runs the model, which needs the weights in memory"):
        prune(decoder, neurons=0.25, weights="disk", calib=calib)
    with pytest.raises(OptionError, match="sparsity.*rewrites weights value by value"):
        prune(decoder, pattern="2:4", weights="disk")
    with pytest.raises(OptionError, match="quantize.*runs the model"):
        prune(decoder, neurons=0.25, weights="disk", quantize="int8")
    with pytest.raises(OptionError, match="target.*runs the model"):
        prune(decoder, neurons=0.25, weights="disk", target="ort-mobile")


def test_cli_streams_and_never_touches_the_input(decoder, tmp_path):
    import subprocess
    import sys

    data = decoder.with_name(decoder.name + ".data")
    before = (decoder.read_bytes(), data.stat().st_mtime_ns)
    out = tmp_path / "cli.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(decoder), "--neurons", "0.25", "--weights", "disk",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "stay on disk" in proc.stdout + proc.stderr
    assert (decoder.read_bytes(), data.stat().st_mtime_ns) == before
    assert out.with_name("cli.onnx.data").stat().st_size < data.stat().st_size
