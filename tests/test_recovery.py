"""Training-free recovery: bias compensation, least-squares refit, BatchNorm re-estimation."""
import numpy as np
import onnxruntime as ort
from onnx import numpy_helper
from textmodel import text_model

from onnxprune import recovery
from onnxprune.core.apply import apply_plan
from onnxprune.core.dependency import analyze_model
from onnxprune.core.plan import candidate_groups, group_key, plan_from_removed

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


CONV3X3 = """
g (float[4,3,8,8] x) => (float[4,5,4,4] y) {
  a = Conv <kernel_shape=[1,1]> (x, W1)
  y = Conv <kernel_shape=[3,3], pads=[1,1,1,1], strides=[2,2]> (a, W2, B2)
}"""


def test_lsq_refits_a_strided_3x3_convolution_through_its_patches():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    w1[5] = w1[0] + 2 * w1[1]  # a5 = a0 + 2 a1 at every pixel, so in every patch too
    model = text_model(CONV3X3, {"W1": w1, "W2": (5, 6, 3, 3), "B2": (5,)})
    feeds = _feeds((4, 3, 8, 8), batches=8)  # 32 samples x 16 positions = 512 rows for 54 inputs
    want = _run(model, feeds)
    bias_only, _ = _prune(model, [5], ("bias",), feeds)
    refit, rec = _prune(model, [5], ("lsq",), feeds)
    assert not any("lsq refit" in n for n in rec.notes), rec.notes
    assert np.abs(_run(bias_only, feeds) - want).max() > 0.1
    # Exact up to the small ridge towards the original weights (relative 1e-4 of the Gram).
    assert np.linalg.norm(_run(refit, feeds) - want) < 1e-3 * np.linalg.norm(want)


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


def test_batchnorm_after_a_pruned_layer_becomes_the_best_affine_match_of_the_original():
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
    want = _run(model, feeds)
    pruned, rec = _prune(model, [0, 1, 2, 3], ("bn",), feeds)
    before = _run(pruned, feeds)
    assert recovery.reestimate_batchnorm(pruned, model, rec.bn_nodes, feeds) == 1
    after = _run(pruned, feeds)
    # Per channel, the corrected output is the least-squares fit of the original's output by
    # an affine function of the uncorrected one: it cannot be worse than leaving it alone.
    for c in range(5):
        x, y = before[:, c].reshape(-1), want[:, c].reshape(-1)
        coef, *_ = np.linalg.lstsq(np.c_[x, np.ones_like(x)], y, rcond=None)
        np.testing.assert_allclose(after[:, c].reshape(-1), np.c_[x, np.ones_like(x)] @ coef, atol=1e-4)
    assert np.square(after - want).mean() < np.square(before - want).mean()
    np.testing.assert_allclose(after.mean(axis=(0, 2, 3)), want.mean(axis=(0, 2, 3)), atol=1e-4)


TWO_BN = """
g (float[4,3,6,6] x) => (float[4,5,6,6] y) {
  a = Conv <kernel_shape=[1,1]> (x, W1)
  r = Relu(a)
  b = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (r, W2)
  n = BatchNormalization (b, g1, b1, m1, v1)
  s = Relu(n)
  c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (s, W3)
  y = BatchNormalization (c, g2, b2, m2, v2)
}"""


def test_batchnorms_in_a_chain_are_corrected_one_after_the_other():
    ones, zeros = (lambda n: np.ones(n, np.float32)), (lambda n: np.zeros(n, np.float32))
    weights = {"W1": (8, 3, 1, 1), "W2": (8, 8, 3, 3), "W3": (5, 8, 3, 3), "g1": ones(8), "b1": zeros(8),
               "m1": zeros(8), "v1": ones(8), "g2": ones(5), "b2": zeros(5), "m2": zeros(5), "v2": ones(5)}
    model = text_model(TWO_BN, weights)
    feeds = _feeds((4, 3, 6, 6))
    want = _run(model, feeds)
    analysis = analyze_model(model)
    groups, _ = candidate_groups(analysis)
    assert len(groups) == 2
    plan = plan_from_removed(analysis, {group_key(analysis, g): [0, 2, 5] for g in groups})
    rec = recovery.prepare(analysis, plan, ("bn",), feeds)
    apply_plan(analysis, plan)
    recovery.finish(analysis, plan, rec)
    pruned = analysis.graph.to_model()
    assert len(rec.bn_nodes) == 2
    at_once, in_order, by_hand = (pruned.__class__() for _ in range(3))
    for copy in (at_once, in_order, by_hand):
        copy.CopyFrom(pruned)
    assert recovery.reestimate_batchnorm(at_once, model, rec.bn_nodes, feeds, passes=1) == 2
    assert recovery.reestimate_batchnorm(in_order, model, rec.bn_nodes, feeds) == 2
    first, second = (n.output[0] for n in by_hand.graph.node if n.op_type == "BatchNormalization")
    for name in (first, second):
        recovery.reestimate_batchnorm(by_hand, model, {name: rec.bn_nodes[name]}, feeds)
    np.testing.assert_allclose(_run(in_order, feeds), _run(by_hand, feeds), atol=1e-5)
    # Measured at once, the second layer also corrects what the first one's correction fixed.
    error = {k: np.square(_run(m, feeds) - want).mean() for k, m in (("at once", at_once), ("in order", in_order))}
    assert error["in order"] < error["at once"], error


def test_lsq_with_too_few_calibration_rows_falls_back_to_bias():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 6)).astype(np.float32)
    model = text_model(LINEAR, {"W1": w1, "W2": (6, 3), "B2": (3,)})
    feeds = _feeds((8, 4), batches=1)  # 8 rows for 6 inputs: a refit would fit the noise
    lsq, rec = _prune(model, [5], ("lsq",), feeds)
    bias, _ = _prune(model, [5], ("bias",), feeds)
    assert any("lsq refit skipped" in n for n in rec.notes)
    np.testing.assert_array_equal(_run(lsq, feeds), _run(bias, feeds))


# -- sequential refit ----------------------------------------------------------------------------
def _prune_refit(model, removed, methods, feeds):
    """_prune, then the after-export steps (refit) as the recovery pass runs them."""
    pruned, rec = _prune(model, removed, methods, feeds)
    rec.refitted = recovery.refit_layers(pruned, model, rec.refit, feeds, notes=rec.notes)
    return pruned, rec


DEEP_MLP = """
g (float[16,4] x) => (float[16,3] y) {
  h0 = MatMul(x, W1)
  h1 = Add(h0, B1)
  h = Relu(h1)
  k0 = MatMul(h, W2)
  k = Relu(k0)
  y = Gemm <alpha=0.5, beta=2.0, transB=1> (k, W3, B3)
}"""


def test_refit_corrects_the_layers_after_the_pruned_one_too():
    model = text_model(DEEP_MLP, {"W1": (4, 10), "B1": (10,), "W2": (10, 8), "W3": (3, 8), "B3": (3,)})
    feeds = _feeds((16, 4), batches=32)
    want = _run(model, feeds)
    lsq, _ = _prune_refit(model, [0, 3, 7], ("lsq",), feeds)
    refit, rec = _prune_refit(model, [0, 3, 7], ("refit",), feeds)
    # The MatMul that lost inputs (its bias Add is new) and the Gemm after it; not the first layer.
    assert rec.refitted == 2 and [t.output for t in rec.refit] == ["k0", "y"], (rec.refit, rec.notes)
    w1 = {i.name: numpy_helper.to_array(i) for i in refit.graph.initializer}["W1"]
    np.testing.assert_array_equal(w1, np.delete(numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "W1")), [0, 3, 7], axis=1))
    error = {name: float(np.square(_run(m, feeds) - want).mean()) for name, m in (("lsq", lsq), ("refit", refit))}
    # On the calibration data the Gemm's refit is a least-squares fit from the inputs lsq left it.
    assert error["refit"] < error["lsq"], error
    held_out = _feeds((16, 4), batches=4, seed=9)
    held = {name: float(np.square(_run(m, held_out) - _run(model, held_out)).mean())
            for name, m in (("lsq", lsq), ("refit", refit))}
    assert held["refit"] < held["lsq"], held


def test_refit_reproduces_a_linear_chain_through_gemm_alpha_beta_and_transb():
    linear = DEEP_MLP.replace("h = Relu(h1)", "h = Identity(h1)").replace("k = Relu(k0)", "k = Identity(k0)")
    model = text_model(linear, {"W1": (4, 10), "B1": (10,), "W2": (10, 8), "W3": (3, 8), "B3": (3,)})
    feeds = _feeds((16, 4), batches=8)
    pruned, rec = _prune_refit(model, [1, 2, 4, 6], ("refit",), feeds)  # 6 hidden units still span x
    assert rec.refitted == 2, rec.notes
    want = _run(model, feeds)
    assert np.linalg.norm(_run(pruned, feeds) - want) < 1e-3 * np.linalg.norm(want)


CONV_CHAIN = """
g (float[4,3,8,8] x) => (float[4,5,8,8] y) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, W1, B1)
  r = Relu(a)
  b = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (r, W2)
  s = Relu(b)
  y = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (s, W3, B3)
}"""


def test_refit_keeps_a_planted_dead_model_exact_and_improves_a_live_one():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w2 = rng.standard_normal((7, 6, 3, 3)).astype(np.float32)
    weights = {"W1": w1, "B1": b1, "W2": w2, "W3": (5, 7, 3, 3), "B3": (5,)}
    feeds = _feeds((4, 3, 8, 8), batches=8)
    dead = dict(weights, W1=w1.copy(), B1=b1.copy(), W2=w2.copy())
    dead["W1"][[1, 4]], dead["B1"][[1, 4]] = 0.0, 0.0
    model = text_model(CONV_CHAIN, dead)
    pruned, rec = _prune_refit(model, [1, 4], ("refit",), feeds)
    # nothing to gain: a refit does no better on the other half of the data than the weights as
    # they are, so they stay (or come back equal, up to rounding)
    assert len(rec.refit) == 2
    np.testing.assert_allclose(_run(pruned, feeds), _run(model, feeds), atol=1e-4)
    # The same channels, alive: the second convolution is refitted as lsq would (its inputs are
    # the original's); the last one only where that carries over to unseen data
    model = text_model(CONV_CHAIN, weights)
    want = _run(model, feeds)
    errors = {m: float(np.square(_run(_prune_refit(model, [1, 4], (m,), feeds)[0], feeds) - want).mean())
              for m in ("none", "lsq", "refit")}
    assert errors["refit"] <= 1.001 * errors["lsq"] and errors["refit"] < 0.5 * errors["none"], errors


def test_refit_that_does_not_carry_over_to_unseen_data_is_left_out():
    # 4 batches of 16 rows: each half has 32 rows for 9 inputs of the Gemm, and the pruned
    # network's inputs follow the original's loosely; a layer whose fit on one half does worse
    # on the other half than its weights as they are keeps them, and the notes say so
    model = text_model(DEEP_MLP, {"W1": (4, 10), "B1": (10,), "W2": (10, 8), "W3": (3, 8), "B3": (3,)})
    feeds = _feeds((16, 4), batches=4)
    from onnxprune.recovery import refit

    original = refit._carries_over
    verdicts = []
    refit._carries_over = lambda *args: verdicts.append(original(*args)) or verdicts[-1]
    try:
        pruned, rec = _prune_refit(model, [0, 3, 7], ("refit",), feeds)
    finally:
        refit._carries_over = original
    assert len(verdicts) == 2 and rec.refitted == sum(verdicts)
    if not all(verdicts):
        assert any("did worse on the other half" in n for n in rec.notes), rec.notes


def test_refit_with_too_few_rows_leaves_the_layer_and_says_so():
    model = text_model(DEEP_MLP, {"W1": (4, 10), "B1": (10,), "W2": (10, 8), "W3": (3, 8), "B3": (3,)})
    feeds = _feeds((16, 4), batches=1)  # 16 rows: fewer than 4 per input of either layer
    refit, rec = _prune_refit(model, [0, 3, 7], ("refit",), feeds)
    bias, _ = _prune_refit(model, [0, 3, 7], ("bias",), feeds)
    assert rec.refitted == 0 and any("refit skipped for 2 layer(s)" in n for n in rec.notes), rec.notes
    np.testing.assert_array_equal(_run(refit, feeds), _run(bias, feeds))


def test_refit_runs_layers_apart_when_their_moments_would_pass_the_budget(monkeypatch):
    from onnxprune.recovery import refit

    model = text_model(DEEP_MLP, {"W1": (4, 10), "B1": (10,), "W2": (10, 8), "W3": (3, 8), "B3": (3,)})
    feeds = _feeds((16, 4), batches=32)
    pruned, rec = _prune(model, [0, 3, 7], ("refit",), feeds)
    copies = {}
    for case, budget in (("one run", refit.MOMENT_BUDGET_BYTES), ("apart", 1)):
        monkeypatch.setattr(refit, "MOMENT_BUDGET_BYTES", budget)
        copies[case] = pruned.__class__()
        copies[case].CopyFrom(pruned)
        assert refit.refit_layers(copies[case], model, rec.refit, feeds, passes=1) == 2
    by_layer = _prune_refit(model, [0, 3, 7], ("refit",), feeds)[0]  # 2 layers, up to 16 runs: one each
    np.testing.assert_allclose(_run(copies["apart"], feeds), _run(by_layer, feeds), atol=1e-6)
    # in one run the Gemm was fitted to the inputs the MatMul gave before its own refit
    assert not np.allclose(_run(copies["one run"], feeds), _run(by_layer, feeds), atol=1e-6)
