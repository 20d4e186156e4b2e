"""The training copy of a graph, the training data and the learning-rate schedule: what
onnxruntime-training is handed, checked without it (these run in the default suite)."""
import numpy as np
import onnx
import pytest
from textmodel import text_model

from onnxprune.training.data import load_training_data
from onnxprune.training.prepare import NotTrainable, prepare
from onnxprune.training.schedule import learning_rate

CNN = """
g (float[N,3,8,8] input) => (float[N,5] prob, float[N,6] side) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (input, W1, B1)
  b = BatchNormalization (a, S, Bb, M, V)
  r = Relu(b)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  logits = Gemm <transB=1> (f, W2, B2)
  k = Mul(logits, half)
  prob = Softmax <axis=1> (k)
  side = Gemm <transB=1> (f, W3, B3)
}"""


def cnn():
    return text_model(CNN, {"W1": (6, 3, 3, 3), "B1": (6,), "S": (6,), "Bb": (6,), "M": (6,),
                            "V": ("positive", (6,)), "W2": (5, 6), "B2": (5,), "W3": (6, 6), "B3": (6,),
                            "half": np.array(0.5, np.float32)})


def test_trainable_weights_follow_the_rule():
    graph = prepare(cnn())
    # the loss reads the logits Softmax makes `prob` from, and only what reaches them trains
    assert graph.output == "prob" and graph.loss_input == "k"
    assert sorted(graph.trainable) == ["B1", "B2", "Bb", "S", "W1", "W2"]
    # scalars, running statistics and weights of another output are frozen; every float is listed
    assert {"half", "M", "V", "W3", "B3"} <= set(graph.frozen)
    assert graph.running_stats == ["M", "V"]
    floats = {i.name for i in graph.model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert floats == set(graph.trainable) | set(graph.frozen)


def test_other_output_and_raw_output():
    graph = prepare(cnn(), output="side", logits=False)
    assert graph.loss_input == "side" and sorted(graph.trainable) == ["B1", "B3", "Bb", "S", "W1", "W3"]
    with pytest.raises(NotTrainable, match="no output 'nope'"):
        prepare(cnn(), output="nope")


def test_the_users_model_is_not_changed():
    model = cnn()
    before = model.SerializeToString()
    prepare(model, batchnorm="frozen")
    assert model.SerializeToString() == before


def test_frozen_batchnorm_is_its_affine_map():
    import onnxruntime as ort

    model = cnn()
    graph = prepare(model, batchnorm="frozen")
    assert "BatchNormalization" not in {n.op_type for n in graph.model.graph.node}
    assert {"S", "Bb"} <= set(graph.trainable) and {"M", "V"} <= set(graph.frozen)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})

    for a, b in zip(run(graph.model), run(model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_training_mode_batchnorm_and_layernorm_outputs():
    model = text_model("""
    g (float[N,4,6] x) => (float[N,4,6] y) {
      n = LayerNormalization <axis=-1> (x, G, Be)
      b, rm, rv = BatchNormalization <training_mode=1> (n, S, Bb, M, V)
      y = Relu(b)
    }""", {"G": (6,), "Be": (6,), "S": (4,), "Bb": (4,), "M": (4,), "V": ("positive", (4,))})
    graph = prepare(model, logits=False)
    nodes = {n.op_type: n for n in graph.model.graph.node}
    assert len(nodes["LayerNormalization"].output) == 3 and all(nodes["LayerNormalization"].output)
    bn = nodes["BatchNormalization"]
    assert len(bn.output) == 1 and not [a for a in bn.attribute if a.name == "training_mode"]
    assert graph.running_stats == ["M", "V"]


def test_constant_node_weights_become_initializers():
    model = text_model("""
    g (float[N,3] x) => (float[N,2] y) {
      w = Constant <value = float[2,3] {1,2,3,4,5,6}> ()
      s = Constant <value = float {2}> ()
      y0 = Gemm <transB=1> (x, w)
      y = Mul(y0, s)
    }""", {})
    graph = prepare(model, logits=False)
    assert graph.constants == ["w"] and graph.trainable == ["w"]
    assert "s" in graph.frozen and "Constant" not in {n.op_type for n in graph.model.graph.node}


def test_versions_are_brought_into_range():
    model = cnn()
    model.ir_version = 11
    graph = prepare(model)
    assert graph.model.ir_version == 10
    old = text_model("""
    g (float[N,3] x) => (float[N,2] y) {
      y = Gemm <transB=1> (x, W, B)
    }""", {"W": (2, 3), "B": (2,)}, opset=11, ir_version=6)
    graph = prepare(old, logits=False)
    assert [o.version for o in graph.model.opset_import if o.domain == ""] == [13]
    assert any("opset 13" in note for note in graph.notes)


@pytest.mark.parametrize("text,weights,match", [
    ("""g (float[N,3] x) => (float[N,3] y) {
      s = Constant <value = float {0.1}> ()
      z = Constant <value = uint8 {0}> ()
      q = QuantizeLinear(x, s, z)
      y = DequantizeLinear(q, s, z)
    }""", {}, "quantized graphs cannot be fine-tuned"),
    ("""g (float16[N,3] x) => (float16[N,2] y) {
      y = MatMul(x, W)
    }""", {"W": np.ones((3, 2), np.float16)}, "is float16"),
])
def test_untrainable_graphs_are_refused_in_one_line(text, weights, match):
    with pytest.raises(NotTrainable, match=match) as info:
        prepare(text_model(text, weights), logits=False)
    assert "\n" not in str(info.value)


def test_op_without_lowering_is_named_only_by_onnxruntime_training():
    # prepare() leaves unknown ops to generate_artifacts, whose error the trainer words (see test_finetune)
    model = text_model("""
    g (float[N,3] x) => (float[N,3] y) {
      y0 = Mul(x, W)
      y = CumSum(y0, axis)
    }""", {"W": (3,), "axis": np.array(1, np.int64)})
    assert prepare(model, logits=False).trainable == ["W"]


def test_training_data_from_npz_and_folders(tmp_path):
    model = cnn()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)
    y = np.arange(10) % 5
    np.savez(tmp_path / "a.npz", input=x[:6], labels=y[:6])
    np.savez(tmp_path / "b.npz", input=x[6:], labels=y[6:])
    data = load_training_data(tmp_path / "a.npz", model, batch_size=4)
    assert data.has_labels and data.samples == 6 and data.batches_per_epoch() == 2
    folder = load_training_data(tmp_path, model, batch_size=4)
    assert folder.samples == 10 and folder.batches_per_epoch() == 3
    epoch = list(folder.epoch(0, seed=0))
    seen = np.concatenate([labels for _, labels in epoch])
    assert sorted(seen.tolist()) == sorted(y.tolist())
    # shuffled differently each epoch, the same way for the same seed
    again = np.concatenate([labels for _, labels in folder.epoch(0, seed=0)])
    other = np.concatenate([feeds["input"][:, 0, 0, 0] for feeds, _ in folder.epoch(1, seed=0)])
    assert np.array_equal(seen, again)
    assert not np.array_equal(np.concatenate([f["input"][:, 0, 0, 0] for f, _ in epoch]), other)
    unlabelled = load_training_data(tmp_path / "a.npz", model, labels="targets")
    assert not unlabelled.has_labels


def test_training_data_from_class_folders(tmp_path):
    from PIL import Image

    model = cnn()
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        for index in range(3):
            Image.fromarray(np.full((8, 8, 3), value + index, np.uint8)).save(tmp_path / name / f"{index}.png")
    data = load_training_data(tmp_path, model, image_spec="size=8x8", batch_size=4)
    assert data.has_labels and data.class_names == ["cat", "dog"] and data.samples == 6
    for feeds, labels in data.epoch(0, seed=0):
        # dark images are class 0 ("cat"), bright ones class 1
        assert np.array_equal(labels, (feeds["input"].mean(axis=(1, 2, 3)) > 0.5).astype(np.int64))


def test_training_data_errors(tmp_path):
    model = cnn()
    np.savez(tmp_path / "bad.npz", input=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(3))
    with pytest.raises(Exception, match="disagree on the number of samples"):
        load_training_data(tmp_path / "bad.npz", model)
    np.savez(tmp_path / "other.npz", image=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(Exception, match="no array for input 'input'"):
        load_training_data(tmp_path / "other.npz", model)
    with pytest.raises(Exception, match="one-shot iterator"):
        load_training_data(iter([({"input": np.zeros((1, 3, 8, 8), np.float32)}, np.zeros(1))]), model)


def test_fixed_batch_models_get_their_batch():
    model = text_model("""
    g (float[2,3] x) => (float[2,2] y) {
      y = Gemm <transB=1> (x, W, B)
    }""", {"W": (2, 3), "B": (2,)})
    data = load_training_data([({"x": np.zeros((2, 3), np.float32)}, np.zeros(2, np.int64))] * 2, model)
    assert data.batches_per_epoch() == 2 and data.has_labels
    from onnxprune.calibration.data import model_inputs
    from onnxprune.training.data import ArrayData

    arrays = ArrayData(model_inputs(model), {"x": np.zeros((5, 3), np.float32)}, None, "five", batch_size=32)
    assert arrays.batch_size == 2 and arrays.batches_per_epoch() == 2
    assert any("1 of 5 samples left out" in note for note in arrays.notes)


def test_learning_rate_schedules():
    assert learning_rate(0, 100, 1.0, "cosine", warmup=0.1) == pytest.approx(0.1)
    assert learning_rate(9, 100, 1.0, "cosine", warmup=0.1) == pytest.approx(1.0)
    assert learning_rate(10, 100, 1.0, "cosine", warmup=0.1) == pytest.approx(1.0)
    assert learning_rate(55, 100, 1.0, "cosine", warmup=0.1) == pytest.approx(0.5)
    assert learning_rate(99, 100, 1.0, "cosine") < 0.001
    assert [learning_rate(s, 100, 1.0, "step") for s in (0, 49, 50, 75)] == pytest.approx([1, 1, 0.1, 0.01])
    assert learning_rate(70, 100, 0.3, "constant", warmup=0.5) == 0.3
    assert learning_rate(5, None, 0.3, "cosine") == 0.3
    with pytest.raises(ValueError):
        learning_rate(0, 10, 1.0, "linear")


def test_without_the_training_flavour_finetune_names_the_extra(tmp_path):
    try:
        import onnxruntime.training  # noqa: F401
        pytest.skip("the training flavour is installed here")
    except ImportError:
        pass
    import onnxprune
    from onnxprune.core.errors import RuntimeMissing

    np.savez(tmp_path / "d.npz", input=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(RuntimeMissing, match=r"onnxprune\[training\]"):
        onnxprune.finetune(cnn(), tmp_path / "d.npz")


def test_shape_constants_and_passed_through_inputs():
    # int64 Constant nodes only (shape constants): converted once, the copy stays in SSA form;
    # the first output passes an input through, so the loss is about the next one
    model = text_model("""
    g (int64[N,4] ids, float[N,4] x) => (int64[N,4] ids_out, float[N,2] y) {
      ids_out = Identity(ids)
      shape = Constant <value = int64[2] {-1, 4}> ()
      flat = Reshape(x, shape)
      y = MatMul(flat, W)
    }""", {"W": (4, 2)})
    graph = prepare(model, logits=False)
    onnx.checker.check_model(graph.model, full_check=True)
    assert graph.output == "y" and graph.trainable == ["W"]
    assert any("first that depends on weights" in note for note in graph.notes)


def test_input_dims_are_fixed_and_stale_shapes_dropped():
    model = cnn()
    stale = onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [-1, 99, 8, 8])
    model.graph.value_info.append(stale)
    graph = prepare(model, input_dims={"input": [None, 3, 8, 8]})
    dims = graph.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [3, 8, 8]
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in graph.model.graph.value_info}
    assert shapes["a"] == [0, 6, 8, 8]  # inferred afresh (N symbolic), not the exporter's 99 channels
    with pytest.raises(NotTrainable, match="has dim 3, and the data gives 4"):
        prepare(model, input_dims={"input": [None, 4, 8, 8]})


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                          check=False)


def test_fine_tuning_options_are_checked_before_any_work(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(cnn(), model)
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    cases = [
        (["--filters", "0.3", "--iterative", "2"], "--iterative 2: needs --finetune data"),
        (["--filters", "0.3", "--val", tmp_path / "d.npz"], "applies to fine-tuning and quantization: give --finetune DATA or --quantize"),
        (["--filters", "0.3", "--finetune", tmp_path / "d.npz", "--lr", "0"], "--lr 0.0: must be a positive number"),
        (["--filters", "0.3", "--finetune", tmp_path / "d.npz", "--unfold-bn", "maybe"], "--unfold-bn"),
        (["--filters", "0.3", "--finetune", tmp_path / "d.npz", "--schedule", "cubic", "--recover", "bias"],
         "--schedule cubic: does not combine with --recover yet"),
    ]
    for args, message in cases:
        done = _cli(model, *args, "-o", tmp_path / "out.onnx")
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.onnx").exists()


def test_finetune_command_help_and_missing_flavour(tmp_path):
    help_text = _cli("finetune", "--help").stdout
    for flag in ("--data", "--loss", "--teacher", "--unfold-bn", "--checkpoint", "--resume", "--lr-schedule"):
        assert flag in help_text
    assert "--iterative" in _cli("--help").stdout
    try:
        import onnxruntime.training  # noqa: F401
        return  # the training flavour is installed here: the next check is for the others
    except ImportError:
        pass
    model = tmp_path / "m.onnx"
    onnx.save(cnn(), model)
    np.savez(tmp_path / "d.npz", input=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    done = _cli("finetune", model, "--data", tmp_path / "d.npz")
    assert done.returncode == 2 and "onnxprune[training]" in done.stderr
    assert not (tmp_path / "m.finetuned.onnx").exists() and not (tmp_path / "m.finetuned.onnx.ckpt").exists()


def test_token_files_of_different_lengths_make_blocks(tmp_path):
    model = text_model("""
    g (int64[N,S] ids) => (float[N,S,4] y) {
      y = Gather(E, ids)
    }""", {"E": (10, 4)})
    for length, count in ((5, 3), (7, 2), (5, 1)):
        np.savez(tmp_path / f"len{length}_{count}.npz", ids=np.full((count, length), length, np.int64))
    data = load_training_data(tmp_path, model, batch_size=2)
    assert data.samples == 6 and data.sample_dims() is None
    assert data.batches_per_epoch() == 3  # the four length-5 samples in 2 batches, the two length-7 ones in 1
    for epoch in range(3):
        batches = list(data.epoch(epoch, seed=0))
        assert len(batches) == 3
        assert sorted(f["ids"].shape for f, _ in batches) == [(2, 5), (2, 5), (2, 7)]
        assert all(len(set(f["ids"].ravel())) == 1 for f, _ in batches)  # never a mixed batch
