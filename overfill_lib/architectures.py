"""Which Hugging Face decoders OverFill can prune, and what every weight in them is.

Llama, Mistral, Qwen2 and Qwen3 share one decoder layout, so one table (``GLOBAL_PARAM_AXES`` /
``LAYER_PARAM_AXES``) says which prunable dimension each tensor dimension of each parameter indexes. Pruning slices
by that table and refuses a parameter it does not describe; a family with this layout is one entry in
``SUPPORTED``. The published shapes of the models the paper prunes live here too (``PUBLISHED_SHAPES``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Prunable dimensions. ``None`` in an axes tuple means "this tensor dimension is kept whole".
HIDDEN = "hidden"  # the residual stream / embedding channels (one kept set for the whole model)
INTERMEDIATE = "intermediate"  # MLP neurons (a kept set per layer)
Q_HEADS = "q_heads"  # query heads, as rows of head_dim each (a kept set per layer)
LAYERS = "layers"  # whole decoder layers (depth pruning)
DIMENSIONS = (HIDDEN, INTERMEDIATE, Q_HEADS, LAYERS)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between supported families beyond the shared layout."""

    model_type: str
    # LlamaConfig validates hidden_size % num_attention_heads == 0 even with an explicit head_dim,
    # so a pruned Llama's hidden size must stay a multiple of its (kept) query-head count.
    hidden_multiple_of_heads: bool = False
    note: str = ""


SUPPORTED: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", hidden_multiple_of_heads=True, note="optional attention/MLP biases"),
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2", note="q/k/v biases (output side, kept whole)"),
    "qwen3": ArchSpec("qwen3", note="per-head q_norm/k_norm over head_dim (kept whole)"),
}

# Module paths used by importance hooks, relative to one decoder layer.
INPUT_NORM = "input_layernorm"
POST_ATTENTION_NORM = "post_attention_layernorm"
O_PROJ = "self_attn.o_proj"
DOWN_PROJ = "mlp.down_proj"
LAYER_PREFIX = "model.layers."

# Axes of every parameter outside the decoder layers (full state_dict names).
GLOBAL_PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "model.embed_tokens.weight": (None, HIDDEN),
    "model.norm.weight": (HIDDEN,),
    "lm_head.weight": (None, HIDDEN),
    "lm_head.bias": (None,),
}

# Axes of every parameter inside a decoder layer (names relative to ``model.layers.{i}.``).
# q/k/v read the hidden stream (input side). Their outputs are heads: k/v heads are never pruned
# (the KV cache must keep the full model's shape), q rows only when query heads are pruned.
LAYER_PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "input_layernorm.weight": (HIDDEN,),
    "post_attention_layernorm.weight": (HIDDEN,),
    "self_attn.q_proj.weight": (Q_HEADS, HIDDEN),
    "self_attn.q_proj.bias": (Q_HEADS,),
    "self_attn.k_proj.weight": (None, HIDDEN),
    "self_attn.k_proj.bias": (None,),
    "self_attn.v_proj.weight": (None, HIDDEN),
    "self_attn.v_proj.bias": (None,),
    "self_attn.q_norm.weight": (None,),
    "self_attn.k_norm.weight": (None,),
    "self_attn.o_proj.weight": (HIDDEN, Q_HEADS),
    "self_attn.o_proj.bias": (HIDDEN,),
    "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.gate_proj.bias": (INTERMEDIATE,),
    "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj.bias": (INTERMEDIATE,),
    "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj.bias": (HIDDEN,),
}

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED))


def check_config(config) -> ArchSpec:
    """The ArchSpec for ``config``; ValueError (naming the fix) for anything we cannot prune."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model_type {model_type!r} is an encoder-decoder (seq2seq) model; OverFill prunes decoder-only "
            "causal LMs. Use a decoder-only checkpoint loaded with AutoModelForCausalLM "
            f"(supported: {supported_list()})."
        )
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model_type {model_type!r} is not supported: OverFill prunes decoder-only causal LMs with the standard "
            f"Hugging Face decoder layout, namely {supported_list()}. Encoders (e.g. BERT) and seq2seq models cannot "
            "be used; another decoder family with the same layout needs an entry in "
            "overfill_lib.architectures.SUPPORTED."
        )
    return SUPPORTED[model_type]


def check_model(model: nn.Module) -> ArchSpec:
    """Check that ``model`` is a supported *ForCausalLM with the standard layout and float (not quantized) weights;
    return its ArchSpec."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"expected a Hugging Face PreTrainedModel, got {type(model).__name__}")
    spec = check_config(config)
    inner = getattr(model, "model", None)
    if getattr(model, "lm_head", None) is None or inner is None or not hasattr(inner, "layers"):
        raise ValueError(
            f"{type(model).__name__} is not a causal LM with a language-model head (expected model.model.layers and "
            "model.lm_head); load it with AutoModelForCausalLM.from_pretrained(...)."
        )
    from overfill_lib.quantize import is_quantized

    if is_quantized(model) or getattr(config, "quantization_config", None) is not None:
        # Importance and pruning read float weight matrices; int8 layers have none (their scores would be zeros).
        raise ValueError(
            f"this {type(model).__name__} has quantized weights (int8 layers or a quantization_config): importance "
            "and pruning need the float model. Compute importance and prune the float model, then quantize the "
            "pruned decoder (quantize_int8(decoder))."
        )
    return spec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def head_dim_of(config) -> int:
    """The attention head size, explicit or implied (Qwen2 configs may not store it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def param_axes(name: str) -> tuple[int | None, tuple[str | None, ...]]:
    """(layer index or None, axes) of a full state_dict parameter name; ValueError if unknown."""
    match = _LAYER_KEY.match(name)
    if match:
        axes = LAYER_PARAM_AXES.get(match.group(2))
        layer = int(match.group(1))
    else:
        axes = GLOBAL_PARAM_AXES.get(name)
        layer = None
    if axes is None:
        raise ValueError(
            f"parameter {name!r} is not part of the standard decoder layout this pruner knows "
            f"(overfill_lib.architectures.LAYER_PARAM_AXES); refusing to prune a model it would only half slice."
        )
    return layer, axes


def layer_key(name: str) -> tuple[int, str] | None:
    """(layer index, rest) for ``model.layers.{i}.rest`` names, else None."""
    match = _LAYER_KEY.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


# Published config.json shapes of the paper's full models (OVERFILL.md), the one place they are written. Only sizes
# (and the token ids a generation config needs) matter here: nothing is downloaded. RoPE frequency scaling
# ("llama3") is left out: it changes position encodings, not cost.
PUBLISHED_SHAPES = {
    "llama-3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
                         eos_token_id=128009, pad_token_id=128004),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
                         eos_token_id=128009, pad_token_id=128004),
}


def published_config(name: str):
    """A LlamaConfig with the published shape of one of the paper's full models (no download, no weights)."""
    from transformers import LlamaConfig

    if name not in PUBLISHED_SHAPES:
        raise ValueError(f"no published shape for {name!r}; choose one of {', '.join(PUBLISHED_SHAPES)}.")
    return LlamaConfig(**PUBLISHED_SHAPES[name])
