"""A model above protobuf's 2 GB limit: external data in, external data out, same function.

Slow tier: ~2.2 GB of weights are generated, written, pruned and run twice.
"""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.slow

HIDDEN = 16384  # two 16384 x 16384 float32 matrices: 2.15 GB


def _write_big_model(path, dead):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32)
    w1[:, dead] = 0.0  # dead hidden units: nothing flows in ...
    w2 = rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32)
    w2[dead, :] = 0.0  # ... and nothing flows out
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, HIDDEN])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    del w1, w2
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path), save_as_external_data=True, location="big.onnx.data")


def test_prune_a_model_above_2gb(tmp_path):
    dead = np.sort(np.random.default_rng(1).choice(HIDDEN, size=int(0.3 * HIDDEN), replace=False))
    src, out, report = tmp_path / "big.onnx", tmp_path / "big.pruned.onnx", tmp_path / "r.json"
    _write_big_model(src, dead)
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(src), "--filters", "0.3", "--report", str(report)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["groups"][0]["removed"] == dead.tolist()
    assert data["verification"]["onnxruntime"] == "passed"
    assert data["verification"]["max_rel_diff"] <= 1e-4
    assert out.stat().st_size < src.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size

    import onnxruntime as ort

    x = np.random.default_rng(2).standard_normal((1, HIDDEN)).astype(np.float32)
    expected = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(expected - got).max() <= 1e-4 * np.abs(expected).max()

    # Nothing removed: the output is above 2 GB again and must be written with external data.
    same = tmp_path / "same.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(src), "--filters", "0", "-o", str(same),
                           "--no-verify"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "same.onnx.data").stat().st_size >= 2 * HIDDEN * HIDDEN * 4
    got = ort.InferenceSession(str(same), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(expected, got)
