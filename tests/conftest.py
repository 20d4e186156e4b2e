import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # fixtures/ and tests/ helpers import as top-level modules
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def torch_fixture_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("torch_fixtures")


@pytest.fixture(scope="session")
def export_fixture(torch_fixture_dir):
    """Export a torch fixture architecture once per session and return the loaded model."""
    cache = {}

    def get(name, opset=17, dynamo=False):
        key = (name, opset, dynamo)
        if key not in cache:
            pytest.importorskip("torch")
            from fixtures.torch_models import export

            path = torch_fixture_dir / f"{name}_{opset}_{'dynamo' if dynamo else 'legacy'}.onnx"
            export(name, path, opset=opset, dynamo=dynamo)
            cache[key] = onnx.load(str(path))
        return cache[key]

    return get


def run_model(model, feeds, optimized=True):
    """Outputs from onnxruntime. optimized=False runs the graph as written (no fusions): QDQ
    graphs then compute in float, not in onnxruntime's int8 kernels, whose u8s8 path saturates
    on CPUs without VNNI (AVX2), differently for different channel counts."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def max_rel_diff(a_list, b_list, atol=0.0):
    """Largest |a - b| over all outputs, relative to max(|a|, atol) of each output."""
    worst = 0.0
    for a, b in zip(a_list, b_list):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        a, b = a[np.isfinite(a)], b[np.isfinite(a)]
        if a.size == 0:
            continue
        scale = max(float(np.abs(a).max()), atol, 1e-12)
        worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


def quantize_qdq(model, folder, per_channel: bool):
    """`model` quantized as onnxruntime's quantizer writes QDQ graphs (int8 weights, uint8
    activations), calibrated on 4 random batches at its first input's static dims."""
    import onnx
    import pytest

    quantization = pytest.importorskip("onnxruntime.quantization")
    src, dst = folder / "float.onnx", folder / f"qdq-{per_channel}.onnx"
    onnx.save(model, str(src))
    name = model.graph.input[0].name
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    batches = iter([{name: np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(4)])

    class Reader(quantization.CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    quantization.quantize_static(str(src), str(dst), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=per_channel, weight_type=quantization.QuantType.QInt8,
                                 activation_type=quantization.QuantType.QUInt8)
    return onnx.load(str(dst))
