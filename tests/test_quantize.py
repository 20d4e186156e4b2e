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
    assert q["latency_measured"] == {"input_shapes": {"input": [1, 3, 32, 32]}, "guessed_dims": []}
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


def _mlp():
    """input [1, 16] -> MatMul -> Relu -> MatMul -> [1, 4]: no convolution."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), name)
               for name, s in (("W1", (16, 32)), ("W2", (32, 4)))]
    nodes = [helper.make_node("MatMul", ["input", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["output"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_auto_mode_is_static_for_convolutions_and_dynamic_for_matrix_products(tmp_path):
    np.savez(tmp_path / "mlp.npz", input=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    auto = prune(_mlp(), neurons=0.25, quantize="int8", calib=str(tmp_path / "mlp.npz"), latency_runs=0)
    q = auto.report["quantization"]
    assert q["format"] == "int8 dynamic" and q["mode_reason"].startswith("no convolutions")
    assert any(n.op_type == "DynamicQuantizeLinear" for n in auto.model.graph.node)
    static = prune(_mlp(), neurons=0.25, quantize="int8", quant_mode="static", calib=str(tmp_path / "mlp.npz"),
                   latency_runs=0)
    assert static.report["quantization"]["format"] == "int8 QDQ"
    calib, _ = _calib(tmp_path)
    conv = prune(onnx.load(str(FIXTURE)), filters=0.3, quantize="int8", calib=str(calib), latency_runs=0)
    assert conv.report["quantization"]["mode_reason"] == "convolutions: static QDQ"
    with pytest.raises(OptionError, match="quant_mode='static': needs calib"):
        prune(_mlp(), neurons=0.25, quantize="int8", quant_mode="static")
    with pytest.raises(OptionError, match="quant_mode='dynamic': applies to"):
        prune(_mlp(), neurons=0.25, quant_mode="dynamic")


def test_cpu_target_quantizes_weights_to_7_bits_and_the_exact_run_is_reported(tmp_path):
    calib, _ = _calib(tmp_path)
    result = prune(onnx.load(str(FIXTURE)), filters=0.3, quantize="int8", calib=str(calib), target="cpu",
                   latency_runs=0)
    q = result.report["quantization"]
    assert q["reduce_range"] is True and q["format"] == "int8 QDQ"
    weights = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64  # 7 bits: [-64, 64]
    exact, kernels = q["fidelity"]["quantized_exact"]["cosine"], q["fidelity"]["quantized"]["cosine"]
    assert abs(exact - kernels) < 0.01  # 7-bit weights: the int8 kernels compute what the model says
    alone = prune(onnx.load(str(FIXTURE)), filters=0.3, quantize="int8", calib=str(calib), quant_reduce_range=True,
                  latency_runs=0)
    assert alone.report["quantization"]["reduce_range"] is True and "target" not in alone.report


def test_entropy_calibration_sets_its_own_ranges(tmp_path, capfd):
    """Entropy ranges differ from minmax's (onnxruntime's quantize_static alone gives minmax's
    ranges for entropy), and nothing is printed on standard output."""
    calib, _ = _calib(tmp_path)

    def activation_scales(method):
        model = prune(onnx.load(str(FIXTURE)), filters=0.3, quantize="int8", calib=str(calib),
                      quant_calibration=method, latency_runs=0).model
        constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.input[0]: float(constants[n.input[1]]) for n in model.graph.node
                if n.op_type == "QuantizeLinear" and constants[n.input[1]].size == 1}

    capfd.readouterr()
    minmax, entropy = activation_scales("minmax"), activation_scales("entropy")
    assert minmax.keys() == entropy.keys() and len(minmax) > 10
    narrower = sum(entropy[k] < minmax[k] * 0.999 for k in minmax)
    assert narrower >= len(minmax) // 2, (narrower, len(minmax))  # clipping outliers narrows the ranges
    assert all(entropy[k] <= minmax[k] * 1.001 for k in minmax)
    assert capfd.readouterr().out == ""
