"""Pairing strategies: how the decoder reads the full model's KV cache, a registry.

``shared_kv`` (same layers, KV heads and head_dim; the paper's default: the decoder reads the cache as it is),
``layer_subset`` (a depth-pruned decoder reads its layers' KV) and ``kv_projection`` (a learned per-layer map, for
any two models sharing a tokenizer). What decides which one a pair needs is its two models' :class:`KVShape`; the
pair itself (:mod:`overfill_lib.pair`) and the fast path (:mod:`overfill_lib.fast_decode`) only ask this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from overfill_lib.architectures import head_dim_of
from overfill_lib.tokens import eos_ids

# --------------------------------------------------------------------------------------------------
# KV shapes and compatibility
# --------------------------------------------------------------------------------------------------


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    # Multimodal configs nest the language model's config; plain causal LMs return themselves.
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


@dataclass(frozen=True)
class KVShape:
    """What decides whether a KV cache can be read by another model: per-layer shape and vocabulary."""

    layers: int
    kv_heads: int
    head_dim: int
    vocab: int
    eos: frozenset[int] = frozenset()

    @classmethod
    def of(cls, config: PretrainedConfig) -> KVShape:
        c = _text_config(config)
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return cls(c.num_hidden_layers, kv_heads, head_dim_of(c), c.vocab_size, frozenset(eos_ids(c)))

    @property
    def kv_width(self) -> int:
        """Channels per layer for K (and for V): n_kv_heads * head_dim."""
        return self.kv_heads * self.head_dim


def _tokenizer_mismatches(full: KVShape, dec: KVShape) -> list[str]:
    out = []
    if full.vocab != dec.vocab:
        out.append(f"vocabulary size (full {full.vocab}, decoder {dec.vocab})")
    if full.eos and dec.eos and full.eos != dec.eos:
        out.append(f"tokenizer (eos_token_id: full {sorted(full.eos)}, decoder {sorted(dec.eos)})")
    return out


def _shape_mismatches(full: KVShape, dec: KVShape) -> list[str]:
    out = []
    if full.layers != dec.layers:
        out.append(f"layer count (full {full.layers}, decoder {dec.layers})")
    if full.kv_heads != dec.kv_heads:
        out.append(f"KV heads (full {full.kv_heads}, decoder {dec.kv_heads})")
    if full.head_dim != dec.head_dim:
        out.append(f"head_dim (full {full.head_dim}, decoder {dec.head_dim})")
    return out


def kv_mismatches(full_config: PretrainedConfig, decoder_config: PretrainedConfig) -> list[str]:
    """How the decoder's KV cache (and vocabulary) differ from the full model's; empty when it can read that cache
    as it is (``shared_kv``)."""
    full, dec = KVShape.of(full_config), KVShape.of(decoder_config)
    vocab = [f"vocabulary size (full {full.vocab}, decoder {dec.vocab})"] if full.vocab != dec.vocab else []
    return _shape_mismatches(full, dec) + vocab


def suggest_strategy(full_config: PretrainedConfig, decoder_config: PretrainedConfig) -> str | None:
    """The simplest strategy that can pair these two models, or None when they cannot be paired."""
    full, dec = KVShape.of(full_config), KVShape.of(decoder_config)
    if _tokenizer_mismatches(full, dec):
        return None
    shape = _shape_mismatches(full, dec)
    if not shape:
        return "shared_kv"
    if len(shape) == 1 and full.layers > dec.layers:
        return "layer_subset"
    return "kv_projection"


def _unpairable(full: KVShape, dec: KVShape) -> None:
    bad = _tokenizer_mismatches(full, dec)
    if bad:
        raise ValueError(
            f"the models differ in {'; '.join(bad)}: they cannot be paired under any strategy. OverFill needs one "
            "tokenizer, since the first new token comes from the full model's logits and the rest from the decoder's."
        )


# --------------------------------------------------------------------------------------------------
# Cache helpers (DynamicCache's public surface, stable across transformers 5.x)
# --------------------------------------------------------------------------------------------------


def layer_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer, each [batch, kv_heads, seq, head_dim] (keys are stored after RoPE)."""
    entry = cache.layers[layer]
    return entry.keys, entry.values


# --------------------------------------------------------------------------------------------------
# Pairing strategies
# --------------------------------------------------------------------------------------------------

STRATEGIES: dict[str, type[PairingStrategy]] = {}


def register_strategy(cls: type[PairingStrategy]) -> type[PairingStrategy]:
    """Class decorator: make a strategy available by its ``name``."""
    STRATEGIES[cls.name] = cls
    return cls


class PairingStrategy(nn.Module):
    """How the decoder reads the full model's KV cache.

    Subclasses validate the pair in ``__init__`` (raising ``ValueError`` that names the mismatch),
    build the cache the decoder reads after the full model's prefill (:meth:`decoder_cache`), and
    append full-model KV for positions ``start:`` to a decoder cache (:meth:`append_from_full`, used
    by prefill refresh). Any trainable parameters are ``nn.Parameter`` s of the strategy module.
    """

    name: ClassVar[str]
    #: True when the decoder reads (and writes) the full model's cache object itself.
    shares_cache: ClassVar[bool] = False

    def __init__(self, full_config: PretrainedConfig, decoder_config: PretrainedConfig):
        super().__init__()
        self.full_shape = KVShape.of(full_config)
        self.decoder_shape = KVShape.of(decoder_config)
        self.decoder_config = decoder_config
        _unpairable(self.full_shape, self.decoder_shape)

    def decoder_cache(self, full_cache: DynamicCache) -> DynamicCache:
        """The cache the decoder continues from, given the full model's prefilled cache."""
        cache = DynamicCache(config=self.decoder_config)
        self.append_from_full(cache, full_cache, 0)
        return cache

    def append_from_full(self, decoder_cache: DynamicCache, full_cache: DynamicCache, start: int) -> None:
        """Append the full model's KV for positions ``start:`` to every decoder layer."""
        for j in range(self.decoder_shape.layers):
            k, v = self.map_layer(j, full_cache, start)
            decoder_cache.update(k, v, j)

    def map_layer(self, j: int, full_cache: DynamicCache, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def strategy_args(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (stored in ``overfill_config.json``)."""
        return {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, args={self.strategy_args()}"


@register_strategy
class SharedKV(PairingStrategy):
    """Same layers and KV shapes: the decoder reads the full model's cache as-is (the paper's setting)."""

    name = "shared_kv"
    shares_cache = True

    def __init__(self, full_config: PretrainedConfig, decoder_config: PretrainedConfig):
        super().__init__(full_config, decoder_config)
        bad = _shape_mismatches(self.full_shape, self.decoder_shape)
        if bad:
            fit = suggest_strategy(full_config, decoder_config)
            how = {
                "layer_subset": "strategy='layer_subset' with the full-model indices of the decoder's layers",
                "kv_projection": "strategy='kv_projection' (a learned per-layer map from full KV to decoder KV)",
            }[fit]
            raise ValueError(
                f"shared_kv needs the decoder's KV cache to have the full model's shape, but they differ in "
                f"{'; '.join(bad)}. Use {how}."
            )

    def decoder_cache(self, full_cache: DynamicCache) -> DynamicCache:
        return full_cache

    def append_from_full(self, decoder_cache: DynamicCache, full_cache: DynamicCache, start: int) -> None:
        # One cache object serves both models: the full model's forward already wrote it.
        if decoder_cache is not full_cache:
            raise RuntimeError("shared_kv expects the decoder to read the full model's cache object itself")


@register_strategy
class LayerSubset(PairingStrategy):
    """The decoder keeps a subset of the full model's layers and reads those layers' KV."""

    name = "layer_subset"

    def __init__(self, full_config: PretrainedConfig, decoder_config: PretrainedConfig, layers: Sequence[int]):
        super().__init__(full_config, decoder_config)
        full, dec = self.full_shape, self.decoder_shape
        self.layers = [int(i) for i in layers]
        problems = [p for p in _shape_mismatches(full, dec) if not p.startswith("layer count")]
        if problems:
            raise ValueError(
                f"layer_subset needs equal KV heads and head_dim, but the models differ in {'; '.join(problems)}. "
                "Use strategy='kv_projection'."
            )
        if len(self.layers) != dec.layers:
            raise ValueError(f"layer_subset got {len(self.layers)} layer indices {self.layers} for a {dec.layers}-layer decoder")
        if len(set(self.layers)) != len(self.layers) or not all(0 <= i < full.layers for i in self.layers):
            raise ValueError(f"layer_subset indices {self.layers} must be distinct and in [0, {full.layers})")

    def map_layer(self, j: int, full_cache: DynamicCache, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = layer_kv(full_cache, self.layers[j])
        return k[:, :, start:], v[:, :, start:]

    def strategy_args(self) -> dict[str, Any]:
        return {"layers": list(self.layers)}


def default_layer_map(full_layers: int, decoder_layers: int) -> list[int]:
    """Decoder layer j reads full layer round(j * (L_full - 1) / (L_dec - 1)): first to first, last to last."""
    if decoder_layers == 1:
        return [full_layers - 1]
    return [round(j * (full_layers - 1) / (decoder_layers - 1)) for j in range(decoder_layers)]


@register_strategy
class KVProjection(PairingStrategy):
    """A learned linear map per decoder layer from full-model K (and V) to the decoder's KV shape.

    K and V of full layer ``layer_map[j]`` ([batch, kv_heads_f, seq, head_dim_f]) are flattened per
    position to kv_heads_f*head_dim_f channels, mapped by ``k_proj[j]`` / ``v_proj[j]`` (no bias) to
    kv_heads_d*head_dim_d channels and reshaped. Weights start at the identity (``eye_``; for
    rectangular shapes the leading channels are copied), so an identical-shape pair starts exact.

    RoPE: Hugging Face caches hold keys *after* the rotary embedding, and this projects those
    post-RoPE keys directly. That is exact for maps commuting with the rotation (identity, mixing
    whole heads of equal head_dim and RoPE base); a general map mixes rotated channels, leaving a
    position-dependent error that training must absorb. Un-rotating with the full model's RoPE and
    re-rotating with the decoder's would remove it, at the cost of model-specific RoPE code.
    """

    name = "kv_projection"

    def __init__(
        self,
        full_config: PretrainedConfig,
        decoder_config: PretrainedConfig,
        layer_map: Sequence[int] | None = None,
    ):
        super().__init__(full_config, decoder_config)
        full, dec = self.full_shape, self.decoder_shape
        self.layer_map = [int(i) for i in (layer_map if layer_map is not None else default_layer_map(full.layers, dec.layers))]
        if len(self.layer_map) != dec.layers or not all(0 <= i < full.layers for i in self.layer_map):
            raise ValueError(
                f"kv_projection layer_map {self.layer_map} needs one full-model layer index in [0, {full.layers}) "
                f"per decoder layer ({dec.layers})"
            )
        self.k_proj = nn.ModuleList(nn.Linear(full.kv_width, dec.kv_width, bias=False) for _ in range(dec.layers))
        self.v_proj = nn.ModuleList(nn.Linear(full.kv_width, dec.kv_width, bias=False) for _ in range(dec.layers))
        with torch.no_grad():
            for lin in [*self.k_proj, *self.v_proj]:
                nn.init.eye_(lin.weight)

    def _project(self, x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        b, _, t, _ = x.shape
        flat = x.transpose(1, 2).reshape(b, t, -1).to(lin.weight.dtype)
        out = lin(flat).view(b, t, self.decoder_shape.kv_heads, self.decoder_shape.head_dim)
        return out.transpose(1, 2).contiguous()

    def map_layer(self, j: int, full_cache: DynamicCache, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = layer_kv(full_cache, self.layer_map[j])
        return self._project(k[:, :, start:], self.k_proj[j]), self._project(v[:, :, start:], self.v_proj[j])

    def strategy_args(self) -> dict[str, Any]:
        return {"layer_map": list(self.layer_map)}


def build_strategy(
    name: str, full_config: PretrainedConfig, decoder_config: PretrainedConfig, **args: Any
) -> PairingStrategy:
    """Instantiate a registered strategy by name."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown pairing strategy {name!r}; available: {sorted(STRATEGIES)}")
    return STRATEGIES[name](full_config, decoder_config, **args)
