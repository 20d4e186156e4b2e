"""Conv, depthwise/grouped Conv and ConvTranspose rules."""
from planting import prune_planted
from textmodel import text_model


def test_conv_chain_prunes_hidden_channels_and_keeps_io():
    m = text_model("""
    g (float[1,3,8,8] x) => (float[1,5,8,8] y) {
      a = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, W1, B1)
      r = Relu(a)
      y = Conv <kernel_shape=[1,1]> (r, W2, B2)
    }""", {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (5, 8, 1, 1), "B2": (5,)})
    result = prune_planted(m, 0.5)
    assert [(d.group.channels, len(d.removed)) for d in result.plan.decisions] == [(8, 4)]
    assert result.report["params"]["after"] < result.report["params"]["before"]


def test_depthwise_conv_prunes_whole_groups_and_rewrites_group():
    m = text_model("""
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      d = Conv <group=6, pads=[1,1,1,1], kernel_shape=[3,3]> (a, Wd, Bd)
      y = Conv <kernel_shape=[1,1]> (d, W2)
    }""", {"W1": (6, 3, 1, 1), "Wd": (6, 1, 3, 3), "Bd": (6,), "W2": (4, 6, 1, 1)})
    result = prune_planted(m, 0.5)
    dw = next(n for n in result.model.graph.node if n.op_type == "Conv" and n.input[1].startswith("Wd"))
    assert next(a.i for a in dw.attribute if a.name == "group") == 3


def test_depthwise_with_channel_multiplier():
    m = text_model("""
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      d = Conv <group=4, pads=[1,1,1,1], kernel_shape=[3,3]> (a, Wd)
      y = Conv <kernel_shape=[1,1]> (d, W2)
    }""", {"W1": (4, 3, 1, 1), "Wd": (8, 1, 3, 3), "W2": (4, 8, 1, 1)})
    result = prune_planted(m, 0.5)
    assert [d.group.channels for d in result.plan.decisions] == [4]


def test_grouped_conv_keeps_groups_consistent():
    m = text_model("""
    g (float[1,3,8,8] x) => (float[1,4,8,8] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      b = Conv <group=2, pads=[1,1,1,1], kernel_shape=[3,3]> (a, Wg)
      y = Conv <kernel_shape=[1,1]> (b, W2)
    }""", {"W1": (8, 3, 1, 1), "Wg": (8, 4, 3, 3), "W2": (4, 8, 1, 1)})
    result = prune_planted(m, 0.5)
    # in-group input index (4 channels, shared by both groups of the producer) and
    # in-group output index (4 channels, shared by both groups of the grouped conv)
    assert sorted(d.group.channels for d in result.plan.decisions) == [4, 4]
    grouped = next(n for n in result.model.graph.node if "Wg" in n.input[1])
    assert next(a.i for a in grouped.attribute if a.name == "group") == 2


def test_conv_transpose_in_and_out_channels():
    m = text_model("""
    g (float[1,3,4,4] x) => (float[1,2,8,8] y) {
      a = Conv <kernel_shape=[1,1]> (x, W1)
      t = ConvTranspose <strides=[2,2], kernel_shape=[2,2]> (a, Wt, Bt)
      y = Conv <kernel_shape=[1,1]> (t, W2)
    }""", {"W1": (6, 3, 1, 1), "Wt": (6, 4, 2, 2), "Bt": (4,), "W2": (2, 4, 1, 1)})
    result = prune_planted(m, 0.5)
    assert sorted((d.group.channels, len(d.removed)) for d in result.plan.decisions) == [(4, 2), (6, 3)]
