"""Tiny random-weight Hugging Face causal LMs for tests, shared by every test file.

Each model is fp32, two layers, hidden 48, 4 query heads over 2 KV heads with an explicit
head_dim of 16 (deliberately != hidden / heads, so code that derives head_dim from hidden_size is
caught), and weights drawn at O(1) scale (``randomize_``) so logits differ visibly when anything is
sliced wrong; RMSNorm gains and biases are random too, not ones/zeros.

    from tests.tiny_models import VARIANTS, tiny_model, random_batch, kv_shapes

    @pytest.mark.parametrize("arch,tied", VARIANTS, ids=variant_id)
    def test_x(arch, tied):
        model = tiny_model(arch, tied=tied)

Architectures (``ARCHITECTURES``):
  llama       LlamaForCausalLM
  llama_bias  LlamaForCausalLM with attention_bias and mlp_bias (o_proj / down_proj biases too)
  mistral     MistralForCausalLM
  qwen2       Qwen2ForCausalLM (q/k/v biases always on)
  qwen3       Qwen3ForCausalLM (per-head q_norm / k_norm over head_dim)
"""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# name -> (config class, model class, extra config kwargs)
_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama_bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
}
ARCHITECTURES = tuple(_FAMILIES)
# (architecture, tied embeddings) pairs covering every family both ways.
VARIANTS = [(a, tied) for a in ARCHITECTURES for tied in (False, True)]

DEFAULTS = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def variant_id(value) -> str:
    """pytest ids for VARIANTS entries: 'llama', 'tied'/'untied'."""
    if isinstance(value, bool):
        return "tied" if value else "untied"
    return str(value)


def tiny_config(arch: str = "llama", *, tied: bool = False, **overrides) -> PretrainedConfig:
    """A tiny config of ``arch`` (see ARCHITECTURES); any config field can be overridden.

    ``head_dim=None`` leaves head_dim out, so it is implied by hidden_size // num_attention_heads.
    """
    if arch not in _FAMILIES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")
    config_cls, _, extra = _FAMILIES[arch]
    kwargs = {**DEFAULTS, **extra, "tie_word_embeddings": tied, **overrides}
    if kwargs["head_dim"] is None:
        del kwargs["head_dim"]
    return config_cls(**kwargs)


@torch.no_grad()
def randomize_(model: PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    """Redraw every parameter at O(1) scale: matrices N(0, 1/fan_in), embeddings N(0, 1), norm gains 1 + N(0, 0.2^2),
    biases N(0, 0.1^2). Tied weights are drawn once."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            value = noise
        elif p.dim() == 2:
            value = noise / p.shape[1] ** 0.5
        elif "norm" in name:
            value = 1.0 + 0.2 * noise
        else:  # biases
            value = 0.1 * noise
        p.copy_(value.to(p.dtype))
    return model


def tiny_model(arch: str = "llama", *, tied: bool = False, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny fp32 random-weight causal LM in eval mode."""
    config = tiny_config(arch, tied=tied, **overrides)
    torch.manual_seed(seed)
    model = _FAMILIES[arch][1](config)
    randomize_(model, seed)
    return model.float().eval()


def random_batch(model_or_config, batch: int = 2, seq: int = 10, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, seq] avoiding the special ids 0..2."""
    config = getattr(model_or_config, "config", model_or_config)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (batch, seq), generator=gen)


def kv_tensors(past_key_values) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) tensors per layer of a cache, tolerant of its type.

    Handles transformers 5 ``Cache`` objects (``.layers[i].keys/.values``), older caches
    (``.key_cache`` / ``.value_cache`` lists) and legacy tuples of (key, value) pairs.
    """
    if hasattr(past_key_values, "layers"):
        return [(layer.keys, layer.values) for layer in past_key_values.layers]
    if hasattr(past_key_values, "key_cache"):
        return list(zip(past_key_values.key_cache, past_key_values.value_cache))
    return [(kv[0], kv[1]) for kv in past_key_values]


def kv_shapes(past_key_values) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """[(key shape, value shape)] per layer: [batch, kv_heads, seq, head_dim] each."""
    return [(tuple(k.shape), tuple(v.shape)) for k, v in kv_tensors(past_key_values)]
