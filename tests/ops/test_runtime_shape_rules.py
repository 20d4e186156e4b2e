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


def test_pads_computed_from_spatial_dims_keep_the_channels_prunable():
    # window padding: pad W up to a multiple of 4 at run time (pads of the channel axis are literal 0)
    m = text_model("""
    g (float[1,3,4,6] x) => (float[1,5,4,8] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      w = Gather(s, three)
      r = Mod(w, four)
      p = Sub(four, r)
      pads = Concat <axis=0> (zeros3, zero, zeros3, p)
      b = Pad(a, pads)
      y = Conv <kernel_shape=[1,1]> (b, Wo)
    }""", {**WEIGHTS, "three": np.array([3], I64), "four": np.array([4], I64), "zeros3": np.zeros(3, I64),
           "Wo": (5, 6, 1, 1)})
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [6]


def test_pads_of_the_channel_axis_computed_at_run_time_are_refused():
    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,5,4,4] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      c = Gather(s, one)
      r = Mod(c, four)
      pads = Concat <axis=0> (zero, r, zero, zero, zero, zero, zero, zero)
      b = Pad(a, pads)
      d = Slice(b, zero, six, one)
      y = Conv <kernel_shape=[1,1]> (d, Wo)
    }""", {**WEIGHTS, "one": np.array([1], I64), "four": np.array([4], I64), "six": np.array([6], I64),
           "Wo": (5, 6, 1, 1)})
    result = prune_planted(m, 0.5)
    assert result.plan.decisions == []
    assert any("pads the channel axis by an amount computed at run time" in r for r in skipped_reasons(result))


def test_slice_bounds_computed_from_spatial_dims_keep_the_channels_prunable():
    # crop the padded window back: a[:, :, :, :W-2] with W read at run time
    m = text_model("""
    g (float[1,3,4,6] x) => (float[1,5,4,4] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      w = Gather(s, three)
      e = Sub(w, two)
      b = Slice(a, zero, e, three)
      y = Conv <kernel_shape=[1,1]> (b, Wo)
    }""", {**WEIGHTS, "three": np.array([3], I64), "two": np.array([2], I64), "Wo": (5, 6, 1, 1)})
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [6]


def test_channel_count_cast_to_a_value_keeps_its_original_value():
    # y = a * (1 / C) with C = Shape(a)[1] as a float: the pruned model must still divide by 6
    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,5,4,4] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      s = Shape(a)
      c = Gather(s, one)
      f = Cast <to=1> (c)
      b = Div(a, f)
      y = Conv <kernel_shape=[1,1]> (b, Wo)
    }""", {**WEIGHTS, "one": np.array([1], I64), "Wo": (5, 6, 1, 1)})
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [6]


def test_pads_assembled_from_constants_by_the_legacy_exporter_are_folded():
    # F.pad(x, (1, 1)) exported by torch's legacy exporter: Concat, a reversing Slice and a
    # Transpose turn torch's (last axis first) padding into ONNX order, all on constants.
    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,5,4,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      z = ConstantOfShape <value = int64[1] {0}> (six)
      c = Concat <axis=0> (torch_pads, z)
      r = Reshape(c, pairs)
      s = Slice(r, minus1, very_negative, zero, minus1)
      t = Transpose <perm=[1,0]> (s)
      f = Reshape(t, minus1)
      p = Cast <to=7> (f)
      b = Pad(a, p)
      y = Conv <kernel_shape=[1,1]> (b, Wo)
    }""", {**WEIGHTS, "six": np.array([6], I64), "torch_pads": np.array([1, 1], I64),
           "pairs": np.array([-1, 2], I64), "very_negative": np.array([-(2**62)], I64), "Wo": (5, 6, 1, 1)})
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [6]
