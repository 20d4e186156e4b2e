"""Data-driven criteria (act, apoz, wanda, recon) against numpy on the same activations."""
import numpy as np
import pytest
from onnx import numpy_helper
from textmodel import text_model

from onnxprune.core.criteria import criterion
from onnxprune.core.dependency import analyze_model
from onnxprune.core.plan import candidate_groups

MLP = """
g (float[2,4] x) => (float[2,3] y) {
  h0 = MatMul(x, W1)
  h = Relu(h0)
  y = MatMul(h, W2)
}"""

CONV_FLATTEN = """
g (float[2,3,4,4] x) => (float[2,5] y) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, W1)
  r = Relu(a)
  f = Flatten(r)
  y = Gemm <transB=1> (f, W2)
}"""


def _feeds(shape, batches=5, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]


def _scores(model, name, feeds, **kwargs):
    analysis = analyze_model(model)
    groups, _ = candidate_groups(analysis)
    crit = criterion(name)
    for key, value in kwargs.items():
        setattr(crit, key, value)
    crit.prepare(analysis, groups, feeds)
    return [crit.scores(analysis, g) for g in groups], crit


def _weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_mlp_hidden_unit_scores_match_numpy():
    model = text_model(MLP, {"W1": (4, 6), "W2": (6, 3)})
    w = _weights(model)
    feeds = _feeds((2, 4))
    h = np.concatenate([np.maximum(f["x"] @ w["W1"], 0) for f in feeds]).astype(np.float64)
    expected = {
        "act": np.abs(h).mean(axis=0),
        "apoz": 1 - (h == 0).mean(axis=0),
        "wanda": np.sqrt((h ** 2).mean(axis=0)) * np.abs(w["W2"]).sum(axis=1),
        "recon": (h ** 2).mean(axis=0) * (w["W2"] ** 2).sum(axis=1),
    }
    for name, want in expected.items():
        [got], _ = _scores(model, name, feeds)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    [compensated], _ = _scores(model, "recon", feeds, compensated=True)
    np.testing.assert_allclose(compensated, h.var(axis=0) * (w["W2"] ** 2).sum(axis=1), rtol=1e-5)


def test_flattened_channels_are_scored_over_all_their_positions():
    model = text_model(CONV_FLATTEN, {"W1": (6, 3, 3, 3), "W2": (5, 96)})
    feeds = _feeds((2, 3, 4, 4))
    import onnxruntime as ort

    probe = text_model(CONV_FLATTEN.replace("(float[2,5] y)", "(float[2,96] f)"), {"W1": _weights(model)["W1"],
                                                                                    "W2": (5, 96)})
    session = ort.InferenceSession(probe.SerializeToString())
    f = np.concatenate([session.run(["f"], feed)[0] for feed in feeds]).astype(np.float64)  # [N, 6*16]
    w2 = _weights(model)["W2"]
    per_position = np.sqrt((f ** 2).mean(axis=0)) * np.abs(w2).sum(axis=0)
    [got], _ = _scores(model, "wanda", feeds)
    np.testing.assert_allclose(got, per_position.reshape(6, 16).sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("name", ["act", "apoz", "wanda", "recon"])
def test_dead_units_score_lowest(name):
    w1 = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    w1[:, [1, 4]] = 0  # hidden units 1 and 4 are always zero
    model = text_model(MLP, {"W1": w1, "W2": (6, 3)})
    [scores], _ = _scores(model, name, _feeds((2, 4)))
    assert set(np.argsort(scores)[:2]) == {1, 4}
