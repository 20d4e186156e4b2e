"""BERT-family encoders from transformers (BERT, RoBERTa, DistilBERT, a MiniLM-shaped BERT with
12 heads; small configs, random weights) exported as users export them: input_ids,
attention_mask (and token_type_ids) with dynamic batch and sequence, both exporters, no
--input-shape. Heads must be found and pruned exactly; verification must run (integer inputs
drawn below the rows of the tables they index); calibration statistics must count real tokens
only, whether the sentences come padded to one length or in files of their own lengths."""
import warnings

import numpy as np
import pytest
from planting import prune_planted

from onnxprune import prune

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MODELS = ("bert", "roberta", "distilbert", "minilm")
CASES = [pytest.param(name, exporter, marks=[pytest.mark.slow] if exporter == "dynamo" else [],
                      id=f"{name}-{exporter}") for name in MODELS for exporter in ("legacy", "dynamo")]


def _build(name):
    t = transformers
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)
    if name == "bert":
        return t.BertModel(t.BertConfig(hidden_size=64, max_position_embeddings=40, **small)), True
    if name == "roberta":
        return t.RobertaModel(t.RobertaConfig(hidden_size=64, max_position_embeddings=42, **small)), False
    if name == "distilbert":
        return t.DistilBertModel(t.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100,
                                                    max_position_embeddings=40)), False
    minilm = dict(small, num_attention_heads=12, intermediate_size=96)
    return t.BertModel(t.BertConfig(hidden_size=48, max_position_embeddings=40, **minilm)), True


class _Encoder(torch.nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).last_hidden_state


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import onnx

    cache = {}

    def get(name, exporter):
        if (name, exporter) not in cache:
            model, token_types = _build(name)
            names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
            example = (torch.randint(2, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long),
                       torch.zeros(2, 8, dtype=torch.long))[:len(names)]
            path = tmp_path_factory.mktemp("bert") / f"{name}-{exporter}.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                if exporter == "legacy":
                    axes = {n: {0: "batch", 1: "sequence"} for n in names + ["hidden"]}
                    torch.onnx.export(_Encoder(model.eval(), names), example, str(path), dynamo=False,
                                      opset_version=17, input_names=names, output_names=["hidden"], dynamic_axes=axes)
                else:
                    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=32)
                    torch.onnx.export(_Encoder(model.eval(), names), example, str(path), dynamo=True,
                                      input_names=names, output_names=["hidden"],
                                      dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),))
            cache[name, exporter] = onnx.load(str(path))
        return cache[name, exporter]

    return get


@pytest.mark.parametrize("name,exporter", CASES)
def test_heads_on_dynamic_dims(exported, name, exporter):
    model = exported(name, exporter)
    result = prune_planted(model, 0.5, heads=True)  # verification runs inside, and must pass
    heads = [(d.group.channels, len(d.removed)) for d in result.plan.decisions if d.group.kind == "heads"]
    per_layer = 12 if name == "minilm" else 4
    assert heads == [(per_layer, per_layer // 2)] * 2
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input}
    assert all(all(dims[n]) for n in dims), dims  # the interface stays dynamic


@pytest.mark.parametrize("name", MODELS)
def test_verification_runs_without_input_shapes(exported, name):
    result = prune(exported(name, "legacy"), neurons=0.25, latency_runs=0)
    assert result.verification.ort == "passed", result.report["notes"]
    assert result.verification.max_abs_diff is not None


def _sentences(count=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 100, size=rng.integers(3, 20)) for _ in range(count)]


def _padded(sentences, token_types):
    length = max(len(s) for s in sentences)
    ids = np.zeros((len(sentences), length), np.int64)
    mask = np.zeros_like(ids)
    for row, sentence in enumerate(sentences):
        ids[row, :len(sentence)], mask[row, :len(sentence)] = sentence, 1
    feed = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        feed["token_type_ids"] = np.zeros_like(ids)
    return feed


def test_calibration_counts_real_tokens_only(exported, tmp_path):
    from onnxprune.calibration import collect_channel_stats, load_calibration

    model = exported("bert", "legacy")
    sentences = _sentences()
    np.savez(tmp_path / "padded.npz", **_padded(sentences, True))
    folder = tmp_path / "batches"
    folder.mkdir()
    for start in range(0, len(sentences), 4):  # files of 4 sentences, each padded to its own longest
        np.savez(folder / f"b{start:03d}.npz", **_padded(sentences[start:start + 4], True))
    ffn = next(n.output[0] for n in model.graph.node if n.op_type == "MatMul" and "intermediate" in n.output[0])
    stats = {}
    for key, path in (("padded", tmp_path / "padded.npz"), ("batches", folder)):
        data = load_calibration(path, model)
        assert data.mask_input == "attention_mask"
        stats[key] = collect_channel_stats(model, data, {ffn: -1})[ffn]
    tokens = sum(len(s) for s in sentences)
    assert stats["padded"].count == stats["batches"].count == tokens
    np.testing.assert_allclose(stats["padded"].mean, stats["batches"].mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["padded"].sum_sq, stats["batches"].sum_sq, rtol=1e-5)
    # without the mask the padding counts, and the two differ
    plain = {key: collect_channel_stats(model, load_calibration(path, model).with_mask(None), {ffn: -1})[ffn]
             for key, path in (("padded", tmp_path / "padded.npz"), ("batches", folder))}
    assert plain["padded"].count > tokens and plain["padded"].count != plain["batches"].count


def test_lsq_counts_real_token_rows(exported, tmp_path):
    model = exported("bert", "legacy")
    sentences = _sentences(48, seed=1)
    np.savez(tmp_path / "padded.npz", **_padded(sentences, True))
    result = prune(model, neurons=0.25, importance="recon", recover="lsq", calib=tmp_path / "padded.npz",
                   latency_runs=0)
    assert any("attention_mask" in n and "padding" in n for n in result.report["notes"])
    assert result.verification.ort == "passed"


@pytest.mark.slow
def test_calibration_batches_verify_a_model_analysed_at_measuring_dims(exported):
    # the dynamo export is analysed at the measuring dims; verification on calibration batches
    # of other dims must run the candidates with the user's (dynamic) interface, not refuse them
    model = exported("bert", "dynamo")
    sentences = _sentences(16, seed=2)
    calib = [_padded(sentences[i:i + 8], True) for i in (0, 8)]
    result = prune(model, filters=0.0, heads=0.25, neurons=0.25, importance="recon", recover="lsq", calib=calib,
                   latency_runs=0)
    assert result.report["rolled_back"] == []
    assert sum(len(d.removed) for d in result.plan.decisions if d.group.kind == "heads") == 2
    assert result.verification.ort == "passed"
