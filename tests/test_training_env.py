"""The onnxruntime-training flavour installs, imports its on-device API, and trains a step.

Runs only in an environment with onnxruntime-training-cpu (CI builds one beside the
main one: `pytest -m training`). Fine-tuning itself is a later feature; this pins
that the flavour the feature will need works next to onnxprune's dependencies.
"""
import numpy as np
import onnx
import pytest

from onnxprune.core.runtime import import_training_api, runtime_description
from textmodel import text_model

pytestmark = pytest.mark.training


def test_training_api_imports_and_runs_one_step(tmp_path):
    artifacts, api = import_training_api()
    assert "training" in runtime_description()
    model = text_model("""
    g (float[4,3,8,8] input) => (float[4,5] logits) {
      a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (input, W1, B1)
      r = Relu(a)
      p = GlobalAveragePool(r)
      f = Flatten(p)
      logits = Gemm <transB=1> (f, W2, B2)
    }""", {"W1": (6, 3, 3, 3), "B1": (6,), "W2": (5, 6), "B2": (5,)})
    params = ["W1", "B1", "W2", "B2"]
    artifacts.generate_artifacts(model, requires_grad=params, frozen_params=[],
                                 loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(tmp_path))
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        m = onnx.load(str(tmp_path / name))
        m.ir_version = min(m.ir_version, 10)  # ORT 1.19 refuses the IR onnx>=1.17 writes
        onnx.save(m, str(tmp_path / name))
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state, str(tmp_path / "eval_model.onnx"))
    optimizer = api.Optimizer(str(tmp_path / "optimizer_model.onnx"), module)
    module.train()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 5, size=4).astype(np.int64)
    losses = []
    for _ in range(5):
        losses.append(float(module(x, y)))
        optimizer.step()
        module.lazy_reset_grad()
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
