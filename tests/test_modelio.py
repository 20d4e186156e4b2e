"""Loading and saving: external data, atomic writes, escaping locations."""
import onnx
import pytest
from onnx import numpy_helper

from onnxprune import OnnxPruneError, load_model, save_model
from onnxprune.core import modelio
from textmodel import text_model


def _model():
    return text_model("""
    g (float[1,3,4,4] x) => (float[1,512,4,4] y) {
      y = Conv <kernel_shape=[1,1]> (x, W)
    }""", {"W": (512, 3, 1, 1)})


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = save_model(_model(), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx.load(str(out)).graph.node[0].op_type == "Conv"


def test_save_refuses_the_input_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    with pytest.raises(OnnxPruneError, match="overwrite"):
        save_model(_model(), path, input_path=path)


def test_large_models_switch_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 10)
    out = save_model(_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    loaded = load_model(out)
    assert numpy_helper.to_array(loaded.graph.initializer[0]).shape == (512, 3, 1, 1)


def test_external_data_escaping_the_folder_is_refused(tmp_path):
    model = _model()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for entry in m.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../outside.bin"
    onnx.save(m, str(tmp_path / "evil.onnx"))
    with pytest.raises(OnnxPruneError, match="escapes"):
        load_model(tmp_path / "evil.onnx")


def test_model_bytes_equals_protobufs_own_count():
    import numpy as np
    from onnx import helper, numpy_helper

    from onnxprune.core.modelio import model_bytes

    model = onnx.load("fixtures/tiny_resnet.onnx")
    # a tensor without raw_data, one with a doc string, and a 200 KB one (multi-byte length prefix)
    model.graph.initializer.append(helper.make_tensor("listed", onnx.TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    big = numpy_helper.from_array(np.ones((50, 1000), np.float32), "big")
    big.doc_string = "documented"
    big.segment.begin, big.segment.end = 0, 50  # a singular message field
    model.graph.initializer.append(big)
    assert model_bytes(model) == model.ByteSize()
