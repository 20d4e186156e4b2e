"""LLM decoders from transformers (small configs, random weights, no hub): Llama, Qwen2, Qwen3,
Mistral, Phi-3 and Gemma, exported by torch's dynamo exporter with dynamic batch and sequence,
without a kv cache. RoPE, grouped-query attention (kv heads repeated by Expand/Reshape),
RMSNorm (Qwen3's on q and k too), SwiGLU MLPs (Phi-3's gate and up in one projection, its q/k/v
in one too), tied embeddings (Gemma). Dead kv heads (with their query heads), dead MLP neurons
and adjacent identity layers must go exactly; ShortGPT-style block influence on calibration
tokens must find the identity layers."""
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


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_adjacent_identity_layers(decoder, name):
    planted, keys = plant_identity_blocks(decoder(name), 2, first=1)  # layer 0's MLP, layer 1's attention
    tokens = [{"input_ids": np.random.default_rng(i).integers(0, 100, (2, 12)),
               "attention_mask": np.ones((2, 12), np.int64)} for i in range(2)]
    result = prune(planted, layers=2, layer_importance="influence", calib=tokens, latency_runs=0)
    assert result.report["layers"]["removed"] == keys
    feeds = random_inputs(planted, {"input_ids": [1, 9], "attention_mask": [1, 9]}, 3)
    assert max_rel_diff(run_model(planted, feeds), run_model(result.model, feeds)) <= 1e-5
