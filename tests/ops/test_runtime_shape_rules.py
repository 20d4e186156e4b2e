"""Reshape targets computed at run time (Shape -> Gather/Slice -> Concat), as exporters write them."""
import numpy as np
import onnx
from planting import prune_planted
from textmodel import skipped_reasons, text_model

I64 = np.int64
WEIGHTS = {"W1": (6, 3, 1, 1), "W2": (96, 5), "zero": np.array([0], I64), "minus1": np.array([-1], I64)}


def test_view_batch_minus_one_with_dynamic_batch():
    # x.view(x.size(0), -1): the channels land on the -1 entry, which follows by itself.
    m = text_model("""
    g (float[N,3,4,4] x) => (float[N,5] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      n = Gather <axis=0> (s, zero)
      t = Concat <axis=0> (n, minus1)
      f = Reshape(a, t)
      y = MatMul(f, W2)
    }""", WEIGHTS)
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [6]


def test_literal_channel_count_in_a_concat_is_rewritten_at_its_source():
    m = text_model("""
    g (float[N,3,4,4] x) => (float[N,5] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      n = Slice(s, zero, one)
      t = Concat <axis=0> (n, width)
      f = Reshape(a, t)
      y = MatMul(f, W2)
    }""", {**WEIGHTS, "one": np.array([1], I64), "width": np.array([96], I64)})
    result = prune_planted(m, 0.5)
    width = next(i for i in result.model.graph.initializer if i.name.startswith("width"))
    assert list(np.frombuffer(width.raw_data, dtype=np.int64)) == [48]


def test_channel_dim_read_back_keeps_channels_in_place():
    # reshape [N,C,H,W] -> [N, C, H*W] with C read from Shape(a)[1]: the same channels.
    m = text_model("""
    g (float[N,3,4,4] x) => (float[N,4,16] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      nc = Slice(s, zero, two)
      t = Concat <axis=0> (nc, minus1)
      f = Reshape(a, t)
      r = Relu(f)
      u = Transpose <perm=[0,2,1]> (r)
      v = MatMul(u, Wc)
      y = Transpose <perm=[0,2,1]> (v)
    }""", {**WEIGHTS, "two": np.array([2], I64), "Wc": (6, 4)})
    prune_planted(m, 0.5)


def test_pruned_dim_read_into_another_axis_is_refused():
    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,16,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      c = Gather(s, one)
      t = Concat <axis=0> (head, minus1, c)
      y = Reshape(a, t)
    }""", {**WEIGHTS, "one": np.array([1], I64), "head": np.array([1], I64)})
    result = prune_planted(m, 0.5)
    assert result.plan.decisions == []
    assert any("split across" in r or "reads a dim" in r for r in skipped_reasons(result))


def test_target_shared_with_an_unpruned_reshape_gets_its_own_copy():
    # One Concat feeds two Reshapes; the pruned one is given its own Concat, so rewriting its
    # literal leaves the other Reshape's target as it was (prune_planted checks both outputs).
    m = text_model("""
    g (float[N,3,4,4] x, float[N,96] z) => (float[N,5] y, float[N,96] w) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      n = Slice(s, zero, one)
      t = Concat <axis=0> (n, width)
      f = Reshape(a, t)
      y = MatMul(f, W2)
      w = Reshape(z, t)
    }""", {**WEIGHTS, "one": np.array([1], I64), "width": np.array([96], I64)})
    result = prune_planted(m, 0.5)
    assert [len(d.removed) for d in result.plan.decisions] == [3]
    targets = [n.input[1] for n in result.model.graph.node if n.op_type == "Reshape"]
    concats = {n.output[0]: n for n in result.model.graph.node if n.op_type == "Concat"}
    values = {i.name: int(onnx.numpy_helper.to_array(i).reshape(-1)[0]) for i in result.model.graph.initializer}
    assert sorted(values[concats[t].input[1]] for t in targets) == [48, 96]  # each reshape its own width


def test_integer_shape_arithmetic_is_folded_so_heads_are_found():
    # torch's legacy export of buffer.expand(batch, -1) writes the shape as
    # Where(Equal(shape, -1), ones, shape); onnx's shape inference cannot read it, loses the
    # batch dim downstream, and the head reshape [1, S, -1, D] could not be mapped.
    m = text_model("""
    g (float[1,5,32] x) => (float[1,5,32] y) {
      ones = ConstantOfShape <value = int64[1] {1}> (two)
      neg = Mul(ones, m1)
      eq = Equal(target, neg)
      shp = Where(eq, ones, target)
      ids = Expand(buffer, shp)
      e = Gather(table, ids)
      x2 = Add(x, e)
      h = MatMul(x2, Wq)
      r = Reshape(h, split)
      t = Transpose <perm=[0,2,1,3]> (r)
      t2 = Transpose <perm=[0,2,1,3]> (t)
      c = Reshape(t2, merge)
      y = MatMul(c, Wo)
    }""", {"two": np.array([2], I64), "m1": np.array(-1, I64), "target": np.array([1, -1], I64),
           "buffer": np.zeros((1, 5), I64), "table": (2, 32), "Wq": (32, 32), "Wo": (32, 32),
           "split": np.array([1, 5, -1, 8], I64), "merge": np.array([1, 5, 32], I64)})
    result = prune_planted(m, 0.5, heads=True)
    assert [(d.group.kind, d.group.channels, len(d.removed)) for d in result.plan.decisions] == [("heads", 4, 2)]
