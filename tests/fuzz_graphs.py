"""Malformed graphs for the fault tier, made from the op rules' own test graphs.

`seed_models()` collects every `text_model(...)` call in tests/ops whose arguments can be
evaluated from the test module's globals (most of them), and builds those models. `mutate`
breaks a model in one of the ways real files are broken: dangling or duplicated tensors,
cycles, unsorted nodes, short or missing weight data, NaN/inf weights, bad attributes,
unknown ops, wrong input types and ranks, impossible versions. Everything is seeded: a case
number gives the same model every time.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

OPS_TESTS = Path(__file__).resolve().parent / "ops"


def seed_models() -> list[tuple[str, onnx.ModelProto]]:
    """(label, model) for every op-rule test graph whose text_model arguments are module-level."""
    from textmodel import text_model

    seeds = []
    for path in sorted(OPS_TESTS.glob("test_*.py")):
        spec = importlib.util.spec_from_file_location(f"_fuzz_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        tree = ast.parse(path.read_text())
        for number, call in enumerate(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                                      and getattr(n.func, "id", None) == "text_model"):
            try:
                args = [eval(compile(ast.Expression(a), str(path), "eval"), module.__dict__) for a in call.args]
                kwargs = {k.arg: eval(compile(ast.Expression(k.value), str(path), "eval"), module.__dict__)
                          for k in call.keywords}
                seeds.append((f"{path.stem}#{number}", text_model(*args, **kwargs)))
            except Exception:  # arguments built inside the test function: not reachable from here
                continue
    return seeds


def _float_inits(m):
    return [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and t.dims and all(t.dims)]


def _set_array(tensor, array):
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))


def drop_node(m, rng):
    del m.graph.node[int(rng.integers(len(m.graph.node)))]


def dangling_input(m, rng):
    node = m.graph.node[int(rng.integers(len(m.graph.node)))]
    if node.input:
        node.input[int(rng.integers(len(node.input)))] = "no_such_tensor"


def duplicate_output(m, rng):
    if len(m.graph.node) > 1:
        i, j = rng.choice(len(m.graph.node), 2, replace=False)
        m.graph.node[int(j)].output[0] = m.graph.node[int(i)].output[0]


def cycle(m, rng):
    i = int(rng.integers(len(m.graph.node)))
    j = int(rng.integers(i, len(m.graph.node)))
    if m.graph.node[i].input:
        m.graph.node[i].input[0] = m.graph.node[j].output[0]


def shuffle(m, rng):
    nodes = [m.graph.node[int(i)] for i in rng.permutation(len(m.graph.node))]
    copies = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del m.graph.node[:]
    m.graph.node.extend(copies)


def truncate_raw(m, rng):
    inits = [t for t in m.graph.initializer if len(t.raw_data) > 4]
    if inits:
        t = inits[int(rng.integers(len(inits)))]
        t.raw_data = t.raw_data[: -int(rng.integers(1, len(t.raw_data)))]


def clear_data(m, rng):
    inits = _float_inits(m)
    if inits:
        t = inits[int(rng.integers(len(inits)))]
        t.ClearField("raw_data")
        del t.float_data[:]


def wrong_dims(m, rng):
    inits = _float_inits(m)
    if inits:
        t = inits[int(rng.integers(len(inits)))]
        t.dims[int(rng.integers(len(t.dims)))] += 1


def nan_weight(m, rng, value=np.nan, everywhere=True):
    inits = _float_inits(m)
    if inits:
        t = inits[int(rng.integers(len(inits)))]
        a = numpy_helper.to_array(t).copy()
        if everywhere:
            a[...] = value
        else:
            a.reshape(-1)[int(rng.integers(a.size))] = value
        _set_array(t, a)


def inf_weight_somewhere(m, rng):
    nan_weight(m, rng, value=np.inf, everywhere=False)


def bad_attribute(m, rng):
    with_ints = [(n, a) for n in m.graph.node for a in n.attribute
                 if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
    if with_ints:
        node, attr = with_ints[int(rng.integers(len(with_ints)))]
        value = int(rng.choice([0, -1, 7, 99]))
        if attr.type == onnx.AttributeProto.INT:
            attr.i = value
        elif attr.ints:
            attr.ints[int(rng.integers(len(attr.ints)))] = value


def unknown_op(m, rng):
    m.graph.node[int(rng.integers(len(m.graph.node)))].op_type = "NoSuchOp"


def foreign_domain(m, rng):
    m.graph.node[int(rng.integers(len(m.graph.node)))].domain = "com.example.unknown"


def input_rank(m, rng):
    dims = m.graph.input[0].type.tensor_type.shape.dim
    if len(dims) > 1:
        del dims[-1]


def dynamic_input(m, rng):
    for d in m.graph.input[0].type.tensor_type.shape.dim:
        d.dim_param = "n"


def input_type(m, rng):
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64


def retype_initializer(m, rng):
    inits = _float_inits(m)
    if inits:
        inits[int(rng.integers(len(inits)))].data_type = TensorProto.INT64


def drop_initializer(m, rng):
    if m.graph.initializer:
        del m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]


def opset_version(m, rng):
    m.opset_import[0].version = int(rng.choice([1, 6, 99]))


def ir_version(m, rng):
    m.ir_version = int(rng.choice([1, 2, 99]))


def rename_output(m, rng):
    m.graph.output[0].name = "never_produced"


def swap_inputs(m, rng):
    node = m.graph.node[int(rng.integers(len(m.graph.node)))]
    if len(node.input) > 1:
        node.input[0], node.input[1] = node.input[1], node.input[0]


MUTATIONS = [drop_node, dangling_input, duplicate_output, cycle, shuffle, truncate_raw, clear_data, wrong_dims,
             nan_weight, inf_weight_somewhere, bad_attribute, unknown_op, foreign_domain, input_rank, dynamic_input,
             input_type, retype_initializer, drop_initializer, opset_version, ir_version, rename_output, swap_inputs]


def mutated(model: onnx.ModelProto, case: int) -> tuple[str, bytes]:
    """(what was done, the serialized broken model) for case number `case`: one or two
    mutations, or damage to the bytes themselves (truncation, flipped bytes)."""
    rng = np.random.default_rng(case)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kind = int(rng.integers(10))
    if kind == 0:  # damage the file, not the graph
        data = bytearray(m.SerializeToString())
        if rng.integers(2):
            return "truncated file", bytes(data[: int(rng.integers(1, len(data)))])
        for i in rng.integers(0, len(data), size=8):
            data[int(i)] ^= 0xFF
        return "flipped bytes", bytes(data)
    chosen = [MUTATIONS[int(i)] for i in rng.choice(len(MUTATIONS), size=1 + int(kind > 6), replace=False)]
    for mutation in chosen:
        try:
            mutation(m, rng)
        except (ValueError, IndexError):  # a first mutation can leave nothing for a second one to work on
            pass
    return "+".join(f.__name__ for f in chosen), m.SerializeToString()
