"""Weight sparsity (--sparsity, --pattern, --sparsity-method): zeros in Conv/MatMul/Gemm weights,
shapes unchanged. The pattern must hold exactly on every layer the report lists; planted zero
weights must be exactly what goes at their ratio, with nothing else moving."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import max_rel_diff, quantize_qdq, run_model
from onnx import numpy_helper
from textmodel import text_model

from onnxprune import OptionError, prune
from onnxprune.core.metrics import random_inputs
from onnxprune.sparsity import parse_pattern, sparse_layers
from onnxprune.sparsity.layers import WeightStore

ROOT = Path(__file__).resolve().parents[1]

MLP = """
g (float[N,16] x) => (float[N,4] y) {
  h = MatMul(x, W1)
  a = Relu(h)
  b = Gemm <transB=1> (a, W2, B2)
  c = Relu(b)
  y = Gemm (c, W3, B3)
}"""


def resnet():
    return onnx.load(str(ROOT / "fixtures" / "tiny_resnet.onnx"))


def mlp():
    return text_model(MLP, {"W1": (16, 32), "W2": (24, 32), "B2": (24,), "W3": (24, 4), "B3": (4,)})


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _matrices(model, names):
    store = WeightStore(model)
    layers, _ = sparse_layers(model, store)
    return {layer.weight: layer.to_matrix(store.read(layer.weight)) for layer in layers if layer.weight in names}


@pytest.mark.parametrize("pattern,m", [("2:4", 4), ("4:8", 8)])
def test_n_of_m_holds_on_every_reported_layer(pattern, m):
    result = prune(resnet(), pattern=pattern, latency_runs=0)
    report = result.report["sparsity"]
    names = {row["weight"] for row in report["layers"]}
    assert len(names) == report["pattern_holds"]["of"] == report["pattern_holds"]["layers"] > 10
    for name, matrix in _matrices(result.model, names).items():
        groups = matrix.reshape(matrix.shape[0], -1, m)
        assert ((groups == 0).sum(-1) >= m // 2).all(), name  # along the input channels, every group
    # the stem reads 3 channels: it cannot hold the pattern, is left dense and listed
    assert [s["reason"] for s in report["skipped"]] == [f"3 input channels are not a multiple of {m} ({pattern})"]
    if pattern == "2:4":  # every layer that can hold it does; the stem runs dense
        assert report["tensorrt_2_4"] == {"ready": True, "layers": len(names), "dense": [report["skipped"][0]["node"]]}
    else:
        assert "tensorrt_2_4" not in report
    assert result.verification.ort == "passed"
    assert result.report["params"]["after"] == result.report["params"]["before"]  # shapes stay


def test_conv_groups_run_along_input_channels():
    """TensorRT's layout: for every output and kernel position, M consecutive input channels."""
    pattern = parse_pattern("pattern", "2:4")
    w = np.arange(2 * 8 * 3 * 3, dtype=np.float32).reshape(2, 8, 3, 3) + 1
    model = text_model("g (float[1,8,5,5] x) => (float[1,2,3,3] y) { y = Conv(x, W) }", {"W": w})
    result = prune(model, pattern=str(pattern), latency_runs=0)
    sparse = _weights(result.model)["W"]
    # the larger half of each run of 4 input channels stays (the weights grow with the channel index)
    kept = (sparse != 0)
    assert kept[:, [2, 3, 6, 7]].all() and not kept[:, [0, 1, 4, 5]].any()


def test_planted_zeros_are_exactly_what_goes():
    model = mlp()
    rng = np.random.default_rng(3)
    planted = onnx.ModelProto()
    planted.CopyFrom(model)
    zeros = {}
    for tensor in planted.graph.initializer:
        if tensor.name in ("W1", "W2", "W3"):
            value = numpy_helper.to_array(tensor).copy()
            value[np.abs(value) < 1e-3] = 1e-3  # no accidental zeros
            flat = value.reshape(-1)
            dead = rng.choice(flat.size, size=math.floor(0.4 * flat.size), replace=False)
            flat[dead] = 0.0
            zeros[tensor.name] = value == 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    result = prune(planted, sparsity=0.4, latency_runs=0)
    after, before = _weights(result.model), _weights(planted)
    for name, dead in zeros.items():
        assert np.array_equal(after[name] == 0, dead), name
        assert np.array_equal(after[name], before[name]), name  # nothing else moved
    feeds = random_inputs(planted, {"x": [3, 16]}, 1)
    assert max_rel_diff(run_model(planted, feeds), run_model(result.model, feeds)) == 0.0


def test_ratio_zero_changes_nothing():
    model = mlp()
    result = prune(model, sparsity=0.0, pattern="unstructured", filters=0.0, latency_runs=0)
    assert "sparsity" not in result.report  # nothing asked: the pass does not run
    for name, value in _weights(model).items():
        assert np.array_equal(_weights(result.model)[name], value)


def test_unstructured_per_layer_and_global():
    per_layer = prune(resnet(), sparsity=0.5, latency_runs=0).report["sparsity"]
    for row in per_layer["layers"]:
        assert row["zeros"] == math.floor(0.5 * row["weights"]), row["node"]
    ranked = prune(resnet(), sparsity=0.7, global_rank=True, latency_runs=0).report["sparsity"]
    assert ranked["total"]["zeros"] == math.floor(0.7 * ranked["total"]["weights"])
    spread = {row["sparsity"] for row in ranked["layers"]}
    assert len(spread) > 3  # layers differ: one ranking across them
    with pytest.raises(OptionError, match="global_rank.*N:M"):
        prune(resnet(), pattern="2:4", global_rank=True)


def test_blocks():
    result = prune(mlp(), sparsity=0.5, pattern="block:4x4", latency_runs=0)
    report = result.report["sparsity"]
    for name, matrix in _matrices(result.model, {row["weight"] for row in report["layers"]}).items():
        blocks = matrix.reshape(matrix.shape[0] // 4, 4, matrix.shape[1] // 4, 4)
        zero = (blocks == 0).all(axis=(1, 3))
        assert zero.sum() == math.floor(0.5 * zero.size), name
        assert (np.abs(blocks).sum(axis=(1, 3))[~zero] > 0).all(), name  # the rest stays whole
    # W3 is [24, 4] (K 24, N 4): 4 outputs by 24 inputs holds 4x4 blocks too; nothing to skip here
    assert not report["skipped"]


def test_wanda_scores_by_the_inputs_too():
    """An input channel that carries large activations keeps its weights under Wanda, not under magnitude."""
    model = text_model("g (float[N,8] x) => (float[N,4] y) { y = MatMul(x, W) }",
                       {"W": np.tile(np.array([[1.0], [2.0]] * 4, np.float32), (1, 4))})
    calib = [{"x": np.tile(np.array([[10.0, 1.0] * 4], np.float32), (4, 1))} for _ in range(2)]
    magnitude = _weights(prune(model, sparsity=0.5, latency_runs=0).model)["W"]
    wanda = _weights(prune(model, sparsity=0.5, sparsity_method="wanda", calib=calib, latency_runs=0).model)["W"]
    assert (magnitude[0::2] == 0).all() and (magnitude[1::2] != 0).all()  # weight 1 < 2
    assert (wanda[0::2] != 0).all() and (wanda[1::2] == 0).all()  # 1 x 10 > 2 x 1
    with pytest.raises(OptionError, match="sparsity_method.*calib"):
        prune(model, sparsity=0.5, sparsity_method="wanda")


def test_channels_first_then_the_survivors():
    result = prune(resnet(), filters=0.25, pattern="2:4", latency_runs=0)
    assert result.report["summary"]["channels_removed"] > 0
    assert result.report["sparsity"]["pattern_holds"]["layers"] == result.report["sparsity"]["pattern_holds"]["of"]
    assert result.report["params"]["after"] < result.report["params"]["before"]


def test_excluded_and_shared_weights_stay_dense():
    result = prune(resnet(), sparsity=0.5, exclude=("*fc*",), latency_runs=0)
    skipped = result.report["sparsity"]["skipped"]
    assert any("excluded by --exclude '*fc*'" in s["reason"] for s in skipped)
    shared = text_model("g (float[N,8] x) => (float[N,8] y) { h = MatMul(x, W)\n y = MatMul(h, W) }", {"W": (8, 8)})
    report = prune(shared, sparsity=0.5, latency_runs=0).report["sparsity"]
    assert not report["layers"] and all("shared" in s["reason"] for s in report["skipped"])


def test_bad_patterns_and_ratios_are_one_line_errors():
    for options, match in ((dict(pattern="3:2"), "0 < N < M"), (dict(pattern="2:4", sparsity=0.3), "sets the sparsity"),
                           (dict(pattern="diagonal", sparsity=0.5), "unstructured, N:M"),
                           (dict(sparsity=1.0), "sparsity")):
        with pytest.raises(OptionError, match=match):
            prune(mlp(), **options)


def test_cli_writes_a_sparse_model_and_says_so(tmp_path):
    out = tmp_path / "sparse.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(ROOT / "fixtures" / "tiny_resnet.onnx"),
                           "--pattern", "2:4", "-o", str(out), "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "sparsity 2:4 (magnitude): 50.0% of" in text and "2:4 holds on 15 of 15" in text
    assert "ready for TensorRT's 2:4 sparse kernels" in text
    assert "weights zipped" in text
    model = onnx.load(str(out))
    zeros = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in model.graph.initializer)
    assert zeros > 20000


def test_obs_update_matches_the_least_squares_solution():
    """One weight dropped at the first column: SparseGPT's update of the rest is the exact
    minimiser of ||X (w' - w)||^2 with that weight at zero (brute force: least squares)."""
    from onnxprune.sparsity.sparsegpt import obs_prune

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    w = rng.standard_normal((1, 6))
    w[0, 0] = 1e-3  # the one to go
    got = obs_prune(w, x.T @ x, parse_pattern("pattern", "unstructured"), 1 / 6, damping=0.0)
    free = x[:, 1:]
    best, *_ = np.linalg.lstsq(free, x @ w[0], rcond=None)
    assert got[0, 0] == 0.0
    np.testing.assert_allclose(got[0, 1:], best, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_sparsegpt_reconstructs_better_than_dropping(pattern):
    """On the layer's own inputs, SparseGPT's output error is below magnitude's and below its own
    mask with the other weights left as they were."""
    from onnxprune.sparsity.sparsegpt import obs_prune

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))  # correlated inputs
    w = rng.standard_normal((16, 32))
    parsed = parse_pattern("pattern", pattern)
    sparse = obs_prune(w, x.T @ x, parsed, 0.5)
    assert (sparse == 0).mean() == pytest.approx(0.5)
    from onnxprune.sparsity.patterns import complies, layer_mask

    assert complies(sparse, parsed)
    plain = np.where(layer_mask(np.abs(w), parsed, 0.5, per_row=False), w, 0)
    own_mask = np.where(sparse != 0, w, 0)

    def err(v):
        return np.linalg.norm(x @ (v - w).T)

    assert err(sparse) < err(plain) and err(sparse) < 0.9 * err(own_mask)


def test_sparsegpt_end_to_end_and_planted_zeros():
    model = mlp()
    calib = [random_inputs(model, {"x": [16, 16]}, seed) for seed in range(4)]
    result = prune(model, pattern="2:4", sparsity_method="sparsegpt", calib=calib, latency_runs=0)
    report = result.report["sparsity"]
    assert report["pattern_holds"]["layers"] == report["pattern_holds"]["of"] == 3
    # planted zeros at their ratio: exactly those go, and with nothing to compensate nothing moves
    rng = np.random.default_rng(5)
    planted = onnx.ModelProto()
    planted.CopyFrom(model)
    for tensor in planted.graph.initializer:
        if tensor.name in ("W1", "W2", "W3"):
            value = numpy_helper.to_array(tensor).copy()
            value[np.abs(value) < 1e-3] = 1e-3
            value.reshape(-1)[rng.choice(value.size, size=math.floor(0.5 * value.size), replace=False)] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    again = prune(planted, sparsity=0.5, sparsity_method="sparsegpt", calib=calib, latency_runs=0)
    for name, value in _weights(planted).items():
        assert np.array_equal(_weights(again.model)[name], value), name
    with pytest.raises(OptionError, match="sparsegpt.*blocks"):
        prune(model, sparsity=0.5, pattern="block:4x4", sparsity_method="sparsegpt", calib=calib)


def test_sparsegpt_waves_follow_the_graph():
    from onnxprune.sparsity.sparsify import _waves

    model = mlp()
    layers, _ = sparse_layers(model, WeightStore(model))
    assert [[layer.weight for layer in wave] for wave in _waves(model, layers)] == [["W1"], ["W2"], ["W3"]]


# -- sparse storage (--sparse-storage) ---------------------------------------------------------

def test_sparse_storage_is_smaller_loads_and_computes_the_same(tmp_path):
    """Above 2/3 zeros a float32 weight is smaller as an ONNX sparse initializer: the stored
    model passes the checker and onnxruntime gives the dense model's outputs bit for bit."""
    dense = prune(resnet(), sparsity=0.8, latency_runs=0)
    stored = prune(resnet(), sparsity=0.8, sparse_storage=True, latency_runs=0)
    onnx.checker.check_model(stored.model)
    sparse_names = {t.values.name for t in stored.model.graph.sparse_initializer}
    layers = {row["weight"] for row in stored.report["sparsity"]["layers"]}
    assert sparse_names and sparse_names <= layers
    assert not sparse_names & {t.name for t in stored.model.graph.initializer}
    feeds = random_inputs(dense.model, {"input": [1, 3, 32, 32]}, 0)
    for a, b in zip(run_model(dense.model, feeds), run_model(stored.model, feeds)):
        np.testing.assert_array_equal(a, b)
    storage = stored.report["sparsity"]["sparse_storage"]
    assert storage["written"] and storage["tensors_written"] == len(sparse_names)
    # the bytes reported are the values and int64 positions actually stored
    actual = sum(len(t.values.raw_data) + len(t.indices.raw_data) for t in stored.model.graph.sparse_initializer)
    assert storage["written_bytes"]["sparse"] == actual
    assert stored.report["file_bytes"]["after"] == stored.model.ByteSize()
    assert stored.report["file_bytes"]["after"] < 0.75 * dense.report["file_bytes"]["after"]
    # without the flag the report says what it would give, and the model stays dense
    estimate = dense.report["sparsity"]["sparse_storage"]
    assert not estimate["written"] and estimate["tensors_smaller_sparse"] == len(sparse_names)
    assert not len(dense.model.graph.sparse_initializer)


def test_sparse_storage_keeps_tensors_dense_where_it_would_grow():
    result = prune(resnet(), sparsity=0.5, sparse_storage=True, latency_runs=0)
    assert not len(result.model.graph.sparse_initializer)
    assert any("needs more than 2/3 zeros" in note for note in result.report["notes"]), result.report["notes"]
    assert result.report["sparsity"]["sparse_storage"]["tensors_smaller_sparse"] == 0
    with pytest.raises(OptionError, match="sparse_storage.*sparsity"):
        prune(resnet(), sparse_storage=True, filters=0.3)


@pytest.mark.parametrize("coordinates", [False, True], ids=["linear", "coordinates"])
def test_a_model_with_sparse_initializers_is_read_dense(coordinates):
    """A model stored sparse (ours, or with [NNZ, rank] coordinates) prunes like its dense form."""
    from onnx import helper

    model = mlp()
    for tensor in list(model.graph.initializer):
        if tensor.name != "W1":
            continue
        value = numpy_helper.to_array(tensor).copy()
        value[np.abs(value) < 1.0] = 0
        tensor.CopyFrom(numpy_helper.from_array(value, "W1"))
        positions = np.argwhere(value) if coordinates else np.flatnonzero(value)[:, None][:, 0]
        sparse = helper.make_sparse_tensor(numpy_helper.from_array(value[value != 0], "W1"),
                                           numpy_helper.from_array(positions.astype(np.int64), "W1_i"),
                                           list(value.shape))
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    kept = [t for t in stored.graph.initializer if t.name != "W1"]
    del stored.graph.initializer[:]
    stored.graph.initializer.extend(kept)
    stored.graph.sparse_initializer.append(sparse)
    onnx.checker.check_model(stored)
    given = stored.SerializeToString()
    from_sparse = prune(stored, neurons=0.25, latency_runs=0)
    from_dense = prune(model, neurons=0.25, latency_runs=0)
    assert stored.SerializeToString() == given  # the caller's model is not changed
    assert any("1 sparse initializer(s) read as dense" in note for note in from_sparse.report["notes"])
    assert _weights(from_sparse.model).keys() == _weights(from_dense.model).keys()
    for name, value in _weights(from_dense.model).items():
        np.testing.assert_array_equal(_weights(from_sparse.model)[name], value)


# -- per-layer sparsity: sensitivity curves and --layer-sparsity -------------------------------

def _planted_w2(fraction=0.5):
    """The MLP with `fraction` of W2's weights zero (the others kept off zero)."""
    model = mlp()
    rng = np.random.default_rng(5)
    for tensor in model.graph.initializer:
        if tensor.name in ("W1", "W2", "W3"):
            value = numpy_helper.to_array(tensor).copy()
            value[np.abs(value) < 1e-2] = 1e-2
            if tensor.name == "W2":
                flat = value.reshape(-1)
                flat[rng.choice(flat.size, size=int(fraction * flat.size), replace=False)] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return model


def test_sensitivity_curves_send_the_zeros_where_they_cost_nothing(tmp_path):
    """Half of W2 is planted dead. Measured layer by layer, W2 costs nothing up to half; asked
    for exactly that many zeros over the whole model, the allocation puts them all there, and
    the pruned model computes what the original does."""
    from onnxprune.sensitivity import analyze_sensitivity, load_sensitivity

    model = _planted_w2()
    table = analyze_sensitivity(model, sparsity=True, ratios=(0.25, 0.5, 0.75))
    curves = table.curves()
    assert set(curves) == {"W1", "W2", "W3"} and table.sparsity
    assert curves["W2"][0] == (0.5, 0.0)  # at 0.25 the zeros already there are half of it
    assert all(d > 0 for _, d in curves["W1"]) and all(d > 0 for _, d in curves["W3"])
    path = table.save_table(tmp_path / "sens.json")
    assert load_sensitivity(path).curves() == curves  # the file says what the run measured
    sizes = {"W1": 16 * 32, "W2": 24 * 32, "W3": 24 * 4}
    target = 0.5 * sizes["W2"] / sum(sizes.values())
    result = prune(model, sparsity=target, sensitivity=str(path), latency_runs=0)
    layers = {row["weight"]: row for row in result.report["sparsity"]["layers"]}
    assert layers["W2"]["target"] == pytest.approx(0.5) and layers["W2"]["sparsity"] == 0.5
    assert layers["W1"]["zeros"] == 0 and layers["W3"]["zeros"] == 0
    feeds = random_inputs(model, {"x": [3, 16]}, 1)
    assert max_rel_diff(run_model(model, feeds), run_model(result.model, feeds)) == 0.0
    # uniform sparsity at the same total zeroes live weights of every layer
    uniform = prune(model, sparsity=target, latency_runs=0)
    assert max_rel_diff(run_model(model, feeds), run_model(uniform.model, feeds)) > 1e-3


def test_allocation_reaches_the_total_and_respects_given_layers():
    from onnxprune.sparsity.allocate import allocate_sparsity

    curves = {"a": [(0.25, 0.0), (0.5, 0.1), (0.75, 0.5)], "b": [(0.25, 0.2), (0.5, 0.3), (0.75, 0.4)]}
    sizes = {"a": 100, "b": 300}
    ratios = allocate_sparsity(curves, sizes, 0.5)
    assert sum(ratios[k] * sizes[k] for k in sizes) == pytest.approx(200)
    # by damage per weight: a's free quarter, then b's three quarters (0.2/75, then 0.1/75
    # twice, the last in part) before a's second quarter (0.1/25)
    assert ratios["a"] == 0.25 and ratios["b"] == pytest.approx(0.5 + 25 / 300)
    with pytest.raises(OptionError, match="go up to 0.75"):
        allocate_sparsity(curves, sizes, 0.8)
    # --layer-sparsity sets W1; the curves allocate the rest so that the model still reaches the total
    model = _planted_w2()
    from onnxprune.sensitivity import analyze_sensitivity

    table = analyze_sensitivity(model, sparsity=True)
    result = prune(model, sparsity=0.4, sensitivity=table, layer_sparsity=("W1=0.1",), latency_runs=0)
    layers = {row["weight"]: row for row in result.report["sparsity"]["layers"]}
    assert layers["W1"]["target"] == 0.1
    assert result.report["sparsity"]["total"]["sparsity"] == pytest.approx(0.4, abs=2e-3)


def test_layer_sparsity_globs():
    result = prune(mlp(), sparsity=0.5, layer_sparsity=("W3=0", "W1=0.75"), latency_runs=0)
    layers = {row["weight"]: row for row in result.report["sparsity"]["layers"]}
    assert layers["W1"]["sparsity"] == 0.75 and layers["W2"]["sparsity"] == 0.5 and layers["W3"]["zeros"] == 0
    plain = prune(mlp(), sparsity=0.5, latency_runs=0)
    assert _weights(result.model)["W2"].tolist() == _weights(plain.model)["W2"].tolist()
    result = prune(mlp(), sparsity=0.5, layer_sparsity=("nothing*=0.3",), latency_runs=0)
    assert any("matches no layer" in note for note in result.report["notes"])
    for options, match in ((dict(layer_sparsity=("W1=0.5",)), "give it too"),
                           (dict(sparsity=0.5, layer_sparsity=("W1",)), "PATTERN=R"),
                           (dict(sparsity=0.5, layer_sparsity=("W1=1.5",)), r"\[0, 1\)"),
                           (dict(pattern="2:4", layer_sparsity=("W1=0.5",)), "every layer's sparsity")):
        with pytest.raises(OptionError, match=match):
            prune(mlp(), **options)


def test_a_sparsity_table_is_for_sparsity_and_a_channel_table_for_targets():
    from onnxprune.sensitivity import analyze_sensitivity

    weights_table = analyze_sensitivity(mlp(), sparsity=True)
    channels_table = analyze_sensitivity(mlp())
    with pytest.raises(OptionError, match="weight sparsity"):
        prune(mlp(), target_macs=0.5, sensitivity=weights_table)
    with pytest.raises(OptionError, match="weight sparsity"):
        prune(mlp(), pattern="2:4", sensitivity=weights_table)
    with pytest.raises(OptionError, match="global"):
        prune(mlp(), sparsity=0.5, global_rank=True, sensitivity=weights_table)
    with pytest.raises(OptionError, match="target_macs"):
        prune(mlp(), sparsity=0.5, sensitivity=channels_table)
    with pytest.raises(OptionError, match="recover|weight sparsity"):
        analyze_sensitivity(mlp(), sparsity=True, recover="bias")


def test_cli_sensitivity_of_weights(tmp_path):
    table = tmp_path / "sens.json"
    model = str(ROOT / "fixtures" / "tiny_resnet.onnx")
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "sensitivity", model, "--sparsity", "--table", str(table),
                           "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| weight | kind | weights |" in proc.stdout and "`fc.weight` | sparsity | 480 |" in proc.stdout
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", str(ROOT / "fixtures" / "tiny_resnet.onnx"),
                           "--sparsity", "0.5", "--sensitivity", str(table), "--layer-sparsity", "fc*=0",
                           "-o", str(out), "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "50.0% of" in proc.stdout


# -- quantized (QDQ) weights -------------------------------------------------------------------

def _quantized_resnet(tmp_path, per_channel: bool, planted: float = 0.0):
    """tiny_resnet with `planted` of every layer's weights zero, quantized by onnxruntime
    (QDQ, int8 symmetric weights: a float zero is the zero point)."""
    model = resnet()
    rng = np.random.default_rng(7)
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.ndim >= 2 and planted:
            value = value.copy().reshape(-1)
            value[rng.choice(value.size, size=math.ceil(planted * value.size), replace=False)] = 0.0
            tensor.CopyFrom(numpy_helper.from_array(value.reshape(tensor.dims), tensor.name))
    return quantize_qdq(model, tmp_path, per_channel)


def _int8(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_quantized_weights_are_sparsified_in_place(tmp_path, per_channel):
    """Planted zeros in a QDQ graph are exactly what goes at their ratio (the model is unchanged);
    past it the new zeros are the zero point, every other stored integer and every scale stay."""
    qdq = _quantized_resnet(tmp_path, per_channel, planted=0.4)
    feeds = random_inputs(qdq, {"input": [1, 3, 32, 32]}, 0)
    same = prune(qdq, sparsity=0.4, latency_runs=0)
    rows = same.report["sparsity"]["layers"]
    assert len(rows) >= 10 and all(row["weight"] in _int8(qdq) for row in rows)
    for name, value in _int8(qdq).items():
        np.testing.assert_array_equal(_int8(same.model)[name], value)
    more = prune(qdq, sparsity=0.6, latency_runs=0)
    before, after = _int8(qdq), _int8(more.model)
    for row in more.report["sparsity"]["layers"]:
        q0, q1 = before[row["weight"]], after[row["weight"]]
        assert row["zeros"] >= math.floor(0.6 * row["weights"]) and (q1 == 0).sum() == row["zeros"]
        assert np.array_equal(q1[q1 != 0], q0[q1 != 0])  # the rest as stored
    floats = {t.name: numpy_helper.to_array(t) for t in more.model.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT}
    for tensor in qdq.graph.initializer:  # scales (and biases) as they were
        if tensor.data_type == onnx.TensorProto.FLOAT:
            np.testing.assert_array_equal(floats[tensor.name], numpy_helper.to_array(tensor))
    assert max_rel_diff(run_model(qdq, feeds, optimized=False), run_model(more.model, feeds, optimized=False)) > 0


def test_sparsegpt_on_quantized_weights_stays_on_the_grid(tmp_path):
    qdq = _quantized_resnet(tmp_path, per_channel=True)
    calib = [random_inputs(qdq, {"input": [1, 3, 32, 32]}, seed) for seed in range(8)]
    result = prune(qdq, pattern="2:4", sparsity_method="sparsegpt", calib=calib, latency_runs=0)
    report = result.report["sparsity"]
    assert report["pattern_holds"]["layers"] == report["pattern_holds"]["of"] > 0
    assert all(row["weight"] in _int8(qdq) for row in report["layers"])
    magnitude = prune(qdq, pattern="2:4", latency_runs=0)
    # the update moved the kept weights, on the int8 grid (the tensors are still int8)
    changed = [name for name in _int8(qdq) if not np.array_equal(_int8(result.model)[name],
                                                                 _int8(magnitude.model)[name])]
    assert changed
