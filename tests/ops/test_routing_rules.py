"""Concat / Split / Slice offsets, pooling, Pad, Resize, Squeeze/Unsqueeze, Expand."""
import numpy as np
from planting import prune_planted
from textmodel import text_model

I64 = np.int64


def test_concat_of_two_convs_feeds_one_consumer_with_offsets():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      b = Conv <kernel_shape=[1,1]> (x, Wb)
      c = Concat <axis=1> (a, b)
      y = Conv <kernel_shape=[1,1]> (c, W2)
    }""", {"Wa": (4, 3, 1, 1), "Wb": (6, 3, 1, 1), "W2": (4, 10, 1, 1)})
    result = prune_planted(m, 0.5)
    assert sorted(d.group.channels for d in result.plan.decisions) == [4, 6]


def test_concat_with_graph_input_keeps_its_part():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      c = Concat <axis=1> (x, a)
      y = Conv <kernel_shape=[1,1]> (c, W2)
    }""", {"Wa": (6, 3, 1, 1), "W2": (4, 9, 1, 1)})
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [6]


def test_split_sizes_are_rewritten_opset13_input():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      p, q = Split <axis=1> (a, sizes)
      r = Relu(p)
      c = Concat <axis=1> (q, r)
      y = Conv <kernel_shape=[1,1]> (c, W2)
    }""", {"Wa": (10, 3, 1, 1), "sizes": np.array([4, 6], I64), "W2": (4, 10, 1, 1)})
    prune_planted(m, 0.5)


def test_split_equal_parts_opset18_num_outputs():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      p, q = Split <axis=1, num_outputs=2> (a)
      s = Add(p, q)
      y = Conv <kernel_shape=[1,1]> (s, W2)
    }""", {"Wa": (8, 3, 1, 1), "W2": (4, 4, 1, 1)}, opset=18)
    result = prune_planted(m, 0.5)
    # the two halves are added, so their channels are coupled: one group of 4
    assert [d.group.channels for d in result.plan.decisions] == [4]


def test_split_attribute_in_old_opset():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      p, q = Split <axis=1, split=[2,6]> (a)
      y = Conv <kernel_shape=[1,1]> (q, W2)
    }""", {"Wa": (8, 3, 1, 1), "W2": (4, 6, 1, 1)}, opset=11, ir_version=6)
    prune_planted(m, 0.5)


def test_slice_bounds_on_channel_axis_are_rewritten():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      s = Slice(a, st, en, ax)
      y = Conv <kernel_shape=[1,1]> (s, W2)
    }""", {"Wa": (10, 3, 1, 1), "st": np.array([2], I64), "en": np.array([8], I64),
           "ax": np.array([1], I64), "W2": (4, 6, 1, 1)})
    prune_planted(m, 0.5)


def test_pool_pad_resize_unsqueeze_squeeze_expand():
    m = text_model("""
    g (float[1,3,8,8] x) => (float[1,4,10,10] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (a)
      q = Pad(p, pads)
      r = Resize <mode="nearest"> (q, roi, scales)
      v = AveragePool <kernel_shape=[3,3], strides=[1,1]> (r)
      u = Unsqueeze(v, ax0)
      w = Squeeze(u, ax0)
      e = Expand(w, shape)
      y = Conv <kernel_shape=[1,1]> (e, W2)
    }""", {"Wa": (8, 3, 1, 1), "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64),
           "roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32),
           "ax0": np.array([0], I64), "shape": np.array([1, 8, 10, 10], I64), "W2": (4, 8, 1, 1)})
    prune_planted(m, 0.5)


def test_resize_with_explicit_sizes_is_rewritten():
    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,4,8,8] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      r = Resize <mode="nearest"> (a, roi, no_scales, sizes)
      y = Conv <kernel_shape=[1,1]> (r, W2)
    }""", {"Wa": (8, 3, 1, 1), "roi": np.zeros(0, np.float32), "no_scales": np.zeros(0, np.float32),
           "sizes": np.array([1, 8, 8, 8], I64), "W2": (4, 8, 1, 1)})
    prune_planted(m, 0.5)


def test_reduce_over_spatial_axes_keeps_channels():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      r = ReduceMean <keepdims=0> (a, axes)
      y = MatMul(r, W2)
    }""", {"Wa": (8, 3, 1, 1), "axes": np.array([2, 3], I64), "W2": (8, 4)}, opset=18)
    prune_planted(m, 0.5)


def test_channel_shuffle_keeps_the_same_index_in_every_group():
    # ShuffleNet: grouped conv -> reshape [N, g, C/g, H, W] -> transpose -> reshape back.
    m = text_model("""
    g (float[1,4,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1], group=2> (x, Wg)
      r = Relu(a)
      s = Reshape(r, split)
      t = Transpose <perm=[0,2,1,3,4]> (s)
      u = Reshape(t, merge)
      y = Conv <kernel_shape=[1,1]> (u, W2)
    }""", {"Wg": (12, 2, 1, 1), "split": np.array([1, 2, 6, 6, 6], I64),
           "merge": np.array([1, 12, 6, 6], I64), "W2": (4, 12, 1, 1)})
    result = prune_planted(m, 0.5)
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(6, 3)]
    split = next(i for i in result.model.graph.initializer if i.name.startswith("split"))
    merge = next(i for i in result.model.graph.initializer if i.name.startswith("merge"))
    assert list(np.frombuffer(split.raw_data, np.int64)) == [1, 2, 3, 6, 6]
    assert list(np.frombuffer(merge.raw_data, np.int64)) == [1, 6, 6, 6]


def test_slice_bounds_keep_their_int32_dtype():
    m = text_model("""
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      a = Conv <kernel_shape=[1,1]> (x, Wa)
      s = Slice(a, st, en, ax)
      y = Conv <kernel_shape=[1,1]> (s, W2)
    }""", {"Wa": (10, 3, 1, 1), "st": np.array([0, 2], np.int32), "en": np.array([1, 8], np.int32),
           "ax": np.array([0, 1], np.int32), "W2": (4, 6, 1, 1)})
    result = prune_planted(m, 0.5)
    assert result.report["rolled_back"] == []
