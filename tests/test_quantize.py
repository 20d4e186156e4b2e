"""--quantize: the pruned model quantized as the last pass (static QDQ with calibration data,
dynamic without, fp16), loading in onnxruntime, with the report comparing original, pruned and
quantized; old-opset models (Paddle's Constant-node weights at opset 11) converted for
per-channel weights."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import OptionError, prune

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny_resnet.onnx"
pytest.importorskip("onnxruntime.quantization")


def _calib(tmp_path):
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    return tmp_path / "calib.npz", x


@pytest.mark.parametrize("fmt", ["int8", "uint8"])
def test_static_qdq_per_channel_with_calibration(tmp_path, fmt):
    calib, x = _calib(tmp_path)
    result = prune(onnx.load(str(FIXTURE)), filters=0.3, quantize=fmt, calib=str(calib))
    q = result.report["quantization"]
    assert q["format"] == f"{fmt} QDQ" and q["per_channel"] and q["calibration"] == {"samples": 16,
                                                                                      "method": "minmax"}
    ops = {n.op_type for n in result.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weight_types = {t.data_type for t in result.model.graph.initializer if len(t.dims) == 4}
    assert weight_types == {onnx.TensorProto.INT8}
    # a tiny model: node and tensor names weigh as much as its int8 weights
    assert q["file_bytes"]["quantized"] < 0.7 * q["file_bytes"]["pruned"] < q["file_bytes"]["original"]
    # quantization adds little to what pruning changed
    assert q["fidelity"]["quantized"]["cosine"] > q["fidelity"]["pruned"]["cosine"] - 0.02
    import onnxruntime as ort

    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, {"input": x[:1]})[0]).all()


def test_cli_prints_the_three_models_side_by_side(tmp_path):
    import subprocess
    import sys

    calib, _ = _calib(tmp_path)
    out = tmp_path / "q.onnx"
    done = subprocess.run([sys.executable, "-m", "onnxprune", str(FIXTURE), "--filters", "0.3", "--quantize", "int8",
                           "--calib", str(calib), "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "quantized int8 QDQ: file" in done.stdout and "pruned" in done.stdout and out.exists()
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(out)).graph.node)


def test_dynamic_without_data_and_fp16(tmp_path):
    dynamic = prune(onnx.load(str(FIXTURE)), filters=0.3, quantize="int8", latency_runs=0)
    assert dynamic.report["quantization"]["format"] == "int8 dynamic"
    assert any("no --calib: dynamic quantization" in n for n in dynamic.report["notes"])
    half = prune(onnx.load(str(FIXTURE)), filters=0.3, quantize="fp16", latency_runs=0)
    types = {t.data_type for t in half.model.graph.initializer if len(t.dims) == 4}
    assert types == {onnx.TensorProto.FLOAT16}
    assert half.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # interface kept
    with pytest.raises(OptionError, match="sparse_storage"):
        prune(onnx.load(str(FIXTURE)), sparsity=0.8, sparse_storage=True, quantize="int8")


def test_an_opset_11_export_with_constant_weights_quantizes_per_channel(tmp_path):
    """Paddle at opset 11 keeps weights in Constant nodes; per-channel DequantizeLinear needs
    opset 13: the model is converted, and the quantized result loads and runs."""
    from real_models import fetch

    path = fetch("rapidocr_cls_ppocr_mobile_v2.onnx")
    x = np.random.default_rng(0).random((8, 3, 48, 192)).astype(np.float32)
    np.savez(tmp_path / "cls.npz", x=x)
    result = prune(onnx.load(str(path)), filters=0.3, quantize="int8", calib=str(tmp_path / "cls.npz"),
                   input_shapes={"x": [1, 3, 48, 192]}, latency_runs=0)
    assert [o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert any("opset 11 converted to 13" in n for n in result.report["notes"])
    assert result.report["quantization"]["per_channel"]
    import onnxruntime as ort

    out = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x[:1]})[0]
    assert out.shape == (1, 2) and np.isfinite(out).all()


def test_accuracy_of_the_three_models_on_val_data(tmp_path):
    """--val with --quantize: top-1 of original, pruned and quantized on labelled data. The
    labels are the original's own predictions, so it scores 1.0 on them exactly."""
    import onnxruntime as ort

    calib, x = _calib(tmp_path)
    model = onnx.load(str(FIXTURE))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    labels = np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0].argmax(axis=1) for i in range(len(x))])
    np.savez(tmp_path / "val.npz", input=x, labels=labels)
    result = prune(model, filters=0.0, quantize="int8", calib=str(calib), val=str(tmp_path / "val.npz"),
                   latency_runs=0)
    accuracy = result.report["quantization"]["accuracy"]
    assert accuracy["samples"] == 16
    assert accuracy["top1"]["original"] == 1.0 == accuracy["top1"]["pruned"]  # ratio 0: the same function
    assert 0.5 <= accuracy["top1"]["quantized"] <= 1.0
    with pytest.raises(OptionError, match="fine-tuning and quantization"):
        prune(model, filters=0.3, val=str(tmp_path / "val.npz"))
