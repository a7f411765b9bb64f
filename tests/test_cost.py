"""The cost model: byte counts against independent parameter counts, the roofline and the speculative model."""

import random

import pytest
import torch

from overfill_lib import cost, latency, pruning
from overfill_lib.pruning import count_parameters
from tests.test_pruning_sweep import _llama_params
from tests.tiny_models import VARIANTS, tiny_config, variant_id


def meta_numel(config, skip=()) -> int:
    """Parameters of a model built on the meta device, optionally leaving some names out (tied ones once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for n, p in model.named_parameters() if n not in skip)


@pytest.mark.parametrize("name", ["llama-3.2-3b", "llama-3.1-8b"])
def test_real_size_byte_counts_match_meta_parameter_counts(name):
    full, decoder = latency.real_size_pairs()[name]
    for config in (full, decoder):
        parts = cost.parameter_breakdown(config)
        assert parts["total"] == count_parameters(config)
        # Bytes a decode step reads: every parameter once, an untied input table excepted (a row gather).
        untied = not config.tie_word_embeddings
        read = meta_numel(config, skip={"model.embed_tokens.weight"} if untied else ())
        assert cost.weight_bytes(config, 2) == 2 * read
    # The decoder keeps the KV shape, so one cache serves both models.
    assert cost.kv_bytes_per_token(full, 2) == cost.kv_bytes_per_token(decoder, 2)
    assert decoder.num_hidden_layers == full.num_hidden_layers and decoder.head_dim == full.head_dim


@pytest.mark.parametrize("arch,tied", VARIANTS, ids=variant_id)
def test_breakdown_matches_meta_count_for_every_family(arch, tied):
    config = tiny_config(arch, tied=tied)
    assert cost.parameter_breakdown(config)["total"] == meta_numel(config)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_weight_bytes_is_parameters_times_dtype_bytes(tied):
    config = tiny_config("llama", tied=tied)
    params = pruning.count_parameters(config)
    assert params == _llama_params(config)
    lookup = 0 if tied else config.vocab_size * config.hidden_size  # an untied input table is only looked up
    for dtype, size in ((2, 2), ("bfloat16", 2), (torch.float32, 4), ("float32", 4)):
        assert cost.weight_bytes(config, dtype) == (params - lookup) * size
    small = pruning.pruned_config(config, hidden=0.5, intermediate=0.5)
    assert cost.weight_bytes(small, 2) == (pruning.count_parameters(small) - (0 if tied else 96 * 24)) * 2
    with pytest.raises(ValueError, match="unknown dtype"):
        cost.weight_bytes(config, "float33")
    with pytest.raises(ValueError, match="positive number of bytes"):
        cost.weight_bytes(config, 0)


def test_decode_step_bytes_and_roofline():
    full, decoder = latency.real_size_pairs()["llama-3.2-3b"]
    one = cost.decode_step_bytes(decoder, 2, batch=1, kv_positions=1000, kv_config=full)
    two = cost.decode_step_bytes(decoder, 2, batch=2, kv_positions=1000, kv_config=full)
    assert one["weights"] == two["weights"] and two["kv_read"] == 2 * one["kv_read"]
    # int8 weights beside a bf16 cache: the weights shrink, the KV cache does not
    narrow = cost.decode_step_bytes(decoder, 2, batch=1, kv_positions=1000, kv_config=full, weight_bytes_per_value=1)
    assert narrow["weights"] == cost.weight_bytes(decoder, 1) == one["weights"] // 2
    assert (narrow["kv_read"], narrow["kv_write"]) == (one["kv_read"], one["kv_write"])
    rows = cost.roofline(decoder, 2, 3.0e12, contexts=[128, 131072], batches=[1], kv_config=full)
    assert rows[0]["kv_fraction"] < 0.05 < 0.5 < rows[1]["kv_fraction"]  # the KV cache dominates at long context
    crossover = cost.kv_crossover_context(decoder, 2, 1, full)
    at = cost.decode_step_bytes(decoder, 2, batch=1, kv_positions=round(crossover), kv_config=full)
    assert at["kv_read"] == pytest.approx(at["weights"], rel=1e-3)


def test_expected_tokens_formula_against_simulation():
    assert cost.expected_tokens_per_round(0.0, 4) == 1.0
    assert cost.expected_tokens_per_round(1.0, 4) == 5.0
    rng = random.Random(0)
    for alpha, gamma in [(0.6, 3), (0.85, 5)]:
        total = 0
        for _ in range(20000):
            accepted = 0
            while accepted < gamma and rng.random() < alpha:
                accepted += 1
            total += accepted + 1  # accepted drafts + the verifier's token
        assert total / 20000 == pytest.approx(cost.expected_tokens_per_round(alpha, gamma), rel=0.02)
    # Perfect acceptance with free drafts: one verify per gamma + 1 tokens.
    assert cost.speculative_per_token_s(1.0, 3, 0.0, 4.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="acceptance rate"):
        cost.expected_tokens_per_round(1.5, 2)
