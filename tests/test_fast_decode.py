"""The fast decode path (static cache, compiled step) reproduces the plain loop's greedy tokens exactly."""

import copy
import os

import pytest
import torch

from overfill_lib import fast_decode, generation
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.generation import returned_cache
from overfill_lib.pair import OverFillModel
from tests.tiny_models import random_batch, tiny_model

NEW = 14


@pytest.fixture(scope="module")
def models():
    full = tiny_model("llama", seed=0)
    decoder = tiny_model("llama", seed=1, hidden_size=32, intermediate_size=40)  # width-pruned shape
    return full, decoder


def left_padded(model, batch=3, seq=9, seed=3):
    ids = random_batch(model, batch, seq, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # rows of different lengths: positions and masks must follow the padding
    mask[-1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def plain(full, decoder, ids, mask, **kw):
    """The plain loop (DynamicCache, eager): an identity pair is a model alone."""
    return OverFillModel(full, decoder, "shared_kv").generate(ids, mask, max_new_tokens=NEW, do_sample=False, **kw)


@pytest.mark.parametrize("method", ["overfill", "full", "decoder"])
@pytest.mark.parametrize("eos", [None, [5, 7]], ids=["model-eos", "early-eos"])
def test_fast_eager_matches_plain_loop(models, method, eos):
    full, decoder = models
    ids, mask = left_padded(full)
    first, second = {"overfill": (full, decoder), "full": (full, full), "decoder": (decoder, decoder)}[method]
    ref = plain(first, second, ids, mask, **({"eos_token_id": eos} if eos else {}))
    out = FastGenerator(full, decoder, compile=False).generate(
        ids, mask, method=method, max_new_tokens=NEW, eos_token_id=eos if eos else "default")
    assert out.path == fast_decode.PATH_EAGER
    assert torch.equal(out.new_tokens, ref.new_tokens)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.finish_reasons == ref.finish_reasons
    assert out.timings.steps == ref.new_tokens.shape[1] and out.timings.ttft_s > 0


def test_early_eos_case_really_stops_early(models):
    # Guards the parametrized test above: with eos ids the model emits, rows end and output is trimmed.
    full, decoder = models
    ids, mask = left_padded(full)
    out = FastGenerator(full, decoder, compile=False).generate(ids, mask, method="decoder", max_new_tokens=NEW,
                                                               eos_token_id=[5, 7])
    assert "eos" in out.finish_reasons
    assert out.new_tokens.shape[1] < NEW or "length" in out.finish_reasons


def test_decoder_reads_and_extends_the_full_models_static_cache(models):
    full, decoder = models
    ids, mask = left_padded(full)
    gen = FastGenerator(full, decoder, compile=False)
    out = gen.generate(ids, mask, method="overfill", max_new_tokens=NEW, eos_token_id=[])
    (cache,) = gen._caches.values()  # one static cache served both models
    prompt = ids.shape[1]
    assert int(cache.get_seq_length()) == prompt + NEW - 1  # prompt by the full model, then decoder steps
    assert cache.layers[0].keys.shape[2] == prompt + NEW  # allocated once for prompt + new tokens
    # The prompt part is the full model's own KV (the decoder did not recompute or copy it).
    ref = full(input_ids=ids, attention_mask=mask, position_ids=generation.positions_from_mask(mask), use_cache=True)
    for layer, ref_layer in zip(cache.layers, returned_cache(ref).layers):
        torch.testing.assert_close(layer.keys[:, :, :prompt], ref_layer.keys)
        torch.testing.assert_close(layer.values[:, :, :prompt], ref_layer.values)
    # A second call of the same shape reuses the buffers (static addresses for CUDA graphs).
    ptr = cache.layers[0].keys.data_ptr()
    again = gen.generate(ids, mask, method="overfill", max_new_tokens=NEW, eos_token_id=[])
    assert gen._caches[next(iter(gen._caches))].layers[0].keys.data_ptr() == ptr
    assert torch.equal(again.new_tokens, out.new_tokens)


def noisy_copy(model, noise, seed=1):
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    return draft


@pytest.mark.parametrize("noise,gamma", [(0.0, 3), (0.1, 1), (0.1, 4), (1.0, 2)])
def test_speculative_returns_the_full_models_greedy_tokens(models, noise, gamma):
    full, _ = models
    draft = noisy_copy(full, noise)
    ids, mask = left_padded(full)
    ref = plain(full, full, ids, mask)
    out = FastGenerator(full, draft, compile=False).generate(ids, mask, method="speculative", max_new_tokens=NEW,
                                                             num_draft_tokens=gamma)
    assert torch.equal(out.new_tokens, ref.new_tokens)
    t = out.timings
    assert 0 <= t.accepted <= t.proposed == gamma * t.rounds
    if noise == 0.0:  # an identical draft is always accepted: gamma + 1 tokens per round
        assert t.acceptance == 1.0 and t.rounds == -(-(NEW - 1) // (gamma + 1))
    else:
        assert t.acceptance < 1.0


def test_errors_name_the_problem(models):
    full, decoder = models
    other = tiny_model("llama", seed=2, num_key_value_heads=4)
    with pytest.raises(ValueError, match="KV heads"):
        FastGenerator(full, other)
    with pytest.raises(ValueError, match="one device and dtype"):
        FastGenerator(full, copy.deepcopy(decoder).double())
    gen = FastGenerator(full, decoder, compile=False)
    ids, mask = left_padded(full)
    with pytest.raises(ValueError, match="unknown method"):
        gen.generate(ids, mask, method="beam")
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="needs the decoder"):
        FastGenerator(full=full, compile=False).generate(ids, mask, method="overfill")
    pair = OverFillModel(full, tiny_model("llama", seed=3, num_hidden_layers=1), "layer_subset", layers=[1])
    with pytest.raises(ValueError, match="shared_kv"):
        FastGenerator.from_pair(pair)


@pytest.mark.skipif(
    os.environ.get("OVERFILL_COMPILE_TESTS") != "1",
    reason="a cold torch.compile of the decode steps takes ~30 s of CPU, ~50 s on a busy 2-core machine (over this file's budget); "
    "set OVERFILL_COMPILE_TESTS=1 to run it",
)
def test_compiled_step_matches_plain_loop_on_cpu(models):
    full, decoder = models
    ids, mask = left_padded(full, batch=2)
    gen = FastGenerator(full, decoder, compile=True)
    for method, (a, b) in {"overfill": (full, decoder), "full": (full, full)}.items():
        out = gen.generate(ids, mask, method=method, max_new_tokens=NEW)
        assert out.path == fast_decode.PATH_COMPILED
        assert torch.equal(out.new_tokens, plain(a, b, ids, mask).new_tokens)
