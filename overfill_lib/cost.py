"""What a decode step costs, counted from configs alone: bytes read, the roofline, speculative latency.

Decode is memory-bound: a step reads every weight once plus the KV cache, so ``bytes / bandwidth``
bounds its time. The byte rules live here once, with weights and KV cache named apart, so pruning
tables, the ablation and the latency profiler (which measures against this bound) cost alike.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from overfill_lib import quantize
from overfill_lib.architectures import head_dim_of

PATH_MODELLED = "modelled"


def _text(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def dtype_bytes(dtype) -> float:
    """Bytes per value for a number of bytes, a torch dtype or its name ("bfloat16", "float32", ...)."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; give a torch dtype name such as 'bfloat16' or 'float32'.")
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if isinstance(dtype, bool) or not isinstance(dtype, numbers.Real) or dtype <= 0:
        raise ValueError(f"dtype_bytes={dtype!r} must be a positive number of bytes or a torch dtype.")
    return dtype


def weight_value_bytes(config, bytes_per_value):
    """Bytes per stored weight: 1 for a model whose config says :func:`overfill_lib.quantize.quantize_int8`
    quantized it (int8 weights, whatever the activations' dtype), else ``bytes_per_value``."""
    return 1 if getattr(config, quantize.CONFIG_KEY, None) in quantize.SCHEMES else bytes_per_value


def parameter_breakdown(config) -> dict[str, int]:
    """Parameter counts by part, from the config alone (no model is built).

    Written out per family (Llama, Mistral, Qwen2, Qwen3: which projections carry biases, Qwen3's
    per-head q/k norms) so it is an independent check on a meta-device count. A tied LM head is
    counted once, with the embedding.
    """
    c = _text(config)
    family = c.model_type
    if family not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"byte counts are written for llama, mistral, qwen2 and qwen3 configs, not {family!r}")
    h, i, v, d = c.hidden_size, c.intermediate_size, c.vocab_size, head_dim_of(c)
    q, kv = c.num_attention_heads * d, (c.num_key_value_heads or c.num_attention_heads) * d
    attention_bias = bool(getattr(c, "attention_bias", False))
    qkv_bias = {"llama": attention_bias, "mistral": False, "qwen2": True, "qwen3": attention_bias}[family]
    o_bias = {"llama": attention_bias, "mistral": False, "qwen2": False, "qwen3": attention_bias}[family]
    mlp_bias = bool(getattr(c, "mlp_bias", False)) if family == "llama" else False
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if qkv_bias else 0) + (h if o_bias else 0)
    attention += 2 * d if family == "qwen3" else 0  # q_norm, k_norm
    mlp = 3 * h * i + (2 * i + h if mlp_bias else 0)
    norms = 2 * h
    layers = c.num_hidden_layers
    tied = bool(getattr(c, "tie_word_embeddings", False))
    parts = {
        "embedding": v * h,
        "attention": layers * attention,
        "mlp": layers * mlp,
        "norms": layers * norms + h,
        "lm_head": 0 if tied else v * h,
    }
    parts["total"] = sum(parts.values())
    parts["tied_embeddings"] = int(tied)
    return parts


def weight_bytes(config, bytes_per_value, num_parameters: int | None = None) -> int:
    """Weight bytes one decode step reads: every parameter once, except an untied input embedding.

    The input embedding is a gather of ``batch`` rows, not a read of the table; a tied table is read
    whole by the LM head, so then it counts. ``bytes_per_value`` as :func:`dtype_bytes` takes it (one byte for
    int8 weights whatever it says, :func:`weight_value_bytes`); ``num_parameters``: the model's count when already
    known (default: :func:`parameter_breakdown`).
    """
    c = _text(config)
    params = parameter_breakdown(c)["total"] if num_parameters is None else int(num_parameters)
    if not getattr(c, "tie_word_embeddings", False):
        params -= c.vocab_size * c.hidden_size
    return round(params * dtype_bytes(weight_value_bytes(config, bytes_per_value)))


def kv_bytes_per_token(config, bytes_per_value: int) -> int:
    """K and V of one position over all layers: 2 x layers x kv_heads x head_dim x bytes."""
    c = _text(config)
    return 2 * c.num_hidden_layers * (c.num_key_value_heads or c.num_attention_heads) * head_dim_of(c) * bytes_per_value


def decode_step_bytes(config, bytes_per_value: int, *, batch: int, kv_positions: int, kv_config=None,
                      weight_bytes_per_value: float | None = None) -> dict[str, int]:
    """Bytes moved by one decode step: ``weights`` once, ``kv_read`` for ``kv_positions`` per row, one new
    position written (``kv_write``), and their ``total``.

    ``kv_config``: the config whose cache is read (OverFill's decoder reads the full model's, which
    has the same per-token size under shared_kv). With a static cache ``kv_positions`` is the
    allocated length: the attention kernel reads the whole buffer under its mask.
    ``weight_bytes_per_value``: when the weights are stored narrower than the activations and KV cache
    (int8 weights, :mod:`overfill_lib.quantize`: 1; their per-row scales and the norms are left out).
    """
    per_token = kv_bytes_per_token(kv_config or config, bytes_per_value)
    weights = weight_bytes(config, bytes_per_value if weight_bytes_per_value is None else weight_bytes_per_value)
    kv_read = batch * kv_positions * per_token
    kv_write = batch * per_token
    return {"weights": weights, "kv_read": kv_read, "kv_write": kv_write, "total": weights + kv_read + kv_write}


def method_step_bytes(method: str, full_config, decoder_config, bytes_per_value: int, batch: int,
                      cache_len: int) -> dict | None:
    """:func:`decode_step_bytes` of a decoding method (speculative steps differ per round: None)."""
    if method == "speculative":
        return None
    config = full_config if method == "full" else decoder_config
    return decode_step_bytes(config, bytes_per_value, batch=batch, kv_positions=cache_len, kv_config=full_config)


def memory_estimate(method: str, full_config, decoder_config, bytes_per_value: int, batch: int, cache_len: int) -> int:
    """Bytes a method keeps resident: its models' weights and its static caches (activations left out).

    OverFill and speculative decoding hold both models; speculative decoding also holds two caches.
    """
    resident = {"full": [full_config], "decoder": [decoder_config]}.get(method, [full_config, decoder_config])
    weights = sum(parameter_breakdown(c)["total"] * weight_value_bytes(c, bytes_per_value) for c in resident)
    caches = 2 if method == "speculative" else 1
    return weights + caches * batch * cache_len * kv_bytes_per_token(full_config, bytes_per_value)


def roofline(config, bytes_per_value: int, bandwidth: float, *, contexts: Sequence[int], batches: Sequence[int], kv_config=None) -> list[dict]:
    """Per-step lower bound ``bytes / bandwidth`` over context lengths and batch sizes.

    ``kv_fraction`` shows where the KV cache starts to dominate a step; ``tokens_per_s`` is the
    throughput bound at that batch.
    """
    rows = []
    for batch in batches:
        for context in contexts:
            b = decode_step_bytes(config, bytes_per_value, batch=batch, kv_positions=context, kv_config=kv_config)
            seconds = b["total"] / bandwidth
            rows.append({
                "batch": batch, "context": context, "bytes": b["total"], "weights_bytes": b["weights"],
                "kv_bytes": b["kv_read"] + b["kv_write"], "kv_fraction": (b["kv_read"] + b["kv_write"]) / b["total"],
                "seconds_per_step": seconds, "tokens_per_s": batch / seconds,
            })
    return rows


def kv_crossover_context(config, bytes_per_value: int, batch: int = 1, kv_config=None) -> float:
    """Context length (per row) at which reading the KV cache costs as much as reading the weights."""
    return weight_bytes(config, bytes_per_value) / (batch * kv_bytes_per_token(kv_config or config, bytes_per_value))


def model_summary(config, bytes_per_value: int) -> dict:
    """Shape, parameter counts and per-step bytes of a config (weights read per step, KV cache per token)."""
    c = _text(config)
    parts = parameter_breakdown(c)
    return {
        "model_type": c.model_type, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
        "intermediate": c.intermediate_size, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
        "head_dim": head_dim_of(c), "vocab": c.vocab_size, "parameters": parts["total"], "parameter_breakdown": parts,
        "weight_bytes_per_step": weight_bytes(c, bytes_per_value),
        "kv_bytes_per_token": kv_bytes_per_token(c, bytes_per_value),
    }


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected tokens one draft/verify round yields: (1 - alpha^(gamma+1)) / (1 - alpha).

    Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding"
    (ICML 2023), Eq. (1), with per-token acceptance rate alpha treated as i.i.d.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance rate {alpha} must be in [0, 1]")
    if alpha == 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speculative_per_token_s(alpha: float, gamma: int, draft_step_s: float, verify_s: float) -> float:
    """Expected seconds per output token: round cost / expected tokens per round.

    A round costs gamma draft steps and one verify forward of gamma + 1 tokens (Leviathan et al.
    2023, Sec. 3.4), plus, when all gamma drafts are accepted (probability alpha^gamma), one more
    draft step so the draft's cache holds its last token (as :mod:`overfill_lib.fast_decode` does).
    """
    cost = gamma * draft_step_s + verify_s + alpha**gamma * draft_step_s
    return cost / expected_tokens_per_round(alpha, gamma)


def model_speculative(costs: dict[int, tuple[float, float]], alphas: Sequence[float]) -> list[dict]:
    """Modelled per-token seconds for each acceptance rate and gamma, from ``{gamma: (draft_step_s, verify_s)}``."""
    rows = []
    for alpha in alphas:
        for gamma, (draft_s, verify_s) in sorted(costs.items()):
            rows.append({"alpha": alpha, "gamma": gamma, "draft_step_s": draft_s, "verify_s": verify_s,
                         "expected_tokens_per_round": expected_tokens_per_round(alpha, gamma),
                         "per_token_s": speculative_per_token_s(alpha, gamma, draft_s, verify_s), "path": PATH_MODELLED})
    return rows
