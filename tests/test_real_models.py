"""Real graphs nobody here wrote, pruned at 0.3: valid, smaller, and honest about what was skipped.

These models are trained (or, for the model-zoo graphs, have the real structure with
generated weights), so outputs change when channels go; what is pinned here is that the
result is a valid, loadable, smaller model, that the report accounts for every group,
and that planting dead channels into them still gives back exactly the original function.
"""
import pytest

from real_models import CNN_MODELS, MODELS, ZOO_MODELS, fetch, fetch_zoo
from onnxprune import load_model, prune
from planting import prune_planted

pytestmark = pytest.mark.slow

# Lower bounds on prunable groups, to notice a regression that quietly stops pruning.
MIN_PRUNED_GROUPS = {
    "rapidocr_det_ppocrv4_mobile.onnx": 30, "rapidocr_cls_ppocr_mobile_v2.onnx": 20,
    "rapidocr_rec_ppocrv4_svtr_lcnet.onnx": 15, "nudenet_yolov8n_320.onnx": 50, "mtcnn_onet.onnx": 4,
    "magika_standard_v3_3.onnx": 1, "paraphrase_minilm_l3_v2_bert.onnx": 3, "silero_vad_16k_sequence_lstm.onnx": 3,
    "light_resnet50.onnx": 35, "light_densenet121.onnx": 100, "light_inception_v1.onnx": 50,
    "light_inception_v2.onnx": 60, "light_shufflenet.onnx": 0, "light_squeezenet.onnx": 20,
    "light_vgg19.onnx": 15, "light_bvlc_alexnet.onnx": 4, "light_zfnet512.onnx": 4,
}


def _model(name):
    if name in MODELS:
        try:
            return load_model(fetch(name))
        except RuntimeError as exc:  # offline: a readable failure, not a crash in the middle
            pytest.fail(str(exc))
    return load_model(fetch_zoo(name))


@pytest.mark.parametrize("name", list(MODELS) + list(ZOO_MODELS))
def test_prunes_into_a_valid_smaller_model(name):
    model = _model(name)
    result = prune(model, filters=0.3, latency_runs=0)
    report = result.report
    assert result.verification.checker == "passed"
    assert result.verification.ort == "passed"
    pruned_groups = report["summary"]["groups_pruned"]
    assert pruned_groups >= MIN_PRUNED_GROUPS[name]
    if pruned_groups:
        assert report["params"]["after"] < report["params"]["before"]
        assert report["macs"]["after"] < report["macs"]["before"]
        assert report["file_bytes"]["after"] < report["file_bytes"]["before"]
    assert all(s["reason"] and s["nodes"] for s in report["skipped"])


@pytest.mark.parametrize("name", CNN_MODELS + ("paraphrase_minilm_l3_v2_bert.onnx", "light_resnet50.onnx",
                                               "light_inception_v1.onnx", "light_densenet121.onnx"))
def test_planted_dead_channels_in_real_graphs(name):
    # Trained weights, real exporter patterns: the exact-function check on each of them.
    prune_planted(_model(name), 0.3)


@pytest.mark.parametrize("name", CNN_MODELS + ("paraphrase_minilm_l3_v2_bert.onnx",))
def test_recovery_keeps_planted_dead_real_graphs_exact(name):
    """Training-free recovery (bias compensation, lsq refits incl. kxk convolutions, BatchNorm
    correction) on calibration data must leave a planted-dead removal exact."""
    from onnxprune.core.metrics import random_inputs
    from onnxprune.core.shapes import concrete_input_shapes

    model = _model(name)
    shapes, _ = concrete_input_shapes(model, None)
    calib = [random_inputs(model, shapes, seed) for seed in range(8)]
    result = prune_planted(model, 0.3, recover="lsq,bn", calib=calib)
    assert result.report["recovery"]["layers_compensated"] > 0
    assert not result.report["rolled_back"]


def test_minilm_whole_heads_planted_exactly():
    """BERT (legacy torch export, 12 heads x 32): dead heads planted in every layer go exactly."""
    result = prune_planted(_model("paraphrase_minilm_l3_v2_bert.onnx"), 0.25, heads=True)
    heads = [(d.group.channels, len(d.removed)) for d in result.plan.decisions if d.group.kind == "heads"]
    assert heads == [(12, 3)] * 3


def test_ppocr_svtr_fused_qkv_heads_planted_exactly():
    """PP-OCRv4 recognizer: two SVTR blocks, each with one qkv MatMul reshaped to [B, S, 3, 8, 15]
    (dynamic width fixed); the second block's shapes take six rounds of shape completion."""
    result = prune_planted(_model("rapidocr_rec_ppocrv4_svtr_lcnet.onnx"), 0.25, heads=True,
                           input_shapes={"x": [1, 3, 48, 320]})
    heads = [(d.group.channels, len(d.removed)) for d in result.plan.decisions if d.group.kind == "heads"]
    assert heads == [(8, 2), (8, 2)]


@pytest.mark.parametrize("name,shapes,width", [
    # tf2onnx/JAX LayerNorm: sum(x) and sum(x^2) times a constant 1/width
    ("magika_standard_v3_3.onnx", None, 512),
    # Paddle LayerNorm: mean(x), then the mean of (x - mean)^2; the SVTR blocks' width
    ("rapidocr_rec_ppocrv4_svtr_lcnet.onnx", {"x": [1, 3, 48, 320]}, 120),
])
def test_decomposed_layernorm_width_planted_exactly(name, shapes, width):
    """--hidden through LayerNorms as other frameworks spell them out: a dead width channel goes
    exactly once the statistics are put back to the original width."""
    result = prune_planted(_model(name), 0.25, hidden=True, input_shapes=shapes)
    widths = [(d.group.channels, len(d.removed)) for d in result.plan.decisions if d.group.kind == "hidden"]
    assert widths == [(width, width // 4)]
