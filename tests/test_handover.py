"""--target tensorrt | ort-mobile | cpu: the preset's channel multiple, its kind of int8, static
dims from --input-shape, and the checks and files of the hand-over (polygraphy lint, the .ort
model and its required-operators config); on the fixture, then on every shared real model."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import OptionError, prune
from onnxprune.core.plan import channel_step
from onnxprune.core.shapes import concrete_input_shapes

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny_resnet.onnx"
pytest.importorskip("onnxruntime.quantization")


def _calib(folder: Path, model: onnx.ModelProto, samples: int = 8) -> Path:
    """Random calibration inputs at the model's dims (ids and masks for integer inputs)."""
    shapes, _ = concrete_input_shapes(model)
    rng = np.random.default_rng(0)
    arrays = {}
    for vi in model.graph.input:
        if vi.name not in shapes:
            continue
        dims = [samples, *shapes[vi.name][1:]]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if dtype.kind in "iu":
            arrays[vi.name] = (np.ones(dims) if "mask" in vi.name else rng.integers(0, 100, dims)).astype(dtype)
        else:
            arrays[vi.name] = rng.standard_normal(dims).astype(dtype)
    path = folder / "calib.npz"
    np.savez(path, **arrays)
    return path


def _kept_multiples(result, step_of) -> bool:
    return all((d.group.channels - len(d.removed)) % step_of(d.group) == 0 or not len(d.removed)
               for d in result.plan.decisions)


@pytest.mark.parametrize("target, quantize, multiple", [("tensorrt", None, 8), ("tensorrt", "int8", 16),
                                                        ("ort-mobile", None, 8), ("cpu", "int8", 8)])
def test_presets_keep_their_channel_multiple(tmp_path, target, quantize, multiple):
    model = onnx.load(str(FIXTURE))
    calib = _calib(tmp_path, model) if quantize else None
    result = prune(model, filters=0.4, target=target, quantize=quantize, calib=calib, latency_runs=2)
    t = result.report["target"]
    assert t["name"] == target and t["round_to"] == multiple
    assert result.report["rounding"]["round_to"] == multiple
    assert any(n.startswith(f"--target {target} (multiples of {multiple})") for n in result.report["notes"])
    assert result.report["summary"]["channels_removed"] > 0
    assert _kept_multiples(result, lambda g: channel_step(result.analysis, g, multiple))
    # the one group left off a multiple is the 10-class output, which the tool never prunes
    assert [(o["channels"], o["why"].split(":")[0]) for o in t["widths"]["not_multiples"]] == [(10, "not pruned")]


def test_an_explicit_round_to_overrides_the_preset():
    result = prune(onnx.load(str(FIXTURE)), filters=0.4, target="cpu", round_to=4, latency_runs=0)
    assert result.report["target"]["round_to"] == 4 == result.report["rounding"]["round_to"]


def test_tensorrt_int8_is_symmetric_qdq_with_float_biases(tmp_path):
    model = onnx.load(str(FIXTURE))
    result = prune(model, filters=0.3, target="tensorrt", quantize="int8", calib=_calib(tmp_path, model),
                   latency_runs=0)
    q, t = result.report["quantization"], result.report["target"]
    assert q["format"] == "int8 QDQ symmetric" and q["per_channel"]
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    qdq = [n for n in result.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zero_points = [constants[n.input[2]] for n in qdq if len(n.input) > 2 and n.input[2] in constants]
    assert qdq and zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert t["qdq"] == {"nodes": len(qdq), "asymmetric": 0}
    biases = [constants[n.input[2]] for n in result.model.graph.node if n.op_type == "Conv" and len(n.input) > 2
              and n.input[2] in constants]
    assert biases and all(b.dtype == np.float32 for b in biases)
    assert t["lint"].get("passed") is True or "not installed" in t["lint"].get("skipped", "")


def test_tensorrt_refuses_what_it_does_not_run(tmp_path):
    model = onnx.load(str(FIXTURE))
    with pytest.raises(OptionError, match="every zero point 0"):
        prune(model, filters=0.3, target="tensorrt", quantize="uint8", calib=_calib(tmp_path, model))
    with pytest.raises(OptionError, match="static QDQ"):
        prune(model, filters=0.3, target="tensorrt", quantize="int8")
    with pytest.raises(OptionError, match="target"):
        prune(model, filters=0.3, target="warp-drive")


def _dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_input_shape_is_written_into_the_model():
    model = _dynamic_batch(onnx.load(str(FIXTURE)))
    result = prune(model, filters=0.3, target="tensorrt", input_shapes={"input": [2, 3, 32, 32]}, latency_runs=0)
    dims = [[d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in (result.model.graph.input[0],
                                                                           result.model.graph.output[0])]
    assert dims == [[2, 3, 32, 32], [2, 10]]
    assert result.report["target"]["static_dims"] == {"input": [2, 3, 32, 32]}
    assert result.report["target"]["dynamic_inputs"] == {}
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert ort.InferenceSession(result.model.SerializeToString()).run(None, {"input": x})[0].shape == (2, 10)
    # without --input-shape the dims stay as they were, and the hand-over says so
    loose = prune(model, filters=0.3, target="tensorrt", latency_runs=0)
    assert loose.report["target"]["dynamic_inputs"] == {"input": ["N", 3, 32, 32]}
    assert any("stay dynamic" in n and "optimization profile" in n for n in loose.report["notes"])
    assert loose.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_ort_mobile_writes_the_ort_model_and_its_operator_config(tmp_path):
    out = tmp_path / "m.pruned.onnx"
    done = subprocess.run([sys.executable, "-m", "onnxprune", str(FIXTURE), "--filters", "0.3", "--target",
                           "ort-mobile", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ort_file, config = tmp_path / "m.pruned.ort", tmp_path / "m.pruned.required_operators.config"
    assert ort_file.is_file() and config.is_file()
    assert f"wrote {out}, {ort_file}, {config}" in done.stdout
    assert "ai.onnx;" in config.read_text() and "Conv" in config.read_text()
    import onnxruntime as ort

    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    from_ort = ort.InferenceSession(str(ort_file)).run(None, {"input": x})[0]
    from_onnx = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    np.testing.assert_allclose(from_ort, from_onnx, rtol=1e-4, atol=1e-5)
    # the files beside the output are checked against the inputs like the output itself
    clash = subprocess.run([sys.executable, "-m", "onnxprune", str(FIXTURE), "--filters", "0.3", "--target",
                            "ort-mobile", "-o", str(out), "--calib", str(ort_file)],
                           capture_output=True, text=True, timeout=600)
    assert clash.returncode != 0 and "m.pruned.ort" in clash.stderr


def test_the_api_saves_the_files_that_go_beside_the_model(tmp_path):
    result = prune(onnx.load(str(FIXTURE)), filters=0.3, target="ort-mobile", latency_runs=0)
    assert set(result.files) == {".ort", ".required_operators.config"}
    result.save(tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx", "x.ort", "x.required_operators.config"]


def test_a_slower_result_is_said(monkeypatch):
    """Measure notes a pruned model that runs slower than the original (timings faked here)."""
    import onnxprune.passes.measure as measure

    times = iter([1.0, 2.0])
    monkeypatch.setattr(measure, "timed_runs", lambda *a, **k: (next(times), 3))
    result = prune(onnx.load(str(FIXTURE)), filters=0.3, target="cpu", latency_runs=3)
    assert result.report["target"]["latency_ms"] == {"before": 1.0, "after": 2.0}
    assert any("runs slower than the original" in n for n in result.report["notes"])


# -- every shared real model, with each preset --------------------------------------------------

REAL = ["rapidocr_det_ppocrv4_mobile.onnx", "rapidocr_cls_ppocr_mobile_v2.onnx", "rapidocr_rec_ppocrv4_svtr_lcnet.onnx",
        "nudenet_yolov8n_320.onnx", "magika_standard_v3_3.onnx", "paraphrase_minilm_l3_v2_bert.onnx",
        "silero_vad_16k_sequence_lstm.onnx", "mtcnn_onet.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_real_models_hand_over_with_each_preset(tmp_path, name):
    """Pruned with each preset and quantized static per channel: the result loads and runs,
    TensorRT's lint passes, and the .ort model loads and computes what the .onnx computes."""
    import onnxruntime as ort
    from real_models import fetch

    model = onnx.load(str(fetch(name)))
    shapes, _ = concrete_input_shapes(model)
    calib = _calib(tmp_path, model, samples=4)
    for target in ("tensorrt", "ort-mobile", "cpu"):
        result = prune(model, filters=0.3, target=target, quantize="int8", quant_mode="static", calib=calib,
                       input_shapes=shapes, latency_runs=1, calib_limit=4)
        t, q = result.report["target"], result.report["quantization"]
        assert q["per_channel"] and "QDQ" in q["format"], (target, q)
        assert result.report["summary"]["channels_removed"] > 0 or result.report["summary"].get("nothing_removed")
        assert t["dynamic_inputs"] == {}
        feeds = {k: v[:1] for k, v in np.load(calib).items()}
        outputs = ort.InferenceSession(result.model.SerializeToString()).run(None, feeds)
        assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"), target
        if target == "tensorrt":
            assert t["qdq"]["asymmetric"] == 0
            assert t["lint"].get("passed") is True or "not installed" in t["lint"].get("skipped", ""), t["lint"]
        if target == "ort-mobile":  # int8 kernels fused in the .ort may round a value a step the other way
            from_ort = ort.InferenceSession(result.files[".ort"]).run(None, feeds)
            for a, b in zip(from_ort, outputs):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                assert a.shape == b.shape
                close = np.isclose(a, b, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(b).max())))
                assert close.mean() > 0.999, (name, close.mean())
