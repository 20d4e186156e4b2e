"""Gradient criteria (--importance taylor | fisher | obd) against gradients computed by hand in
numpy on a small MLP, with labels and with the model's own predictions; planted-dead neurons
score zero and are exactly what goes."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from textmodel import text_model

import onnxprune
from onnxprune.core.criteria import criterion
from onnxprune.core.dependency import analyze_model
from onnxprune.core.plan import candidate_groups

pytestmark = pytest.mark.training

MLP = """
g (float[N,6] x) => (float[N,3] y) {
  h = MatMul(x, W1)
  z = Add(h, B1)
  r = Relu(z)
  y = MatMul(r, W2)
}"""


def mlp(dead=()):
    model = text_model(MLP, {"W1": (6, 8), "B1": (8,), "W2": (8, 3)}, seed=3)
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor).copy()
        if tensor.name == "W1":
            value[:, list(dead)] = 0.0
        if tensor.name == "B1":
            value[list(dead)] = -0.1  # a dead neuron: nothing through the Relu
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return model


class Batches(list):
    labels = None


def data(samples=12, labels=True):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((samples, 6)).astype(np.float32)
    batches = Batches([{"x": x[:5]}, {"x": x[5:]}])
    batches.labels = rng.integers(0, 3, samples) if labels else None
    return x, batches


def by_hand(model, x, labels, per_weight=None):
    """Per-sample gradients of the cross-entropy, and the three scores of the 8 hidden neurons
    (with `per_weight`, a dict, also each weight's mean |g w| and mean g^2 under W1_taylor, ...)."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    taylor, fisher, obd_w1, obd_w2 = np.zeros(8), np.zeros(8), np.zeros(8), np.zeros(8)
    sums = {key: 0.0 for key in ("W1_taylor", "W2_taylor", "W1_g2", "W2_g2")}
    for i, row in enumerate(x.astype(np.float64)):
        z = row @ w["W1"] + w["B1"]
        r = np.maximum(z, 0)
        y = r @ w["W2"]
        p = np.exp(y - y.max())
        p /= p.sum()
        label = labels[i] if labels is not None else int(np.argmax(y))
        dy = p - np.eye(3)[label]
        g2 = np.outer(r, dy)
        dz = (w["W2"] @ dy) * (z > 0)
        g1 = np.outer(row, dz)
        # members: W1's columns (producer), W2's rows (consumer); B1 is not a scored role
        first = (g1 * w["W1"]).sum(axis=0) + (g2 * w["W2"]).sum(axis=1)
        taylor += np.abs(first)
        fisher += first ** 2
        obd_w1 += (g1 ** 2 * w["W1"] ** 2).sum(axis=0)
        obd_w2 += (g2 ** 2 * w["W2"] ** 2).sum(axis=1)
        for name, g in (("W1", g1), ("W2", g2)):
            sums[f"{name}_taylor"] = sums[f"{name}_taylor"] + np.abs(g * w[name])
            sums[f"{name}_g2"] = sums[f"{name}_g2"] + g * g
    n = len(x)
    if per_weight is not None:
        per_weight.update({key: value / n for key, value in sums.items()})
    return {"taylor": taylor / n, "fisher": fisher / (2 * n), "obd": (obd_w1 + obd_w2) / (2 * n)}


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "predicted"])
def test_scores_match_numpy(labelled):
    model = mlp()
    x, batches = data(labels=labelled)
    expected = by_hand(model, x, batches.labels)
    analysis = analyze_model(model, {"x": [5, 6]})
    groups, _ = candidate_groups(analysis)
    (group,) = [g for g in groups if g.channels == 8]
    for name in ("taylor", "fisher", "obd"):
        crit = criterion(name)
        crit.prepare(analysis, groups, batches)
        np.testing.assert_allclose(crit.scores(analysis, group), expected[name], rtol=2e-4, atol=1e-9)
        assert crit.run.samples == 12 and crit.run.labels == ("given" if labelled else "predicted")
        assert any("12 calibration sample(s)" in note for note in crit.notes)


@pytest.mark.parametrize("name", ["taylor", "fisher", "obd"])
def test_planted_dead_neurons_score_zero_and_go_exactly(tmp_path, name):
    dead = (1, 4, 6)
    model = mlp(dead)
    x, _ = data()
    np.savez(tmp_path / "calib.npz", x=x)
    result = onnxprune.prune(model, neurons=3 / 8, importance=name, calib=str(tmp_path / "calib.npz"),
                             latency_runs=0)
    (decision,) = [d for d in result.plan.decisions if len(d.removed)]
    assert sorted(decision.removed.tolist()) == list(dead)
    import onnxruntime as ort

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(result.model), run(model), rtol=1e-6, atol=1e-6)
    gradients = result.report["gradients"]
    assert gradients["criterion"] == name and gradients["samples"] == 12 and gradients["labels"] == "predicted"
    assert gradients["seconds"] > 0
    assert any(f"--importance {name}: gradients" in note and "own predictions" in note
               for note in result.report["notes"]), result.report["notes"]


def test_labels_in_the_calibration_file_are_used(tmp_path):
    model = mlp()
    x, batches = data()
    np.savez(tmp_path / "calib.npz", x=x, labels=batches.labels)
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    done = subprocess.run([sys.executable, "-m", "onnxprune", str(tmp_path / "m.onnx"), "--neurons", "0.25",
                           "--importance", "obd", "--calib", str(tmp_path / "calib.npz"), "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "gradients of the cross-entropy against the data's labels on 12 calibration sample(s)" in done.stdout


@pytest.mark.parametrize("method", ["taylor", "obd"])
def test_weight_sparsity_by_gradients_matches_numpy(tmp_path, method):
    """--sparsity-method taylor|obd zeroes, in each layer, the weights numpy's scores rank lowest."""
    model = mlp()
    x, batches = data()
    np.savez(tmp_path / "calib.npz", x=x, labels=batches.labels)
    expected = {}
    by_hand(model, x, batches.labels, per_weight=expected)
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    result = onnxprune.prune(model, sparsity=0.5, sparsity_method=method, calib=str(tmp_path / "calib.npz"),
                             latency_runs=0)
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for name in ("W1", "W2"):
        score = expected[f"{name}_taylor"] if method == "taylor" else expected[f"{name}_g2"] * w[name] ** 2 / 2
        order = np.argsort(score.reshape(-1), kind="stable")
        want = np.ones(score.size, bool)
        want[order[: score.size // 2]] = False
        # scores within float error of each other may swap: compare away from the cut
        cut = np.sort(score.reshape(-1))[score.size // 2 - 1: score.size // 2 + 1]
        clear = np.abs(score.reshape(-1)[:, None] - cut[None, :]).min(axis=1) > 1e-6 * max(cut.max(), 1e-12)
        got = after[name].reshape(-1) != 0
        assert np.array_equal(got[clear], want[clear]), name
        assert (~got).sum() == score.size // 2
    assert any(f"sparsity {method}: gradients of the cross-entropy against the data's labels on 12" in note
               for note in result.report["notes"]), result.report["notes"]
