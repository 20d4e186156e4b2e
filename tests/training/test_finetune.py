"""Fine-tuning for real, through onnxruntime-training (the training environment: pytest -m training).

The trained weights land in the graph as it came; 0 steps change nothing, so a planted model
pruned and "fine-tuned" for 0 steps still computes the original; training lowers the loss and
recovers accuracy/agreement; an interrupted run resumes to the weights of an uninterrupted one.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from textmodel import text_model

import onnxprune
from onnxprune.core.errors import OnnxPruneError
from onnxprune.training import FineTuner, TrainingConfig, load_training_data
from onnxprune.training import trainer as trainer_module

pytestmark = pytest.mark.training

CNN = """
g (float[N,3,8,8] input) => (float[N,4] prob) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (input, W1, B1)
  b = BatchNormalization (a, S, Bb, M, V)
  r = HardSwish(b)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  logits = Gemm <transB=1> (f, W2, B2)
  prob = Softmax <axis=1> (logits)
}"""


def cnn(seed=0):
    return text_model(CNN, {"W1": (8, 3, 3, 3), "B1": (8,), "S": ("positive", (8,)), "Bb": (8,), "M": (8,),
                            "V": ("positive", (8,)), "W2": (4, 8), "B2": (4,)}, seed=seed)


def task(tmp_path, samples=320):
    """A learnable task: the class is which of the first two channels has a positive mean."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 3, 8, 8)).astype(np.float32)
    x[:, :2] += rng.choice([-0.5, 0.5], size=(samples, 2, 1, 1)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + 2 * (x[:, 1].mean(axis=(1, 2)) > 0)
    cut = samples * 3 // 4
    np.savez(tmp_path / "train.npz", input=x[:cut], labels=y[:cut])
    np.savez(tmp_path / "val.npz", input=x[cut:], labels=y[cut:])
    return tmp_path / "train.npz", tmp_path / "val.npz"


def weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_cross_entropy_training_lands_in_the_original_graph(tmp_path):
    model = cnn()
    train, val = task(tmp_path)
    result = onnxprune.finetune(model, train, val=val, epochs=3, lr=3e-2, batch_size=16)
    tuned, report = result.model, result.report["finetune"]
    assert report["after"]["accuracy"] > report["before"]["accuracy"] + 0.2
    assert report["history"][-1]["train_loss"] < report["history"][0]["train_loss"]
    assert report["lowered"] == {"HardSwish": 1} and report["loss"] == "ce"
    # same nodes, interface, versions; only weights changed, the running statistics among them
    strip = lambda m: [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node]
    assert strip(tuned) == strip(model)
    assert tuned.graph.input == model.graph.input and tuned.graph.output == model.graph.output
    assert tuned.opset_import == model.opset_import and tuned.ir_version == model.ir_version
    before, after = weights(model), weights(tuned)
    assert before.keys() == after.keys()
    assert all(not np.array_equal(before[k], after[k]) for k in ("W1", "W2", "S", "M", "V"))
    onnx.checker.check_model(tuned, full_check=True)


def test_zero_steps_keep_the_function_exactly(tmp_path):
    model = cnn()
    train, val = task(tmp_path)
    result = onnxprune.finetune(model, train, val=val, epochs=0)
    for name, value in weights(model).items():
        assert np.array_equal(weights(result.model)[name], value)


def test_planted_model_pruned_then_zero_step_finetuned_stays_exact(tmp_path):
    model = cnn()
    for init in model.graph.initializer:  # channels 5-7 dead: no weights in, no weights out
        if init.name in ("W1", "B1"):
            value = numpy_helper.to_array(init).copy()
            value[5:] = 0
            init.CopyFrom(numpy_helper.from_array(value, init.name))
        if init.name == "W2":
            value = numpy_helper.to_array(init).copy()
            value[:, 5:] = 0
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    train, _ = task(tmp_path)
    result = onnxprune.prune(model, filters=3 / 8, finetune=train, epochs=0)
    x = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    assert result.report["summary"]["channels_removed"] == 3
    np.testing.assert_allclose(run(result.model, x), run(model, x), atol=1e-5)


def test_prune_then_finetune_recovers_with_distillation(tmp_path):
    model = cnn()
    train, val = task(tmp_path)
    pruned = onnxprune.prune(model, filters=0.5).model
    tuned = onnxprune.prune(model, filters=0.5, finetune=train, val=val, loss="kd", epochs=3, lr=1e-2,
                            batch_size=16)
    report = tuned.report["finetune"]
    assert report["teacher"] == "the original model"
    assert report["after"]["cosine"] > report["before"]["cosine"]
    assert tuned.report["params"]["after"] == onnxprune.prune(model, filters=0.5).report["params"]["after"]
    strip = lambda m: [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]
    assert strip(tuned.model) == strip(pruned)


def test_mse_matches_the_teacher_without_labels(tmp_path):
    model = cnn()
    x = np.load(task(tmp_path)[0])["input"]
    np.savez(tmp_path / "unlabelled.npz", input=x[:160])
    np.savez(tmp_path / "unlabelled_val.npz", input=x[160:])
    student = onnxprune.prune(model, filters=0.5).model
    result = onnxprune.finetune(student, tmp_path / "unlabelled.npz", val=tmp_path / "unlabelled_val.npz",
                                teacher=model, epochs=3, lr=1e-2, batch_size=16)
    report = result.report["finetune"]
    assert report["loss"] == "mse" and report["after"]["loss"] < report["before"]["loss"]
    with pytest.raises(OnnxPruneError, match="no labels.*no teacher"):
        onnxprune.finetune(student, tmp_path / "unlabelled.npz")


SEQUENCE = """
g (float[N,S,8] x) => (float[N,S,5] logits) {
  h = MatMul(x, W1)
  a = Relu(h)
  logits = MatMul(a, W2)
}"""


def test_kd_without_labels_reads_sequence_logits_by_their_last_axis(tmp_path):
    """[batch, sequence, classes] logits (a language model's) are distilled over the classes,
    not over the sequence; the report says which axis it took."""
    model = text_model(SEQUENCE, {"W1": (8, 16), "W2": (16, 5)})
    x = np.random.default_rng(0).standard_normal((64, 6, 8)).astype(np.float32)
    np.savez(tmp_path / "tokens.npz", x=x)
    student = onnxprune.prune(model, neurons=0.5).model
    result = onnxprune.finetune(student, tmp_path / "tokens.npz", teacher=model, loss="kd", epochs=2, lr=1e-2,
                                batch_size=16)
    notes = result.report["finetune"]["notes"]
    assert any("kd compares the distributions over the last axis of 'logits'" in n for n in notes), notes


def test_frozen_batchnorm_keeps_running_statistics(tmp_path):
    model = cnn()
    train, _ = task(tmp_path)
    tuned = onnxprune.finetune(model, train, batchnorm="frozen", epochs=1, lr=1e-2).model
    before, after = weights(model), weights(tuned)
    assert np.array_equal(before["M"], after["M"]) and np.array_equal(before["V"], after["V"])
    assert not np.array_equal(before["S"], after["S"])


def test_constant_node_weights_are_trained_in_place(tmp_path):
    model = text_model("""
    g (float[N,3] x) => (float[N,2] y) {
      w = Constant <value = float[2,3] {1,-2,3,-1,2,-3}> ()
      y = Gemm <transB=1> (x, w)
    }""", {})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=(x[:, 0] > 0).astype(np.int64))
    tuned = onnxprune.finetune(model, tmp_path / "d.npz", epochs=2, lr=5e-2, batch_size=8).model
    assert [n.op_type for n in tuned.graph.node] == ["Constant", "Gemm"] and not tuned.graph.initializer
    assert not np.array_equal(numpy_helper.to_array(tuned.graph.node[0].attribute[0].t),
                              numpy_helper.to_array(model.graph.node[0].attribute[0].t))


def _interrupt(monkeypatch, at_step: int, run) -> None:
    """Run `run()` with a SIGINT sent after training step `at_step`: it must stop with
    KeyboardInterrupt (the trainer saves its state first); the step is restored afterwards."""
    original_step = trainer_module._Run._step
    calls = {"n": 0}

    def interrupting(self, feed, labels):
        loss = original_step(self, feed, labels)
        calls["n"] += 1
        if calls["n"] == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(trainer_module._Run, "_step", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(trainer_module._Run, "_step", original_step)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    model = cnn()
    train, val = task(tmp_path)
    data = load_training_data(train, model, batch_size=16)
    val_data = load_training_data(val, model, batch_size=16)
    config = dict(epochs=2, lr=1e-2, clip_grad=1.0)
    straight = FineTuner(model, TrainingConfig(**config, checkpoint=tmp_path / "a")).fit(data, val_data)

    # mid-epoch 2 (15 batches per epoch)
    _interrupt(monkeypatch, 20, lambda: FineTuner(model, TrainingConfig(**config, checkpoint=tmp_path / "b")).fit(
        data, val_data))
    assert (tmp_path / "b" / "state" / "latest").read_text() == "step-00000020"
    with pytest.raises(OnnxPruneError, match="holds the checkpoint of an earlier run"):
        FineTuner(model, TrainingConfig(**config, checkpoint=tmp_path / "b")).fit(data, val_data)
    with pytest.raises(OnnxPruneError, match="different the training settings|different"):
        FineTuner(model, TrainingConfig(epochs=2, lr=5e-3, clip_grad=1.0, checkpoint=tmp_path / "b",
                                        resume=True)).fit(data, val_data)
    resumed = FineTuner(model, TrainingConfig(**config, checkpoint=tmp_path / "b", resume=True)).fit(data, val_data)
    assert resumed.report["resumed_from_step"] == 20 and resumed.report["steps"] == 30
    for name, value in weights(straight.model).items():
        np.testing.assert_allclose(weights(resumed.model)[name], value, rtol=1e-6, atol=1e-7)
    assert resumed.report["history"] == straight.report["history"] or \
        [h["train_loss"] for h in resumed.report["history"]] == \
        pytest.approx([h["train_loss"] for h in straight.report["history"]], rel=1e-5)


def test_labels_that_do_not_fit_are_refused(tmp_path):
    model = cnn()
    x = np.zeros((8, 3, 8, 8), np.float32)
    np.savez(tmp_path / "d.npz", input=x, labels=np.full(8, 7))
    with pytest.raises(OnnxPruneError, match="labels run from 7 to 7.*4 classes"):
        onnxprune.finetune(model, tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", input=x, labels=np.zeros((8, 2), np.int64))
    with pytest.raises(OnnxPruneError, match="do not fit"):
        onnxprune.finetune(model, tmp_path / "e.npz")


def test_op_without_gradient_or_lowering_is_named(tmp_path):
    model = text_model("""
    g (float[N,3] x) => (float[N,3] y) {
      y0 = Mul(x, W)
      y = CumSum(y0, axis)
    }""", {"W": (3,), "axis": np.array(1, np.int64)})
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3), np.float32), labels=np.ones((4, 3), np.float32))
    with pytest.raises(OnnxPruneError, match=r"CumSum.*no gradient for CumSum") as info:
        onnxprune.finetune(model, tmp_path / "d.npz", loss="mse")
    assert "\n" not in str(info.value)


def test_cli_prune_and_finetune(tmp_path):
    model = cnn()
    onnx.save(model, tmp_path / "m.onnx")
    train, val = task(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "onnxprune", str(tmp_path / "m.onnx"), "--filters", "0.5",
                           "--finetune", str(train), "--val", str(val), "--epochs", "2", "--lr", "0.01",
                           "--batch-size", "16", "-o", str(out), "--report", str(report)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "fine-tuned: ce loss, 2 epoch(s)" in done.stdout and "validation: before" in done.stdout
    data = json.loads(report.read_text())
    assert data["finetune"]["steps"] == 30 and data["params"]["after"] < data["params"]["before"]
    assert out.exists() and not (tmp_path / "out.onnx.ckpt").exists()  # the default checkpoint is removed

    done = subprocess.run([sys.executable, "-m", "onnxprune", "finetune", str(out), "--data", str(train),
                           "--loss", "kd", "--steps", "3", "--resume"], capture_output=True, text=True)
    assert done.returncode == 2 and "kd" in done.stderr or "resume" in done.stderr


def test_cli_finetune_interrupted_and_resumed(tmp_path):
    model = cnn()
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((4000, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "big.npz", input=x, labels=(x[:, 0, 0, 0] > 0).astype(np.int64))
    out = tmp_path / "tuned.onnx"
    # enough epochs that the run cannot end on its own before the signal (500 did, on a fast machine)
    command = [sys.executable, "-m", "onnxprune", "finetune", str(tmp_path / "m.onnx"), "--data",
               str(tmp_path / "big.npz"), "--epochs", "100000", "--batch-size", "4", "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "tuned.onnx.ckpt"
    import threading
    import time

    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stderr.read1(4096), b"")),
                              daemon=True)
    reader.start()
    # The first epoch's saved state shows the loop is running and holds signals until its next
    # step. (stderr is not a terminal here, so there is no progress bar to wait for, and a fixed
    # sleep raced either the setup or the end of training.)
    deadline = time.time() + 300
    while not (checkpoint / "state" / "latest").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, b"".join(chunks).decode(errors="replace")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    reader.join(timeout=10)
    err = b"".join(chunks).decode(errors="replace")
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and not out.exists()
    assert (checkpoint / "state" / "latest").exists()
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(command + ["--resume", "--steps", "10"], capture_output=True, text=True)
    # --steps changes the settings: the checkpoint is refused rather than mixed
    assert resumed.returncode == 2 and "different" in resumed.stderr


def test_graphs_that_need_a_fixed_batch_train_at_one(tmp_path, monkeypatch):
    # some graphs fail in onnxruntime-training with a dynamic batch and train with a fixed one
    # (PP-OCRv4's recognizer, magika): simulated here by failing the first probe step
    model = cnn()
    train, val = task(tmp_path, samples=200)  # 150 training samples: 6 batches of 24 and a partial one
    options = dict(val=val, epochs=1, lr=1e-2, batch_size=24)
    dynamic = onnxprune.finetune(model, train, **options).report["finetune"]
    original_probe = trainer_module.probe_step
    calls = []

    def fail_first(folder, feed):
        calls.append(onnx.load(str(folder / "training_model.onnx")).graph.input[0].type.tensor_type.shape.dim[0])
        if len(calls) == 1:
            raise trainer_module.NotTrainable("simulated failure with a dynamic batch")
        return original_probe(folder, feed)

    monkeypatch.setattr(trainer_module, "probe_step", fail_first)
    result = onnxprune.finetune(model, train, **options)
    static = result.report["finetune"]
    assert [d.dim_value for d in calls] == [0, 24]
    assert any("trained at a fixed batch of 24" in note for note in result.report["notes"])
    assert static["steps"] == 6 and dynamic["steps"] == 7
    # validation pads its last batch (50 = 24 + 24 + 2) and counts real rows only
    assert static["before"]["samples"] == 50
    assert static["before"]["loss"] == pytest.approx(dynamic["before"]["loss"], rel=1e-5)
    assert static["before"]["accuracy"] == dynamic["before"]["accuracy"]


FOLDED = """
g (float[N,3,8,8] input) => (float[N,4] logits) {
  a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (input, W1, B1)
  r = Relu(a)
  c = Conv <kernel_shape=[1,1], group=2> (r, W2)
  s = Relu(c)
  p = GlobalAveragePool(s)
  f = Flatten(p)
  logits = Gemm <transB=1> (f, W3, B3)
}"""


def folded_cnn():
    return text_model(FOLDED, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (6, 4, 1, 1), "W3": (4, 6), "B3": (4,)})


def test_unfolded_batchnorms_fold_back(tmp_path):
    model = folded_cnn()
    train, val = task(tmp_path)
    untouched = onnxprune.finetune(model, train, val=val, unfold_bn=True, epochs=0)
    assert any("2 Conv(s) trained with a BatchNorm" in n for n in untouched.report["notes"])
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    # the inserted BatchNorms start as the identity: folded back untrained, the function is the same
    np.testing.assert_allclose(run(untouched.model, x), run(model, x), rtol=1e-4, atol=1e-5)
    tuned = onnxprune.finetune(model, train, val=val, unfold_bn=True, epochs=2, lr=1e-2, batch_size=16)
    report = tuned.report["finetune"]
    assert report["after"]["accuracy"] > report["before"]["accuracy"]
    # the same nodes as before; the Conv that had no bias has one now
    assert [n.op_type for n in tuned.model.graph.node] == [n.op_type for n in model.graph.node]
    assert len(tuned.model.graph.node[2].input) == 3
    # what the report measured on the validation data is what the folded model computes
    data = np.load(val)
    logits = run(tuned.model, data["input"])
    assert (logits.argmax(1) == data["labels"]).mean() == pytest.approx(report["after"]["accuracy"])


def test_unfolded_batchnorms_restore_the_originals_statistics(tmp_path):
    model = folded_cnn()
    for init in model.graph.initializer:  # channels 3 and 7 dead (one channel of each conv group)
        if init.name in ("W1", "B1"):
            value = numpy_helper.to_array(init).copy()
            value[[3, 7]] = 0
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    train, _ = task(tmp_path)
    x = np.random.default_rng(2).standard_normal((5, 3, 8, 8)).astype(np.float32)
    # the kept channels carry the original's statistics: untrained, the unfolded BatchNorms are
    # the identity, and the planted model stays exact
    planted = onnxprune.prune(model, filters=0.25, neurons=0.0, finetune=train, unfold_bn=True, epochs=0)
    assert planted.report["summary"]["channels_removed"] == 1  # one channel per group of the grouped conv
    np.testing.assert_allclose(run(planted.model, x), run(model, x), rtol=1e-4, atol=1e-5)
    # pruning live channels shifts the statistics; the BatchNorms start by restoring the original's
    # at the channels that stay (measured on the first 256 training samples)
    lossy = onnxprune.prune(folded_cnn(), filters=0.5, neurons=0.0, finetune=train, unfold_bn=True, epochs=0)
    conv1 = next(d for d in lossy.plan.decisions if d.group.channels == 4)
    kept = np.setdiff1d(np.arange(4), conv1.removed)
    kept = np.concatenate([kept, kept + 4])  # the grouped conv's two halves lose the same channels
    data = np.load(train)["input"][:256]

    def conv1_moments(m, channels=None):  # the first Conv's output, "a"
        probe = onnx.ModelProto.FromString(m.SerializeToString())
        probe.graph.output.append(onnx.helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, None))
        import onnxruntime as ort

        value = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            ["a"], {"input": data})[0]
        value = value if channels is None else value[:, channels]
        return value.mean(axis=(0, 2, 3)), value.var(axis=(0, 2, 3))

    want, got = conv1_moments(folded_cnn(), kept), conv1_moments(lossy.model)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-3, atol=1e-4)


def test_iterative_pruning_reaches_the_one_shot_counts(tmp_path):
    model = cnn()
    train, val = task(tmp_path)
    one_shot = onnxprune.prune(model, filters=0.5, neurons=0.0, finetune=train, val=val, epochs=2, lr=1e-2,
                               batch_size=16)
    rounds = onnxprune.prune(model, filters=0.5, neurons=0.0, finetune=train, val=val, epochs=2, lr=1e-2,
                             batch_size=16, iterative=2, loss="kd")
    report = rounds.report["iterative"]["rounds"]
    assert [r["round"] for r in report] == [1, 2] and report[0]["channels_removed"] == 2
    assert report[1]["channels_removed"] == 4
    # the same structure as one shot, the original measured as "before", the training split in two
    assert rounds.report["params"] == one_shot.report["params"]
    assert sum(r["steps"] for r in report) == one_shot.report["finetune"]["steps"]
    assert [n.op_type for n in rounds.model.graph.node] == [n.op_type for n in one_shot.model.graph.node]
    assert rounds.report["finetune"]["teacher"] == "the original model"  # handed to every round
    with pytest.raises(onnxprune.OptionError, match="iterative.*finetune"):
        onnxprune.prune(model, filters=0.5, iterative=2)


def test_gradual_pruning_masks_on_the_cubic_schedule_then_removes(tmp_path):
    from onnxprune.training.masks import cubic_fraction

    assert [round(cubic_fraction(s, 8), 3) for s in (0, 2, 4, 8, 10)] == [0.0, 0.578, 0.875, 1.0, 1.0]
    model = cnn()
    train, val = task(tmp_path)
    one_shot = onnxprune.prune(model, filters=0.5, neurons=0.0)
    result = onnxprune.prune(model, filters=0.5, neurons=0.0, finetune=train, val=val, epochs=2, lr=1e-2,
                             batch_size=16, schedule="cubic")
    gradual = result.report["gradual"]
    masked = [u["masked"] for u in gradual["updates"]]
    assert masked == sorted(masked) and masked[-1] == 4 and masked[0] < 4  # grows, to the plan's count
    assert result.report["params"]["after"] == one_shot.report["params"]["after"]
    assert result.verification.ort == "passed"
    # the masked channels carried nothing: removing them kept what was trained (the report's
    # last validation accuracy is the pruned model's)
    data = np.load(val)
    accuracy = (run(result.model, data["input"]).argmax(1) == data["labels"]).mean()
    assert accuracy == pytest.approx(result.report["finetune"]["after"]["accuracy"])
    with pytest.raises(onnxprune.OptionError, match="schedule.*finetune"):
        onnxprune.prune(model, filters=0.5, schedule="cubic")


def test_gradual_pruning_with_unfolded_batchnorms(tmp_path):
    # a masked channel's unfolded BatchNorm is masked with it, so the channel folds back to a
    # zero filter and removing it keeps what was trained
    model = folded_cnn()
    train, val = task(tmp_path)
    result = onnxprune.prune(model, filters=0.5, neurons=0.0, finetune=train, val=val, epochs=2, lr=1e-2,
                             batch_size=16, schedule="cubic", unfold_bn="on")
    assert any("Conv(s) trained with a BatchNorm" in n for n in result.report["notes"]), result.report["notes"]
    assert result.report["gradual"]["masked"] and result.verification.ort == "passed"
    assert result.report["summary"]["channels_removed"] == sum(result.report["gradual"]["masked"].values())
    data = np.load(val)
    accuracy = (run(result.model, data["input"]).argmax(1) == data["labels"]).mean()
    assert accuracy == pytest.approx(result.report["finetune"]["after"]["accuracy"])


def test_iterative_rounds_with_rewinding(tmp_path):
    model = cnn()
    train, val = task(tmp_path)
    result = onnxprune.prune(model, filters=0.5, neurons=0.0, finetune=train, val=val, epochs=2, lr=1e-2,
                             batch_size=16, iterative=2, rewind=True)
    assert result.report["iterative"]["rewind"] is True
    rounds = result.report["iterative"]["rounds"]
    assert [r["channels_removed"] for r in rounds] == [2, 4]
    # the last round fine-tuned the original cut to every channel chosen: the same as doing that by hand
    by_hand = onnxprune.prune(model, plan=result.plan.to_json(), finetune=train, val=val, epochs=2, lr=1e-2,
                              batch_size=16, train_fraction=0.5)
    for name, value in weights(by_hand.model).items():
        np.testing.assert_array_equal(weights(result.model)[name], value)
    with pytest.raises(onnxprune.OptionError, match="rewind"):
        onnxprune.prune(model, filters=0.5, finetune=train, rewind=True)


def test_interrupted_gradual_pruning_resumes_with_its_masks(tmp_path, monkeypatch):
    model = cnn()
    train, _ = task(tmp_path)
    options = dict(filters=0.5, neurons=0.0, finetune=train, epochs=2, lr=1e-2, batch_size=16, schedule="cubic")
    straight = onnxprune.prune(model, **options, checkpoint=tmp_path / "a")
    # after step 4: some masks in place, not all
    _interrupt(monkeypatch, 4, lambda: onnxprune.prune(model, **options, checkpoint=tmp_path / "b"))
    saved = json.loads((tmp_path / "b" / "state" / "step-00000004" / "progress.json").read_text())
    assert 0 < sum(len(v) for v in saved["masks"].values()) < 4
    resumed = onnxprune.prune(model, **options, checkpoint=tmp_path / "b", resume=True)
    for name, value in weights(straight.model).items():
        np.testing.assert_allclose(weights(resumed.model)[name], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rewind", [False, True])
def test_interrupted_iterative_pruning_resumes_after_the_finished_rounds(tmp_path, monkeypatch, rewind):
    model = cnn()
    train, _ = task(tmp_path)
    options = dict(filters=0.5, neurons=0.0, finetune=train, epochs=2, lr=1e-2, batch_size=16, iterative=2,
                   rewind=rewind)
    straight = onnxprune.prune(model, **options, checkpoint=tmp_path / "a")
    steps = straight.report["iterative"]["rounds"][0]["steps"]
    # three steps into round 2's fine-tuning
    _interrupt(monkeypatch, steps + 3, lambda: onnxprune.prune(model, **options, checkpoint=tmp_path / "b"))
    saved = json.loads((tmp_path / "b" / "iterative.json").read_text())
    assert saved["done"] == 1 and (tmp_path / "b" / "round-2" / "state" / "latest").is_file()
    original_step, calls = trainer_module._Run._step, {"n": 0}

    def counting(self, feed, labels):
        calls["n"] += 1
        return original_step(self, feed, labels)

    monkeypatch.setattr(trainer_module._Run, "_step", counting)
    resumed = onnxprune.prune(model, **options, checkpoint=tmp_path / "b", resume=True)
    assert calls["n"] == straight.report["iterative"]["rounds"][1]["steps"] - 3  # round 1 not run again
    assert resumed.report["iterative"]["rounds"] == straight.report["iterative"]["rounds"]
    assert resumed.report["params"] == straight.report["params"]
    for name, value in weights(straight.model).items():
        np.testing.assert_allclose(weights(resumed.model)[name], value, rtol=1e-6, atol=1e-7)
    with pytest.raises(OnnxPruneError, match="another iterative run"):
        onnxprune.prune(model, **dict(options, iterative=4), checkpoint=tmp_path / "b", resume=True)


def test_input_shape_fixes_dims_for_the_analysis_only(tmp_path):
    # --input-shape pins the batch at 1 for pruning; the teacher and the pruned model still take
    # training batches of 16, as the user's model does
    model = cnn()
    train, val = task(tmp_path)
    result = onnxprune.prune(model, filters=0.5, input_shapes={"input": [1, 3, 8, 8]}, finetune=train, val=val,
                             loss="kd", epochs=1, lr=1e-2, batch_size=16)
    assert result.report["finetune"]["steps"] == 15
    assert result.model.graph.input[0] == model.graph.input[0]


@pytest.mark.parametrize("unfold_bn", ["off", "on"])
def test_finetuning_keeps_the_sparsity_pattern(tmp_path, unfold_bn):
    """2:4 weights fine-tuned: every zero stays zero (the weights around them train), so the
    pattern still holds on every layer it was put on."""
    model = folded_cnn() if unfold_bn == "on" else cnn()
    train, val = task(tmp_path)
    sparse = onnxprune.prune(model, pattern="2:4", latency_runs=0)
    tuned = onnxprune.prune(model, pattern="2:4", finetune=train, val=val, epochs=2, lr=1e-2, batch_size=16,
                            unfold_bn=unfold_bn, latency_runs=0)
    layers = {row["weight"]: row for row in sparse.report["sparsity"]["layers"]}
    assert layers, sparse.report["sparsity"]
    before, after = weights(sparse.model), weights(tuned.model)
    for name in layers:
        assert np.array_equal(after[name] == 0, before[name] == 0), name  # the same zeros
        assert not np.allclose(after[name], before[name]), name  # and the rest trained
    assert tuned.report["finetune"]["after"]["accuracy"] >= tuned.report["finetune"]["before"]["accuracy"]


@pytest.mark.parametrize("pattern", ["unstructured", "block:2x2"])
def test_gradual_sparsity_reaches_the_target_on_the_cubic_schedule(tmp_path, pattern):
    """--sparsity with --schedule cubic: zeros grow during fine-tuning by magnitude, only grow,
    and the model ends at the target with those zeros; what it computes is what was validated last."""
    model = cnn()
    train, val = task(tmp_path)
    result = onnxprune.prune(model, sparsity=0.6, pattern=pattern, finetune=train, val=val, epochs=2, lr=1e-2,
                             batch_size=16, schedule="cubic", latency_runs=0)
    sparsity = result.report["sparsity"]
    updates = sparsity["schedule"]["updates"]
    reached = [u["sparsity"] for u in updates]
    assert len(updates) > 5 and reached == sorted(reached) and reached[0] < 0.3
    assert updates[-1]["target"] == pytest.approx(0.6)
    for row in sparsity["layers"]:
        assert row["sparsity"] == pytest.approx(0.6, abs=0.1), row  # per layer; blocks round down
    assert sparsity["total"]["sparsity"] >= 0.5 and result.report["finetune"]["steps"] == 30
    data = np.load(val)
    accuracy = (run(result.model, data["input"]).argmax(1) == data["labels"]).mean()
    assert accuracy == pytest.approx(result.report["finetune"]["after"]["accuracy"])
    # fine-tuned again on its own: --keep-zeros holds the zeros; without it training fills them
    # in, and a note says how to keep them
    kept = onnxprune.finetune(result.model, train, epochs=1, lr=1e-2, batch_size=16, keep_zeros=True)
    filled = onnxprune.finetune(result.model, train, epochs=1, lr=1e-2, batch_size=16)
    for name in (row["weight"] for row in sparsity["layers"]):
        assert np.array_equal(weights(kept.model)[name] == 0, weights(result.model)[name] == 0), name
        assert not np.allclose(weights(kept.model)[name], weights(result.model)[name]), name
        assert (weights(filled.model)[name] == 0).mean() < 0.1, name
    assert any("--keep-zeros" in note for note in filled.report["notes"]), filled.report["notes"]
    assert not any("--keep-zeros" in note for note in kept.report["notes"])


def test_gradual_sparsity_is_refused_where_it_has_no_meaning(tmp_path):
    model = cnn()
    train, _ = task(tmp_path)
    base = dict(finetune=train, schedule="cubic")
    with pytest.raises(onnxprune.OptionError, match="2:4 has no intermediate sparsity"):
        onnxprune.prune(model, pattern="2:4", **base)
    with pytest.raises(onnxprune.OptionError, match="not both"):
        onnxprune.prune(model, sparsity=0.5, filters=0.3, **base)
    with pytest.raises(onnxprune.OptionError, match="magnitude"):
        onnxprune.prune(model, sparsity=0.5, sparsity_method="wanda", calib=train, **base)
    with pytest.raises(onnxprune.OptionError, match="layer_sparsity"):
        onnxprune.prune(model, sparsity=0.5, layer_sparsity=("W1=0.2",), **base)


def test_interrupted_gradual_sparsity_resumes_with_its_zeros(tmp_path, monkeypatch):
    model = cnn()
    train, _ = task(tmp_path)
    options = dict(sparsity=0.6, finetune=train, epochs=2, lr=1e-2, batch_size=16, schedule="cubic",
                   latency_runs=0)
    straight = onnxprune.prune(model, **options, checkpoint=tmp_path / "a")
    _interrupt(monkeypatch, 6, lambda: onnxprune.prune(model, **options, checkpoint=tmp_path / "b"))
    saved = json.loads((tmp_path / "b" / "state" / "step-00000006" / "progress.json").read_text())
    assert 0 < sum(saved["masks"].values())
    resumed = onnxprune.prune(model, **options, checkpoint=tmp_path / "b", resume=True)
    for name, value in weights(straight.model).items():
        np.testing.assert_allclose(weights(resumed.model)[name], value, rtol=1e-6, atol=1e-7)
    assert resumed.report["sparsity"]["total"] == straight.report["sparsity"]["total"]


def test_group_lasso_zeroes_whole_channels_that_then_go_exactly(tmp_path):
    """--regularize group-lasso: the proximal step sets every value coupled to a channel to zero
    together, so --zero-channels removes those channels without changing the function."""
    model = cnn()
    train, val = task(tmp_path)
    tuned = onnxprune.finetune(model, train, val=val, epochs=2, lr=1e-2, batch_size=16, regularize="group-lasso",
                               reg_strength=22.0)
    summary = tuned.report["finetune"]["regularization"]
    assert summary["kind"] == "group-lasso" and summary["channels"] == 8
    assert 0 < summary["channels_zero"] < 8, summary
    assert any("--zero-channels" in note for note in tuned.report["notes"])
    pruned = onnxprune.prune(tuned.model, zero_channels=True, latency_runs=0)
    assert pruned.report["summary"]["channels_removed"] == summary["channels_zero"]
    x = np.load(val)["input"]
    np.testing.assert_allclose(run(pruned.model, x), run(tuned.model, x), rtol=1e-5, atol=1e-6)
    # the same strength without the regularizer leaves every channel
    plain = onnxprune.finetune(model, train, val=val, epochs=2, lr=1e-2, batch_size=16)
    assert onnxprune.prune(plain.model, zero_channels=True, latency_runs=0).report["summary"]["channels_removed"] == 0


def test_l1_slims_batchnorm_scales_and_needs_some(tmp_path):
    train, _ = task(tmp_path)
    tuned = onnxprune.finetune(cnn(), train, epochs=2, lr=1e-2, batch_size=16, regularize="l1", reg_strength=10.0)
    summary = tuned.report["finetune"]["regularization"]
    scale = weights(tuned.model)["S"]
    assert summary["scales"] == 8 and 0 < summary["scales_zero"] == int((scale == 0).sum()) < 8
    # the zero scales are what --importance bn ranks lowest
    pruned = onnxprune.prune(tuned.model, filters=summary["scales_zero"] / 8, importance="bn", latency_runs=0)
    (decision,) = [d for d in pruned.plan.decisions if len(d.removed)]
    assert sorted(decision.removed.tolist()) == np.flatnonzero(scale == 0).tolist()
    with pytest.raises(onnxprune.OptionError, match="l1.*BatchNormalization.*group-lasso"):
        onnxprune.finetune(folded_cnn(), train, epochs=1, regularize="l1", reg_strength=1.0)
    with pytest.raises(onnxprune.OptionError, match="together"):
        onnxprune.finetune(cnn(), train, regularize="group-lasso")


LINEAR = """
g (float[N,8] x) => (float[N,4] y) {
  y = MatMul(x, W)
}"""


def _moving_task(tmp_path):
    """A linear classifier whose label is the argmax of the first four features: those rows of W
    start small and must grow; the last four (noise) start large and are best shrunk."""
    rng = np.random.default_rng(2)
    w = np.concatenate([rng.choice([-0.05, 0.05], size=(4, 4)), rng.choice([-2.0, 2.0], size=(4, 4))]).astype(
        np.float32)
    model = text_model(LINEAR, {"W": w})
    x = rng.standard_normal((480, 8)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, labels=x[:, :4].argmax(axis=1).astype(np.int64))
    return model, tmp_path / "train.npz"


def test_movement_keeps_what_training_moves_away_from_zero(tmp_path):
    """At 50% sparsity reached on the cubic schedule, magnitude keeps the large noise weights;
    movement (the sum of -gradient x weight) keeps the informative ones that grow."""
    model, train = _moving_task(tmp_path)
    kept = {}
    for mask_by in ("magnitude", "movement"):
        result = onnxprune.prune(model, sparsity=0.5, schedule="cubic", mask_by=mask_by, finetune=train, epochs=2,
                                 lr=2e-2, batch_size=16, weight_decay=0.0, latency_runs=0)
        assert result.report["sparsity"]["method"] == mask_by
        w = weights(result.model)["W"]
        kept[mask_by] = (w[:4] != 0).sum() / (w != 0).sum()  # share of the survivors that are informative
        assert (w == 0).mean() == 0.5
    assert kept["movement"] >= 0.75 and kept["magnitude"] <= 0.5, kept
    with pytest.raises(onnxprune.OptionError, match="mask_by.*cubic"):
        onnxprune.prune(model, sparsity=0.5, mask_by="movement")


def test_interrupted_movement_pruning_resumes_with_its_scores(tmp_path, monkeypatch):
    model, train = _moving_task(tmp_path)
    options = dict(sparsity=0.5, schedule="cubic", mask_by="movement", finetune=train, epochs=2, lr=2e-2,
                   batch_size=16, latency_runs=0)
    straight = onnxprune.prune(model, **options, checkpoint=tmp_path / "a")
    _interrupt(monkeypatch, 25, lambda: onnxprune.prune(model, **options, checkpoint=tmp_path / "b"))
    assert (tmp_path / "b" / "state" / "step-00000025" / "masker.npz").exists()
    resumed = onnxprune.prune(model, **options, checkpoint=tmp_path / "b", resume=True)
    np.testing.assert_allclose(weights(resumed.model)["W"], weights(straight.model)["W"], rtol=1e-6, atol=1e-7)


def test_gradual_channels_by_movement(tmp_path):
    model = cnn()
    train, val = task(tmp_path)
    result = onnxprune.prune(model, filters=0.5, neurons=0.0, finetune=train, val=val, epochs=2, lr=1e-2,
                             batch_size=16, schedule="cubic", mask_by="movement")
    gradual = result.report["gradual"]
    assert gradual["mask_by"] == "movement" and gradual["updates"][-1]["masked"] == 4
    data = np.load(val)
    accuracy = (run(result.model, data["input"]).argmax(1) == data["labels"]).mean()
    assert accuracy == pytest.approx(result.report["finetune"]["after"]["accuracy"])
