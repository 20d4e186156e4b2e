"""LLM decoders from transformers (small configs, random weights, no hub): Llama, Qwen2, Qwen3,
Mistral, Phi-3 and Gemma, exported by torch's dynamo exporter with dynamic batch and sequence,
without a kv cache. RoPE, grouped-query attention (kv heads repeated by Expand/Reshape),
RMSNorm (Qwen3's on q and k too), SwiGLU MLPs (Phi-3's gate and up in one projection, its q/k/v
in one too), tied embeddings (Gemma). Dead kv heads (with their query heads), dead MLP neurons,
dead channels of the model width (--hidden) and adjacent identity layers must go exactly;
ShortGPT-style block influence on calibration tokens must find the identity layers."""
import warnings

import numpy as np
import pytest
from conftest import max_rel_diff, run_model
from planting import plant_identity_blocks, prune_planted

from onnxprune import prune
from onnxprune.core.metrics import random_inputs

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DECODERS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma")


def _build(name):
    t = transformers
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    configs = {"llama": (t.LlamaForCausalLM, t.LlamaConfig(**common)),
               "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(**common)),
               "qwen3": (t.Qwen3ForCausalLM, t.Qwen3Config(head_dim=16, **common)),
               "mistral": (t.MistralForCausalLM, t.MistralConfig(**common)),
               "phi3": (t.Phi3ForCausalLM, t.Phi3Config(pad_token_id=0, **common)),
               "gemma": (t.GemmaForCausalLM, t.GemmaConfig(head_dim=16, **common))}
    cls, config = configs[name]
    return cls(config).eval()


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    import onnx

    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp("llm") / f"{name}.onnx"
            example = (torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.long))
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=32)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(_Logits(_build(name)), example, str(path), dynamo=True,
                                  input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                  dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
            cache[name] = onnx.load(str(path))
        return cache[name]

    return get


def _removed(result):
    return [(d.group.kind, d.group.channels, len(d.removed)) for d in result.plan.decisions if len(d.removed)]


@pytest.mark.parametrize("name", DECODERS)
def test_kv_heads_go_with_their_query_heads(decoder, name):
    result = prune_planted(decoder(name), 0.5, heads=True)
    assert _removed(result) == [("heads", 2, 1)] * 2  # each layer its own kv head


@pytest.mark.parametrize("name", DECODERS)
def test_swiglu_neurons(decoder, name):
    result = prune_planted(decoder(name), 0.5)  # gate and up lose the same neurons, down its inputs
    assert _removed(result) == [("neurons", 128, 64)] * 2


@pytest.mark.parametrize("name", DECODERS)
def test_hidden_width(decoder, name):
    """--hidden: the embedding's columns, every write into the residual stream and every RMSNorm
    (a mean put back to the original width); Gemma's tied embedding is the lm head's weight too."""
    result = prune_planted(decoder(name), 0.25, hidden=True)
    assert _removed(result) == [("hidden", 64, 16)]
    assert result.report["params"]["after"] < 0.8 * result.report["params"]["before"]


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_adjacent_identity_layers(decoder, name):
    planted, keys = plant_identity_blocks(decoder(name), 2, first=1)  # layer 0's MLP, layer 1's attention
    tokens = [{"input_ids": np.random.default_rng(i).integers(0, 100, (2, 12)),
               "attention_mask": np.ones((2, 12), np.int64)} for i in range(2)]
    result = prune(planted, layers=2, layer_importance="influence", calib=tokens, latency_runs=0)
    assert result.report["layers"]["removed"] == keys
    feeds = random_inputs(planted, {"input_ids": [1, 9], "attention_mask": [1, 9]}, 3)
    assert max_rel_diff(run_model(planted, feeds), run_model(result.model, feeds)) <= 1e-5


class _WithCache(torch.nn.Module):
    """Logits and the present kv cache from input ids, mask and the past cache, as tensors."""

    def __init__(self, model, layers):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, attention_mask, past):
        cache = transformers.DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers[:self.layers] for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def test_llama_with_a_kv_cache(tmp_path):
    import onnx

    layers, past_len = 2, 5
    names = ["input_ids", "attention_mask"] + [f"past_{i}_{kv}" for i in range(layers) for kv in ("key", "value")]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=1, max=32)
    total, past = torch.export.Dim("total", min=2, max=96), torch.export.Dim("past", min=1, max=64)
    example = (torch.randint(0, 100, (1, 3)), torch.ones(1, past_len + 3, dtype=torch.long),
               tuple(torch.randn(1, 2, past_len, 16) for _ in range(2 * layers)))
    path = tmp_path / "llama_kv.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_WithCache(_build("llama"), layers), example, str(path), dynamo=True, input_names=names,
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total},
                                          tuple({0: batch, 2: past} for _ in range(2 * layers))))
    model = onnx.load(str(path))
    # the cache's length must match the mask's: the dims a random run needs are the user's to give
    shapes = {"input_ids": [1, 3], "attention_mask": [1, 8], **{n: [1, 2, 5, 16] for n in names[2:]}}
    neurons = prune_planted(model, 0.5, input_shapes=shapes)
    assert _removed(neurons) == [("neurons", 128, 64)] * 2
    # the cache is an interface: its kv heads stay, and the report says why
    heads = prune(model, filters=0.0, heads=0.5, input_shapes=shapes, latency_runs=0)
    assert _removed(heads) == []
    assert any("(a graph input: an interface, such as a kv cache)" in s["reason"] for s in heads.report["skipped"])
    # the width is not part of the cache (kv heads x head_dim are): it goes with the cache in place
    width = prune_planted(model, 0.25, hidden=True, input_shapes=shapes)
    assert _removed(width) == [("hidden", 64, 16)]
