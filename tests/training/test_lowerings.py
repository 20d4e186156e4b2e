"""Each lowering computes what the op computes (in onnxruntime, any flavour), and, in the
training environment, its gradient through onnxruntime-training matches a central finite
difference of the original op."""
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune.training.lowerings import LOWERINGS, lower
from onnxprune.training.prepare import prepare

# op -> (attributes, extra inputs as arrays, input shape, opset)
CASES = {
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, [], (2, 3, 4), 17),
    "HardSwish": ({}, [], (2, 3, 4), 17),
    "Softplus": ({}, [], (2, 3, 4), 17),
    "Mish": ({}, [], (2, 3, 4), 18),
    "Elu": ({"alpha": 0.7}, [], (2, 3, 4), 17),
    "PRelu": ({}, [np.array([[[0.1]], [[0.3]], [[-0.2]]], np.float32)], (2, 3, 2, 2), 17),
    "Sum": ({}, ["self", "self2"], (2, 3), 17),
    "Mean": ({}, ["self", "self2"], (2, 3), 17),
    "CastLike": ({}, [np.zeros(1, np.float32)], (2, 3), 17),
    "InstanceNormalization": ({"epsilon": 1e-3}, [np.array([1.5, 0.5, -1.0], np.float32),
                                                  np.array([0.1, 0.2, 0.3], np.float32)], (2, 3, 3, 4), 17),
    "ReduceMax": ({"axes": [1, 2], "keepdims": 0}, [], (2, 3, 4), 17),
    "GlobalMaxPool": ({}, [], (2, 3, 3, 4), 17),
    "Resize": ({"mode": "nearest"}, ["", np.array([1, 1, 2, 3], np.float32)], (2, 3, 2, 2), 17),
}


def op_model(op: str, scaled: bool = True):
    """y = Op(x * W, ...): W is the weight whose gradient the training test checks."""
    attrs, extras, shape, opset = CASES[op]
    inits, inputs = [numpy_helper.from_array(np.linspace(0.5, 1.5, int(np.prod(shape)), dtype=np.float32)
                                             .reshape(shape), "W")], ["xw"]
    nodes = [helper.make_node("Mul", ["x", "W"], ["xw"])]
    for index, extra in enumerate(extras):
        if isinstance(extra, str) and not extra:  # an optional input left out
            inputs.append("")
        elif isinstance(extra, str):  # another input made from x, so the gradient reaches W through it too
            nodes.append(helper.make_node("Mul", ["xw", "x"], [f"e{index}"]))
            inputs.append(f"e{index}")
        else:
            inits.append(numpy_helper.from_array(extra, f"c{index}"))
            inputs.append(f"c{index}")
    nodes.append(helper.make_node(op, inputs, ["y"], **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model)


def sample(shape, seed=0):
    # values away from the kinks (0, +-3, the maximum) where a finite difference is not a derivative
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.2, 2.5, size=shape) * rng.choice([-1, 1], size=shape)
    return x.astype(np.float32)


def run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_every_registered_lowering_has_a_case():
    assert set(LOWERINGS) == set(CASES)


@pytest.mark.parametrize("op", sorted(CASES))
def test_lowering_computes_the_op(op):
    pytest.importorskip("onnxruntime")
    model = op_model(op)
    lowered, counts, failed = lower(onnx.ModelProto.FromString(model.SerializeToString()))
    assert not failed
    assert counts == {op: 1}
    assert op not in {n.op_type for n in lowered.graph.node}
    onnx.checker.check_model(lowered, full_check=True)
    x = sample(CASES[op][2])
    np.testing.assert_allclose(run(lowered, x), run(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.training
@pytest.mark.parametrize("op", sorted(CASES))
def test_lowered_gradient_matches_finite_difference(op, tmp_path):
    from onnxprune.core.runtime import import_training_api
    from onnxprune.training.trainer import _quiet_stderr

    artifacts, api = import_training_api()
    from onnxruntime.training import onnxblock

    model = op_model(op)
    shape = CASES[op][2]
    graph = prepare(model, logits=False)
    assert "W" in graph.trainable and graph.lowered == {op: 1}
    rng = np.random.default_rng(1)
    out_shape = run(model, sample(shape)).shape
    weights = rng.standard_normal(out_shape).astype(np.float32)

    class WeightedSum(onnxblock.Block):  # loss = sum(R * y): its gradient is R pulled back through the op
        def build(self, y):
            self.base.graph.initializer.append(numpy_helper.from_array(weights, "R"))
            self.base.graph.node.append(helper.make_node("Mul", [y, "R"], ["ry"]))
            self.base.graph.node.append(helper.make_node("ReduceSum", ["ry"], ["loss"], keepdims=0))
            return "loss"

    with _quiet_stderr():
        artifacts.generate_artifacts(graph.model, requires_grad=graph.trainable, frozen_params=graph.frozen + ["R"],
                                     loss=WeightedSum(), artifact_directory=str(tmp_path))
    for name in ("training_model.onnx", "eval_model.onnx"):
        m = onnx.load(str(tmp_path / name))
        m.ir_version = min(m.ir_version, 10)
        onnx.save(m, str(tmp_path / name))
    state = api.CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = api.Module(str(tmp_path / "training_model.onnx"), state, str(tmp_path / "eval_model.onnx"))
    module.train()
    x = sample(shape)
    module(x)
    gradient = state.parameters["W"].grad

    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "W")).astype(np.float64)
    numeric = np.zeros_like(w)
    eps = 1e-3
    for index in np.ndindex(w.shape):
        values = []
        for sign in (1, -1):
            probe = onnx.ModelProto.FromString(model.SerializeToString())
            changed = w.copy()
            changed[index] += sign * eps
            for init in probe.graph.initializer:
                if init.name == "W":
                    init.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), "W"))
            values.append(float((run(probe, x).astype(np.float64) * weights).sum()))
        numeric[index] = (values[0] - values[1]) / (2 * eps)
    np.testing.assert_allclose(gradient, numeric, rtol=2e-2, atol=2e-2)


def test_a_form_without_lowering_matters_only_on_the_gradient_path():
    text = """
    g (float[N,3,4,4] x) => (float[N,3,8,8] y, float[N,3,8,8] z) {
      xw = Mul(x, W)
      y = Resize <mode="linear"> (xw, "", scales)
      z = Resize <mode="nearest"> (xw, "", scales)
    }"""
    from onnxprune.training.prepare import NotTrainable
    from textmodel import text_model

    model = text_model(text, {"W": (3, 1, 1), "scales": np.array([1, 1, 2, 2], np.float32)})
    with pytest.raises(NotTrainable, match="only nearest upsampling by whole factors"):
        prepare(model, output="y", logits=False)
    graph = prepare(model, output="z", logits=False)  # the linear Resize feeds another output only
    assert graph.lowered == {"Resize": 1} and graph.trainable == ["W"]
