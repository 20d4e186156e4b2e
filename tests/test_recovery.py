"""Training-free recovery: bias compensation, least-squares refit, BatchNorm re-estimation."""
import numpy as np
import onnxruntime as ort
from onnx import numpy_helper
from textmodel import text_model

from onnxprune import recovery
from onnxprune.apply import apply_plan
from onnxprune.pipeline import analyze_model
from onnxprune.plan import candidate_groups, group_key, plan_from_removed

MLP = """
g (float[8,4] x) => (float[8,3] y) {
  h0 = MatMul(x, W1)
  h1 = Add(h0, B1)
  h = Relu(h1)
  y0 = MatMul(h, W2)
  y = Add(y0, B2)
}"""

LINEAR = """
g (float[8,4] x) => (float[8,3] y) {
  h = MatMul(x, W1)
  y = Gemm <alpha=0.5, beta=2.0> (h, W2, B2)
}"""


def _feeds(shape, batches=6, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString())
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _prune(model, removed, methods, feeds):
    """Remove `removed` channels from the first prunable group, with the given recovery."""
    analysis = analyze_model(model)
    groups, _ = candidate_groups(analysis)
    plan = plan_from_removed(analysis, {group_key(analysis, groups[0]): removed})
    rec = recovery.prepare(analysis, plan, methods, feeds)
    apply_plan(analysis, plan)
    recovery.finish(analysis, plan, rec)
    return analysis.graph.to_model(), rec


def test_bias_compensation_restores_a_constant_channel_exactly():
    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    w1[:, 2], b1[2] = 0.0, 1.5  # hidden unit 2 is always relu(1.5): no information, but a mean
    model = text_model(MLP, {"W1": w1, "B1": b1, "W2": (6, 3), "B2": (3,)})
    feeds = _feeds((8, 4))
    want = _run(model, feeds)
    plain, _ = _prune(model, [2], (), feeds)
    compensated, rec = _prune(model, [2], ("bias",), feeds)
    assert np.abs(_run(plain, feeds) - want).max() > 0.1
    np.testing.assert_allclose(_run(compensated, feeds), want, atol=1e-5)
    assert rec.layers == 1


def test_lsq_refit_recovers_a_linearly_dependent_channel():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    w1[:, 5] = w1[:, 0] + 2 * w1[:, 1]  # h5 = h0 + 2 h1: removable without loss
    model = text_model(LINEAR, {"W1": w1, "W2": (6, 3), "B2": (3,)})
    feeds = _feeds((8, 4))
    want = _run(model, feeds)
    bias_only, _ = _prune(model, [5], ("bias",), feeds)
    refit, _ = _prune(model, [5], ("lsq",), feeds)
    assert np.abs(_run(bias_only, feeds) - want).max() > 0.1
    np.testing.assert_allclose(_run(refit, feeds), want, atol=1e-3)


def test_recovery_keeps_a_planted_dead_model_exact():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    w1[:, [1, 3]], w2[[1, 3]] = 0.0, 0.0
    model = text_model(MLP, {"W1": w1, "B1": np.zeros(6, np.float32), "W2": w2, "B2": (3,)})
    feeds = _feeds((8, 4))
    want = _run(model, feeds)
    for methods in (("bias",), ("lsq",), ("bias", "bn")):
        pruned, _ = _prune(model, [1, 3], methods, feeds)
        np.testing.assert_allclose(_run(pruned, feeds), want, atol=1e-5, err_msg=str(methods))


CONV_BN = """
g (float[4,3,6,6] x) => (float[4,5,6,6] y) {
  a = Conv <kernel_shape=[1,1]> (x, W1)
  r = Relu(a)
  b = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (r, W2)
  y = BatchNormalization (b, gamma, beta, mean, var)
}"""


def test_batchnorm_after_a_pruned_layer_follows_its_input_shift():
    weights = {"W1": (8, 3, 1, 1), "W2": (5, 8, 3, 3), "gamma": np.ones(5, np.float32),
               "beta": np.zeros(5, np.float32), "mean": np.zeros(5, np.float32), "var": np.ones(5, np.float32)}
    model = text_model(CONV_BN, weights)
    feeds = _feeds((4, 3, 6, 6))
    # Give the BN the statistics of its input on this data, as training would have.
    b = _run(text_model(CONV_BN.replace("(float[4,5,6,6] y)", "(float[4,5,6,6] b)"), weights), feeds)
    for init in model.graph.initializer:
        if init.name in ("mean", "var"):
            value = b.mean(axis=(0, 2, 3)) if init.name == "mean" else b.var(axis=(0, 2, 3))
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
    pruned, rec = _prune(model, [0, 1, 2, 3], ("bn",), feeds)
    assert recovery.reestimate_batchnorm(pruned, model, rec.bn_nodes, feeds) == 1
    y = _run(pruned, feeds)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-3)


def test_lsq_with_too_few_calibration_rows_falls_back_to_bias():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    model = text_model(LINEAR, {"W1": w1, "W2": (6, 3), "B2": (3,)})
    feeds = _feeds((8, 4), batches=1)  # 8 rows for 6 inputs: a refit would fit the noise
    lsq, rec = _prune(model, [5], ("lsq",), feeds)
    bias, _ = _prune(model, [5], ("bias",), feeds)
    assert any("lsq refit skipped" in n for n in rec.notes)
    np.testing.assert_array_equal(_run(lsq, feeds), _run(bias, feeds))
