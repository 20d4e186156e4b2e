"""Calibration data: reading .npz/.npy/images, validation errors, and streamed statistics
checked against numpy on the concatenated activations."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_model
from textmodel import text_model

from onnxprune import OnnxPruneError
from onnxprune import calibration as cal
from onnxprune.calibration import (ImageSpec, calibration_feeds, collect_channel_stats, collect_gram,
                                   collect_grams, load_calibration)

ROOT = Path(__file__).resolve().parent.parent
RESNET = ROOT / "fixtures" / "tiny_resnet.onnx"  # input float[1,3,32,32]

MLP = """
g (float[N,S,4] x) => (float[N,S,3] y) {
  h = MatMul(x, W)
  a = Add(h, b)
  r = Relu(a)
  y = MatMul(r, V)
}
"""

CONV = """
g (float[N,3,6,6] x) => (float[N,5] y) {
  c = Conv <pads = [1, 1, 1, 1]> (x, W)
  r = Relu(c)
  p = GlobalAveragePool(r)
  y = Flatten(p)
}
"""

TOKENS = """
g (int64[B,S] ids, float[B,S] mask) => (float[B,S,4] y) {
  e = Gather(E, ids)
  m = Unsqueeze(mask, axes)
  y = Mul(e, m)
}
"""

NHWC = """
g (float[N,8,8,3] x) => (float[N,3] y) {
  y = ReduceMean <axes = [1, 2], keepdims = 0> (x)
}
"""

FIXED_TWO = """
g (float[2,3] x) => (float[2,3] y) {
  y = Relu(x)
}
"""


@pytest.fixture(scope="module")
def mlp():
    return text_model(MLP, {"W": (4, 6), "b": (6,), "V": (6, 3)})


@pytest.fixture(scope="module")
def conv():
    return text_model(CONV, {"W": (5, 3, 3, 3)})


@pytest.fixture(scope="module")
def tokens():
    return text_model(TOKENS, {"E": (100, 4), "axes": np.array([-1], np.int64)})


@pytest.fixture(scope="module")
def resnet():
    return onnx.load(str(RESNET))


def weight(model, name):
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def mlp_batches(seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 5, 4)).astype(np.float32)} for n in (2, 3, 1)]


def mlp_reference(model, batches):
    """Activations of the MLP computed by numpy, concatenated over the batches (channels last)."""
    x = np.concatenate([b["x"] for b in batches]).reshape(-1, 4)
    a = x @ weight(model, "W") + weight(model, "b")
    return {"x": x, "a": a, "r": np.maximum(a, 0)}


def conv_reference(model, x, relu=True):
    """Conv (3x3, pad 1), then Relu, in numpy: [N, O, H, W]."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,C,H,W,3,3
    c = np.einsum("nchwij,ocij->nohw", windows, weight(model, "W"))
    return np.maximum(c, 0) if relu else c


def one_line_error(call, *needles):
    with pytest.raises(OnnxPruneError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


class CountingFeeds:
    """A re-iterable list of feeds that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


# ---------------------------------------------------------------------------------------------
# Reading files


def test_stacked_npz_is_cut_into_batches_of_the_batch_size(tmp_path, mlp):
    x = np.arange(10 * 5 * 4, dtype=np.float32).reshape(10, 5, 4)
    np.savez(tmp_path / "calib.npz", x=x)
    feeds = list(load_calibration(tmp_path / "calib.npz", mlp, batch_size=4))
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)


def test_limit_counts_samples_and_cuts_the_last_batch(tmp_path, mlp):
    np.savez(tmp_path / "calib.npz", x=np.ones((10, 5, 4), np.float32))
    feeds = list(load_calibration(tmp_path / "calib.npz", mlp, batch_size=4, limit=6))
    assert [f["x"].shape[0] for f in feeds] == [4, 2]


def test_spread_takes_batches_from_all_of_the_data(mlp):
    batches = [{"x": np.full((1, 5, 4), i, np.float32)} for i in range(10)]
    firsts = lambda data: [int(f["x"][0, 0, 0]) for f in data]  # noqa: E731
    assert firsts(calibration_feeds(batches, mlp).spread(4)) == [0, 3, 6, 9]
    assert firsts(calibration_feeds(batches, mlp, limit=6).spread(4)) == [0, 2, 4]
    assert firsts(calibration_feeds(batches, mlp).spread(20)) == list(range(10))
    (one,) = calibration_feeds([{"x": np.zeros((10, 5, 4), np.float32)}], mlp).spread(4)
    assert one["x"].shape[0] == 4
    assert len(list(calibration_feeds(iter(batches), mlp).spread(4))) == 4  # one-shot: only cut


def test_fixed_batch_one_takes_stacked_or_per_entry_arrays(tmp_path, resnet):
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "stacked.npz", input=x)
    np.savez(tmp_path / "entries.npz", input=x[:, None])
    for name in ("stacked.npz", "entries.npz"):
        feeds = list(load_calibration(tmp_path / name, resnet))
        assert [f["input"].shape for f in feeds] == [(1, 3, 32, 32)] * 4
        np.testing.assert_array_equal(np.concatenate([f["input"] for f in feeds]), x)
    assert len(list(load_calibration(tmp_path / "stacked.npz", resnet, limit=2))) == 2


def test_npy_file_and_single_unnamed_npz_array(tmp_path, mlp):
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "unnamed.npz", x)  # stored as arr_0
    for name in ("x.npy", "unnamed.npz"):
        feeds = list(load_calibration(tmp_path / name, mlp, batch_size=2))
        np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)


def test_folder_reads_array_files_in_name_order(tmp_path, mlp):
    parts = [np.full((2, 5, 4), i, np.float32) for i in range(3)]
    for i, name in enumerate(["b.npz", "c.npy", "a.npz"]):
        (np.save if name.endswith(".npy") else lambda p, v: np.savez(p, x=v))(tmp_path / name, parts[i])
    (tmp_path / "README.txt").write_text("ignored")
    data = load_calibration(tmp_path, mlp)
    assert [float(f["x"][0, 0, 0]) for f in data] == [2.0, 0.0, 1.0]  # a.npz, b.npz, c.npy
    assert [float(f["x"][0, 0, 0]) for f in data] == [2.0, 0.0, 1.0]  # and again: re-iterable


def test_lossless_casts(tmp_path, tokens):
    ids = np.random.default_rng(2).integers(0, 100, (3, 7)).astype(np.int32)
    np.savez(tmp_path / "tok.npz", ids=ids, mask=np.ones((3, 7)), extra=np.zeros(2))
    (feed,) = load_calibration(tmp_path / "tok.npz", tokens)
    assert feed["ids"].dtype == np.int64 and feed["mask"].dtype == np.float32
    np.testing.assert_array_equal(feed["ids"], ids)
    # Float ids that are whole numbers convert; a 0/1 float mask for an int input would too.
    (feed,) = calibration_feeds([{"ids": ids.astype(np.float64), "mask": np.ones((3, 7), np.float16)}], tokens)
    assert feed["ids"].dtype == np.int64 and feed["mask"].dtype == np.float32


def test_validation_errors_name_the_input_and_file(tmp_path, tokens, resnet):
    ids, mask = np.zeros((3, 7), np.int64), np.ones((3, 7), np.float32)
    cases = {
        "missing.npz": ({"ids": ids}, tokens, ["'mask'", "missing.npz"]),
        "lossy.npz": ({"ids": ids + 0.5, "mask": mask}, tokens, ["'ids'", "lossy.npz", "int64"]),
        "rank.npz": ({"ids": ids[0], "mask": mask}, tokens, ["'ids'", "rank.npz", "[7]"]),
        "symbols.npz": ({"ids": ids, "mask": np.ones((3, 8), np.float32)}, tokens,
                        ["'ids'", "'mask'", "'S'", "symbols.npz"]),
        "count.npz": ({"ids": ids, "mask": mask[:2]}, tokens, ["count.npz", "'mask': 2"]),
        "static.npz": ({"input": np.zeros((2, 3, 16, 16), np.float32)}, resnet,
                       ["'input'", "static.npz", "axis 2"]),
        "overflow.npz": ({"input": np.full((1, 3, 32, 32), 1e300)}, resnet, ["'input'", "overflow.npz"]),
    }
    for name, (arrays, model, needles) in cases.items():
        np.savez(tmp_path / name, **arrays)
        one_line_error(lambda: list(load_calibration(tmp_path / name, model)), *needles)


def test_file_and_folder_errors(tmp_path, tokens, mlp):
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load_calibration(tmp_path / "empty", mlp), "empty", "no .npz")
    one_line_error(lambda: load_calibration(tmp_path / "nowhere.npz", mlp), "nowhere.npz", "no such")
    (tmp_path / "broken.npz").write_bytes(b"not a zip at all")
    one_line_error(lambda: list(load_calibration(tmp_path / "broken.npz", mlp)), "broken.npz", "not a readable")
    (tmp_path / "notes.txt").write_text("x")
    one_line_error(lambda: load_calibration(tmp_path / "notes.txt", mlp), "notes.txt")
    np.save(tmp_path / "ids.npy", np.zeros((2, 7), np.int64))
    one_line_error(lambda: list(load_calibration(tmp_path / "ids.npy", tokens)), "ids.npy", "'mask'")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((1, 5, 4), np.float32))
    (mixed / "b.png").write_bytes(b"")
    one_line_error(lambda: load_calibration(mixed, mlp), "mixed", "a.npy", "b.png")
    fixed_two = text_model(FIXED_TWO, {})
    np.save(tmp_path / "three.npy", np.zeros((3, 3), np.float32))
    one_line_error(lambda: list(load_calibration(tmp_path / "three.npy", fixed_two)), "three.npy", "'x'", "batch of 2")


def test_iterator_api(mlp):
    batches = mlp_batches()
    one_shot = calibration_feeds(iter(batches), mlp)
    assert [f["x"].shape for f in one_shot] == [b["x"].shape for b in batches]
    one_line_error(lambda: list(one_shot), "one-shot")
    factory = calibration_feeds(lambda: iter(batches), mlp, limit=3)
    assert [f["x"].shape[0] for f in factory] == [2, 1]
    assert [f["x"].shape[0] for f in factory] == [2, 1]
    assert [f["x"].shape[0] for f in calibration_feeds(factory, mlp, limit=5)] == [2, 3]
    assert len(list(calibration_feeds(batches[0], mlp))) == 1  # a single dict is one batch
    one_line_error(lambda: list(calibration_feeds([batches[0], {"y": 1}], mlp)), "calibration batch 2", "'x'")
    one_line_error(lambda: list(calibration_feeds([[1, 2]], mlp)), "calibration batch 1", "dict")
    one_line_error(lambda: list(calibration_feeds([], mlp)), "no calibration batches")


# ---------------------------------------------------------------------------------------------
# Images


def write_image(path, pixels):
    from PIL import Image

    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)


def solid(height, width, rgb):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (height, width, 3))


def test_image_spec_parsing():
    spec = ImageSpec.parse("size=224x200, resize=256,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,"
                           "layout=nhwc,scale=1/255,channels=3,order=bgr")
    assert spec == ImageSpec(size=(224, 200), resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                             layout="NHWC", scale=1 / 255, channels=3, order="BGR")
    assert ImageSpec.parse(str(spec)) == ImageSpec.parse(str(ImageSpec.parse(str(spec))))
    assert ImageSpec.parse("size=32").size == (32, 32)
    for bad, needle in [("size=0x3", "size"), ("colour=red", "colour"), ("layout=CHW", "NCHW"),
                        ("std=0.2/0", "positive"), ("channels=4", "channels"), ("scale=1/0", "scale"), ("mean", "KEY")]:
        one_line_error(lambda: ImageSpec.parse(bad), needle)


def test_image_folder_is_normalised_in_the_models_layout(tmp_path, resnet):
    pytest.importorskip("PIL")
    colours = [(255, 0, 51), (0, 102, 255), (10, 20, 30)]
    for i, rgb in enumerate(colours):
        write_image(tmp_path / f"img{i}.png", solid(40, 36, rgb))  # resized to the model's 32x32
    spec = "mean=0.5/0.5/0.5,std=0.25/0.5/1"
    feeds = list(load_calibration(tmp_path, resnet, image_spec=spec))
    assert [f["input"].shape for f in feeds] == [(1, 3, 32, 32)] * 3
    for feed, rgb in zip(feeds, colours):
        expected = (np.array(rgb) / 255 - 0.5) / np.array([0.25, 0.5, 1])
        np.testing.assert_allclose(feed["input"][0], np.broadcast_to(expected[:, None, None], (3, 32, 32)), atol=1e-6)
    bgr = next(iter(load_calibration(tmp_path, resnet, image_spec=spec + ",order=BGR,scale=1")))["input"]
    np.testing.assert_allclose(bgr[0, :, 0, 0], (np.array(colours[0][::-1]) - 0.5) / np.array([0.25, 0.5, 1]))


def test_image_nhwc_greyscale_crop_and_batching(tmp_path):
    pytest.importorskip("PIL")
    thirds = np.concatenate([solid(8, 8, (255, 0, 0)), solid(8, 8, (0, 255, 0)), solid(8, 8, (0, 0, 255))], axis=1)
    for i in range(3):
        write_image(tmp_path / f"{i}.bmp", thirds)
    model = text_model(NHWC, {})
    feeds = list(load_calibration(tmp_path, model, image_spec="size=8,resize=8,scale=1", batch_size=2))
    assert [f["x"].shape for f in feeds] == [(2, 8, 8, 3), (1, 8, 8, 3)]
    # The centre crop of the resized image is the green third only.
    np.testing.assert_array_equal(feeds[0]["x"][0], np.broadcast_to([0, 255, 0], (8, 8, 3)))
    stretched = next(iter(load_calibration(tmp_path, model, image_spec="size=8,scale=1")))["x"][0]
    assert stretched[0, 0, 0] > 200 and stretched[0, -1, 2] > 200  # red on the left, blue on the right
    grey_model = text_model(NHWC.replace("8,3]", "8,1]").replace("float[N,3] y", "float[N,1] y"), {})
    grey = next(iter(load_calibration(tmp_path, grey_model, image_spec="size=8,resize=8,scale=1")))["x"]
    assert grey.shape == (3, 8, 8, 1)  # default batch size 8: all three images
    np.testing.assert_allclose(grey, round(0.587 * 255), atol=1)


def test_image_errors(tmp_path, resnet, tokens):
    pytest.importorskip("PIL")
    write_image(tmp_path / "ok.png", solid(32, 32, (1, 2, 3)))
    one_line_error(lambda: load_calibration(tmp_path, resnet), str(tmp_path), "spec")
    one_line_error(lambda: load_calibration(tmp_path, tokens, image_spec="size=8"), "'ids'", "'mask'")
    one_line_error(lambda: load_calibration(tmp_path, resnet, image_spec="channels=1"), "'input'", "3 channels")
    one_line_error(lambda: load_calibration(tmp_path, resnet, image_spec="mean=1/2"), "'input'", "mean")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    one_line_error(lambda: list(load_calibration(tmp_path, resnet, image_spec="scale=1")), "broken.jpg", "cannot read")


def test_fixed_batch_drops_leftover_images_with_a_note(tmp_path):
    pytest.importorskip("PIL")
    for i in range(5):
        write_image(tmp_path / f"{i}.png", solid(8, 8, (i, i, i)))
    model = text_model(NHWC.replace("float[N,8,8,3] x", "float[2,8,8,3] x").replace("float[N,3]", "float[2,3]"), {})
    data = load_calibration(tmp_path, model, image_spec="scale=1")
    assert [float(f["x"][1, 0, 0, 0]) for f in data] == [1.0, 3.0]
    assert data.notes and "1 of 5" in data.notes[0]


def test_scikit_image_backend_reads_the_same_pixels(tmp_path, resnet, monkeypatch):
    pytest.importorskip("PIL")
    pytest.importorskip("skimage")
    write_image(tmp_path / "a.png", solid(40, 36, (200, 100, 50)))
    spec = "mean=0.5,std=0.25"
    with_pil = next(iter(load_calibration(tmp_path, resnet, image_spec=spec)))["input"]
    monkeypatch.setattr(cal.images, "_image_backend", lambda: "skimage")
    with_skimage = next(iter(load_calibration(tmp_path, resnet, image_spec=spec)))["input"]
    np.testing.assert_allclose(with_skimage, with_pil, atol=1e-6)
    grey = cal.images._load_pixels(tmp_path / "a.png", 1)
    assert grey.shape == (40, 36, 1) and int(grey[0, 0, 0]) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)


# ---------------------------------------------------------------------------------------------
# Statistics


def assert_stats(stats, values):
    """`stats` against numpy on `values` ([positions, channels], all batches concatenated)."""
    values = values.astype(np.float64)
    assert stats.count == values.shape[0]
    np.testing.assert_allclose(stats.mean, values.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.mean_abs, np.abs(values).mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.rms, np.sqrt((values ** 2).mean(0)), rtol=1e-5)
    np.testing.assert_allclose(stats.l2_norm, np.linalg.norm(values, axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.variance, values.var(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(stats.zeros, (values == 0).sum(0))
    np.testing.assert_allclose(stats.apoz, (values == 0).mean(0))


def test_channel_stats_match_numpy(mlp):
    batches = mlp_batches()
    ref = mlp_reference(mlp, batches)
    stats = collect_channel_stats(mlp, batches, {"a": -1, "r": 2, "x": 2, "W": 1})
    for name in ("a", "r", "x"):
        assert_stats(stats[name], ref[name])
    assert 0 < stats["r"].apoz.mean() < 1  # Relu zeros were counted, not all of them
    assert_stats(stats["W"], np.concatenate([weight(mlp, "W")] * len(batches)))  # seen once per batch
    assert [o.name for o in mlp.graph.output] == ["y"]  # the model is left as it was


def test_conv_stats_reduce_all_axes_but_the_channel_axis(conv, monkeypatch):
    x = np.random.default_rng(3).standard_normal((5, 3, 6, 6)).astype(np.float32)
    batches = [{"x": x[:2]}, {"x": x[2:]}]
    r = conv_reference(conv, x)
    monkeypatch.setattr(cal.stats, "_MAX_PIECE_ELEMENTS", 400)  # pieces of 2 or 3 samples: several per batch
    stats = collect_channel_stats(conv, batches, {"r": 1, "c": 1, "x": 1})
    assert_stats(stats["r"], np.moveaxis(r, 1, -1).reshape(-1, 5))
    assert_stats(stats["x"], np.moveaxis(x, 1, -1).reshape(-1, 3))
    assert stats["r"].count == 5 * 6 * 6
    assert_stats(stats["c"], np.moveaxis(conv_reference(conv, x, relu=False), 1, -1).reshape(-1, 5))


def test_channel_rows_come_in_bounded_pieces(monkeypatch):
    monkeypatch.setattr(cal.stats, "_MAX_PIECE_ELEMENTS", 50)
    values = np.arange(5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6)
    for axis in (0, 1, 2, -1):
        pieces = list(cal.stats._channel_rows(values, axis, "t"))
        expected = np.moveaxis(values, axis, -1).reshape(-1, values.shape[axis])
        np.testing.assert_array_equal(np.concatenate(pieces), expected)
        assert all(p.dtype == np.float64 for p in pieces)
        if axis % 3:
            assert len(pieces) == 3 and max(p.size for p in pieces) <= 50


def test_chunking_gives_the_same_stats_with_more_passes(mlp):
    names = {"h": 2, "a": 2, "r": 2, "W": 0}
    whole_feeds, chunked_feeds = CountingFeeds(mlp_batches()), CountingFeeds(mlp_batches())
    whole = collect_channel_stats(mlp, whole_feeds, names)
    chunked = collect_channel_stats(mlp, chunked_feeds, names, budget_bytes=1)
    assert chunked_feeds.reads - whole_feeds.reads == len(names) - 1  # one pass per tensor instead of one
    for name in names:
        for field in ("count", "sum", "sum_abs", "sum_sq", "zeros"):
            np.testing.assert_allclose(getattr(chunked[name], field), getattr(whole[name], field), rtol=1e-6)


def test_chunks_follow_the_byte_budget(mlp):
    first = mlp_batches()[0]  # x is [2, 5, 4]: h, a and r are [2, 5, 6] float32 = 240 bytes each
    _, sizes = cal.probe._tensor_sizes(mlp, first, ["h", "a", "r", "W"])
    assert sizes == {"h": 240, "a": 240, "r": 240, "W": 96}
    assert cal.probe._chunks(["h", "a", "r", "W"], sizes, 500) == [["h", "a"], ["r", "W"]]


def test_one_shot_iterator_works_for_one_pass_and_refuses_several(mlp):
    ref = mlp_reference(mlp, mlp_batches())
    stats = collect_channel_stats(mlp, iter(mlp_batches()), {"r": 2})
    assert_stats(stats["r"], ref["r"])
    one_line_error(lambda: collect_channel_stats(mlp, iter(mlp_batches()), {"a": 2, "r": 2}, budget_bytes=1),
                   "one-shot", "2 passes")


def test_probing_runs_only_what_the_tensors_need_and_leaves_the_model_equal(mlp, monkeypatch):
    assert cal.probe._nodes_needed(mlp.graph, ["a"]) == [0, 1]
    assert cal.probe._nodes_needed(mlp.graph, ["y"]) is None  # everything: nothing to set aside
    before = mlp.SerializeToString()
    seen = []
    import onnxprune.core.verify as verify
    session = verify.session
    monkeypatch.setattr(verify, "session", lambda model, *a: seen.append([n.op_type for n in model.graph.node])
                        or session(model, *a))
    stats = collect_channel_stats(mlp, mlp_batches(), {"a": 2})
    assert seen == [["MatMul", "Add"]] and mlp.SerializeToString() == before
    assert_stats(stats["a"], mlp_reference(mlp, mlp_batches())["a"])


def test_gram_matches_numpy(conv):
    x = np.random.default_rng(4).standard_normal((4, 3, 6, 6)).astype(np.float32)
    batches = [{"x": x[:3]}, {"x": x[3:]}]
    rows = np.moveaxis(conv_reference(conv, x), 1, -1).reshape(-1, 5).astype(np.float64)
    gram, mean, count = collect_gram(conv, batches, "r", 1)
    assert count == rows.shape[0] and gram.shape == (5, 5)
    np.testing.assert_allclose(gram, rows.T @ rows, rtol=1e-5)
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-5)
    grams = collect_grams(conv, batches, {"r": 1, "x": -3, "c": 1}, budget_bytes=1)
    np.testing.assert_allclose(grams["r"].gram, gram, rtol=1e-9)
    x_rows = np.moveaxis(x, 1, -1).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(grams["x"].gram, x_rows.T @ x_rows, rtol=1e-9)
    np.testing.assert_allclose(grams["x"].covariance, np.cov(x_rows, rowvar=False, bias=True), atol=1e-9)


def test_patch_gram_matches_an_explicit_im2col():
    x = np.random.default_rng(6).standard_normal((2, 3, 7, 6))
    kernel, strides, pads, dilations = (3, 2), (2, 1), (1, 0, 1, 1), (1, 2)
    padded = np.pad(x, [(0, 0), (0, 0), (1, 1), (0, 1)])
    rows = []
    for n in range(2):
        for i in range(0, padded.shape[2] - 2 * 1 - 1 + 1, 2):
            for j in range(0, padded.shape[3] - 1 * 2 - 1 + 1, 1):
                rows.append(padded[n, :, i:i + 3:1, j:j + 3:2].reshape(-1))  # channel-major, then taps
    rows = np.array(rows)
    stats = cal.PatchGramStats(kernel, strides, pads, dilations, positions_per_sample=10_000)
    stats.add(x[:1])
    stats.add(x[1:])
    assert stats.count == len(rows)
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-12)
    sampled = cal.PatchGramStats(kernel, strides, pads, dilations, positions_per_sample=5)
    sampled.add(x)
    assert sampled.count == 10
    # Each sampled row is one of the patches: the Gram is a sum of 10 of their outer products.
    assert np.linalg.matrix_rank(sampled.gram) <= 10 and np.trace(sampled.gram) > 0


def test_paired_stats_give_the_least_squares_affine_map_per_channel():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((5, 4, 3, 3))
    b = np.take(a, [0, 2, 3], axis=1) * np.array([2.0, -1.0, 0.5])[None, :, None, None] + 0.3
    b = b + 0.1 * rng.standard_normal(b.shape)
    b[:, 2] = 1.0  # constant: no information, gain 1 by convention
    stats = cal.PairedStats(1, "t", np.array([0, 2, 3]))
    stats.add(a[:2], b[:2])
    stats.add(a[2:], b[2:])
    gain, offset = stats.affine()
    for c, source in enumerate([0, 2]):
        want = np.polyfit(b[:, c].reshape(-1), a[:, source].reshape(-1), 1)
        np.testing.assert_allclose([gain[c], offset[c]], want, rtol=1e-9)
    assert gain[2] == 1.0 and offset[2] == pytest.approx(a[:, 3].mean() - 1.0)
    one_line_error(lambda: stats.add(a, b[:, :2]), "tensor 't'", "shape")


def test_stats_on_the_resnet_fixture_from_an_npz(tmp_path, resnet):
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    names = [node.output[0] for node in resnet.graph.node if node.op_type in ("Relu", "Add")][:4]
    stats = collect_channel_stats(resnet, load_calibration(tmp_path / "calib.npz", resnet),
                                  {name: 1 for name in names}, budget_bytes=70_000)
    # Reference: the same tensors as plain outputs of a copy, run sample by sample.
    probe = onnx.ModelProto()
    probe.CopyFrom(resnet)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    outputs = [run_model(probe, {"input": x[i:i + 1]}) for i in range(3)]
    for k, name in enumerate(names):
        values = np.concatenate([np.moveaxis(out[k], 1, -1).reshape(-1, out[k].shape[1]) for out in outputs])
        assert_stats(stats[name], values)


def test_stats_errors(mlp):
    batches = mlp_batches()
    one_line_error(lambda: collect_channel_stats(mlp, batches, {"nope": 1}), "'nope'", "not in the model")
    one_line_error(lambda: collect_channel_stats(mlp, batches, {"r": 3}), "'r'", "axis 3")
    varying = [{"x": np.ones((1, 5, 4), np.float32)}, {"x": np.ones((1, 6, 4), np.float32)}]
    one_line_error(lambda: collect_channel_stats(mlp, varying, {"r": 1}), "'r'", "6 channels", "5")
    assert collect_channel_stats(mlp, batches, {}) == {}
