"""The OverFill pair: strategies and their validation, scoring, the training path, persistence.

Tiny random fp32 Llama models (hidden 32), built by the helpers of test_generation; the file runs in seconds on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from overfill_lib.artifacts import write_json
from overfill_lib.generation import pad_sequences
from overfill_lib.pair import STRATEGIES, KVProjection, OverFillModel, default_layer_map, suggest_strategy
from tests.test_generation import IDS, VOCAB, hf_greedy, subset_decoder, tiny_llama

torch.set_num_threads(1)

# ----------------------------------------------------------------------------------------------
# construction and validation
# ----------------------------------------------------------------------------------------------


def test_registry_and_frozen_full_model():
    assert set(STRATEGIES) == {"shared_kv", "layer_subset", "kv_projection"}
    full = tiny_llama()
    pair = OverFillModel(full, tiny_llama(1, hidden_size=16, intermediate_size=32))
    assert pair.strategy_name == "shared_kv"
    assert not any(p.requires_grad for p in pair.full.parameters())
    pair.train()
    assert pair.decoder.training and not pair.full.training
    assert {id(p) for p in pair.trainable_parameters()} == {id(p) for p in pair.decoder.parameters()}


@pytest.mark.parametrize(
    "overrides, mismatch, fit",
    [
        ({"num_hidden_layers": 1}, "layer count", "layer_subset"),
        ({"num_key_value_heads": 1}, "KV heads", "kv_projection"),
        ({"head_dim": 4}, "head_dim", "kv_projection"),
        ({"num_hidden_layers": 3}, "layer count", "kv_projection"),  # deeper decoder: no subset to read
        ({"vocab_size": VOCAB + 8}, "vocabulary size", "cannot be paired"),
        ({"eos_token_id": 7}, "tokenizer", "cannot be paired"),
    ],
)
def test_shared_kv_mismatch_names_the_problem_and_the_fitting_strategy(overrides, mismatch, fit):
    full = tiny_llama()
    decoder = tiny_llama(1, **overrides)
    with pytest.raises(ValueError) as err:
        OverFillModel(full, decoder, "shared_kv")
    assert mismatch in str(err.value) and fit in str(err.value)
    expected = None if fit == "cannot be paired" else fit
    assert suggest_strategy(full.config, decoder.config) == expected


def test_unpairable_under_every_strategy_and_bad_layer_lists():
    full = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="vocabulary size"):
        OverFillModel(full, tiny_llama(1, vocab_size=VOCAB + 8), "kv_projection")
    with pytest.raises(ValueError, match="layer indices"):
        OverFillModel(full, subset_decoder(full, [0, 2]), "layer_subset", layers=[0])
    with pytest.raises(ValueError, match="distinct"):
        OverFillModel(full, subset_decoder(full, [0, 2]), "layer_subset", layers=[0, 3])
    with pytest.raises(ValueError, match="kv_projection"):
        OverFillModel(full, tiny_llama(1, num_key_value_heads=1, num_hidden_layers=2), "layer_subset", layers=[0, 2])
    with pytest.raises(ValueError, match="unknown pairing strategy"):
        OverFillModel(full, copy.deepcopy(full), "speculative")
    assert default_layer_map(3, 2) == [0, 2] and default_layer_map(28, 4) == [0, 9, 18, 27]


# ----------------------------------------------------------------------------------------------
# layer_subset and kv_projection
# ----------------------------------------------------------------------------------------------


def test_layer_subset_first_token_and_identity():
    full = tiny_llama(num_hidden_layers=3)
    ref = hf_greedy(full, IDS, 0, 8)
    pair = OverFillModel(full, subset_decoder(full, [0, 2]), "layer_subset", layers=[0, 2])
    out = pair.generate(IDS, max_new_tokens=8)
    assert torch.equal(out.new_tokens[:, 0], ref[:, 7])  # the first token is the full model's
    everything = OverFillModel(full, subset_decoder(full, [0, 1, 2]), "layer_subset", layers=[0, 1, 2])
    assert torch.equal(everything.generate(IDS, max_new_tokens=8).sequences, ref)


def test_layer_subset_from_pruning_record():
    full = tiny_llama(num_hidden_layers=3)
    pair = OverFillModel(full, subset_decoder(full, [0, 2]), "layer_subset", pruning_record={"keep_layers": [0, 2]})
    assert pair.strategy.layers == [0, 2]


def test_kv_projection_identity_init_reproduces_the_full_model():
    full = tiny_llama()
    pair = OverFillModel(full, copy.deepcopy(full), "kv_projection")
    assert all(p.requires_grad for p in pair.strategy.parameters())
    assert torch.equal(pair.generate(IDS, max_new_tokens=8).sequences, hf_greedy(full, IDS, 0, 8))


def test_kv_projection_smaller_decoder_runs_and_trains():
    full = tiny_llama(num_hidden_layers=3)
    decoder = tiny_llama(1, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=6)
    pair = OverFillModel(full, decoder, "kv_projection")
    assert isinstance(pair.strategy, KVProjection) and pair.strategy.layer_map == [0, 2]
    assert pair.strategy.k_proj[0].weight.shape == (6, 16)
    out = pair.generate(IDS, max_new_tokens=5)
    assert out.new_tokens.shape[0] == 3
    pair.train()
    ctx, ctx_mask = pad_sequences(IDS, 0, "left")
    cont, cont_mask = pad_sequences([[4, 5, 6], [7], [8, 9]], 0, "right")
    loss = pair.loss(ctx, cont, ctx_mask, cont_mask)
    loss.backward()
    for p in [*pair.strategy.parameters(), pair.decoder.model.embed_tokens.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in pair.full.parameters())


# ----------------------------------------------------------------------------------------------
# scoring and the training path
# ----------------------------------------------------------------------------------------------


CONTINUATIONS = [[4, 5, 6], [7], [8, 9, 10, 11]]


@torch.no_grad()
def full_model_loglikelihood(full, context, continuation):
    ids = torch.tensor([context + continuation])
    logprobs = torch.log_softmax(full(ids).logits[0].float(), -1)
    rows = logprobs[len(context) - 1 : -1]
    target = torch.tensor(continuation)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_identity_scoring_equals_full_model_loglikelihood():
    full = tiny_llama()
    pair = OverFillModel(full, copy.deepcopy(full))
    # Make one continuation the full model's own greedy one, so is_greedy is True at least once.
    greedy = hf_greedy(full, IDS[:1], 0, 3)[0, len(IDS[0]) :].tolist()
    continuations = [greedy, *CONTINUATIONS[1:]]
    scores = pair.score(IDS, continuations, batch_size=2)
    for (lp, is_greedy), ctx, cont in zip(scores, IDS, continuations):
        ref_lp, ref_greedy = full_model_loglikelihood(full, ctx, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert is_greedy == ref_greedy
    assert scores[0][1] is True


def test_scoring_uses_full_model_for_the_first_token_and_decoder_after():
    full = tiny_llama()
    decoder = tiny_llama(1, hidden_size=16, intermediate_size=32)
    pair = OverFillModel(full, decoder)
    ctx, ctx_mask = pad_sequences(IDS, 0, "left")
    cont, cont_mask = pad_sequences(CONTINUATIONS, 0, "right")
    with torch.no_grad():
        out = pair.forward_continuation(ctx, cont, ctx_mask, cont_mask)
        last = full(torch.tensor([IDS[1]])).logits[0, -1]
    assert out.logits.shape == (3, 4, VOCAB)
    assert torch.allclose(out.logits[1, 0], last, atol=1e-5)
    # Scores equal greedy-consistent generation: a generated continuation is greedy under the pair.
    gen = pair.generate(IDS, max_new_tokens=4, eos_token_id=[95])
    scores = pair.score(IDS, gen.new_tokens.tolist())
    assert all(is_greedy for _, is_greedy in scores)


def test_loss_trains_the_decoder_only_and_refuses_gradient_checkpointing():
    full = tiny_llama()
    pair = OverFillModel(full, tiny_llama(1, hidden_size=16, intermediate_size=32)).train()
    ctx, ctx_mask = pad_sequences(IDS, 0, "left")
    cont, cont_mask = pad_sequences(CONTINUATIONS, 0, "right")
    loss = pair.loss(ctx, cont, ctx_mask, cont_mask)
    loss.backward()
    assert torch.isfinite(loss) and pair.decoder.lm_head.weight.grad is not None
    enable = getattr(pair.decoder, "activation_checkpointing_enable", None) or pair.decoder.gradient_checkpointing_enable
    enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pair.loss(ctx, cont, ctx_mask, cont_mask)


# ----------------------------------------------------------------------------------------------
# persistence
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["shared_kv", "kv_projection"])
def test_save_and_reload_offline(tmp_path, monkeypatch, strategy):
    from overfill_lib.full_model import build_tokenizer

    tok = build_tokenizer()
    src = tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     bos_token_id=tok.bos_token_id)
    src.save_pretrained(tmp_path / "full")
    full = LlamaForCausalLM.from_pretrained(tmp_path / "full").eval()
    decoder = tiny_llama(1, vocab_size=len(tok), hidden_size=16, intermediate_size=32, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    record = {"hidden": 0.5, "intermediate": 0.5}
    pair = OverFillModel(full, decoder, strategy, tokenizer=tok, pruning_record=record)
    if strategy == "kv_projection":  # not the identity any more, so the saved weights must matter
        with torch.no_grad():
            for p in pair.strategy.parameters():
                p.add_(0.05 * torch.randn_like(p))
    prompts = ["abc", "hello there"]
    before = pair.generate(prompts=prompts, max_new_tokens=8)
    pair.save_pretrained(tmp_path / "pair")
    assert (tmp_path / "pair" / "overfill_config.json").is_file()
    assert not list((tmp_path / "pair").glob("*.bin")) and not list((tmp_path / "pair").glob("*.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = OverFillModel.from_pretrained(tmp_path / "pair", dtype="float32")
    assert loaded.strategy_name == strategy and loaded.full_id == str(tmp_path / "full")
    assert loaded.pruning_record == record
    after = loaded.generate(prompts=prompts, max_new_tokens=8)
    assert torch.equal(before.sequences, after.sequences) and before.texts == after.texts


def test_a_saved_pair_refuses_a_different_full_model_and_a_record_of_another_decoder(tmp_path):
    full = tiny_llama()
    full.save_pretrained(tmp_path / "full")
    full = LlamaForCausalLM.from_pretrained(tmp_path / "full").eval()
    decoder = tiny_llama(1, hidden_size=16, intermediate_size=32)
    OverFillModel(full, decoder, full_id=str(tmp_path / "full")).save_pretrained(tmp_path / "pair")
    assert OverFillModel.from_pretrained(tmp_path / "pair").full_id == str(tmp_path / "full")
    # Same KV shapes, other weights at the same path: the full model retrained in place.
    tiny_llama(seed=7).save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="saved with another full model .*retrained or replaced.*check_full=False"):
        OverFillModel.from_pretrained(tmp_path / "pair")
    assert OverFillModel.from_pretrained(tmp_path / "pair", check_full=False) is not None  # paired on purpose
    # In another dtype the weights cannot match exactly: the size is what is checked.
    tiny_llama().save_pretrained(tmp_path / "full")
    assert OverFillModel.from_pretrained(tmp_path / "pair", dtype="bfloat16") is not None
    with pytest.raises(ValueError, match="hidden_size 999 in the record, 16 in the decoder"):
        OverFillModel(full, decoder, pruning_record={"kind": "width", "new": {"hidden_size": 999}})
    with pytest.raises(ValueError, match="width record but lists kept layers"):
        OverFillModel(full, decoder, pruning_record={"kind": "width", "kept": {"layers": [0, 1]}})



@pytest.mark.parametrize("config, message", [
    ([1, 2], r"is not an OverFill config \(a JSON list; expected an object with format 'overfill'"),
    ({"format": "overfill", "full_model": "x"}, r"lacks strategy: restore it, or save the pair again"),
    ({"format": "overfill", "strategy": "shared_kv", "full_model": "x", "strategy_args": [0]},
     r"strategy_args should be a JSON object, not \[0\]"),
], ids=["a list", "no strategy", "strategy_args a list"])
def test_a_damaged_pair_config_is_named_with_what_is_wrong(tmp_path, config, message):
    """A JSON list or a config without its strategy gave AttributeError / KeyError."""
    write_json(tmp_path / "overfill_config.json", config)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'overfill_config.json'}:? .*{message}"):
        OverFillModel.from_pretrained(tmp_path)

def test_dtype_and_device_are_checked_when_the_pair_is_built(tmp_path):
    full = tiny_llama()
    with pytest.raises(ValueError, match="full model is torch.float32 and the decoder torch.bfloat16.*decoder.to"):
        OverFillModel(full, tiny_llama(1, hidden_size=16, intermediate_size=32).to(torch.bfloat16))
    full.save_pretrained(tmp_path / "full")
    OverFillModel(full, tiny_llama(1, hidden_size=16), full_id=str(tmp_path / "full")).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="runtime.dtype 'bf16': write 'bfloat16'"):
        OverFillModel.from_pretrained(tmp_path / "p", dtype="bf16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device; use device='cpu'"):
            OverFillModel.from_pretrained(tmp_path / "p", device="cuda")


def test_from_models_reads_the_pruning_record(tmp_path):
    full = tiny_llama(num_hidden_layers=3)
    full.save_pretrained(tmp_path / "full")
    subset_decoder(full, [0, 2]).save_pretrained(tmp_path / "dec")
    write_json(tmp_path / "dec" / "pruning.json", {"keep_layers": [0, 2]})
    pair = OverFillModel.from_models(tmp_path / "full", tmp_path / "dec")
    assert pair.strategy_name == "layer_subset" and pair.strategy.layers == [0, 2]
    assert pair.pruning_record == {"keep_layers": [0, 2]}


# ----------------------------------------------------------------------------------------------
# with the project's pruning (real pruned decoders and pruning.json records)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pairs_from_pruned_directories(tmp_path, arch):
    from overfill_lib.importance import magnitude_importance
    from overfill_lib.pruning import prune_depth, prune_width, save_pruned
    from tests.tiny_models import tiny_model

    full = tiny_model(arch, num_hidden_layers=3)
    full.save_pretrained(tmp_path / "full")
    ids, mask = pad_sequences(IDS, 0, side="left")
    ref = full.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    importance = magnitude_importance(full)
    # Width pruning keeping everything is the identity: OverFill must equal HF greedy exactly.
    save_pruned(*prune_width(full, importance, hidden=0.0, intermediate=0.0), tmp_path / "same")
    pair = OverFillModel.from_models(tmp_path / "full", tmp_path / "same")
    assert pair.strategy_name == "shared_kv"
    assert torch.equal(pair.generate(IDS, max_new_tokens=6).sequences, ref)
    # A real width-pruned decoder shares the cache; the first token is the full model's.
    save_pruned(*prune_width(full, importance, hidden=0.5, intermediate=0.5), tmp_path / "narrow")
    pair = OverFillModel.from_models(tmp_path / "full", tmp_path / "narrow")
    assert pair.strategy_name == "shared_kv" and pair.pruning_record["kind"] == "width"
    assert torch.equal(pair.generate(IDS, max_new_tokens=6).new_tokens[:, 0], ref[:, len(IDS[0])])
    # Depth pruning: layer_subset is picked from the record.
    save_pruned(*prune_depth(full, [0, 2]), tmp_path / "shallow")
    pair = OverFillModel.from_models(tmp_path / "full", tmp_path / "shallow")
    assert pair.strategy_name == "layer_subset" and pair.strategy.layers == [0, 2]
    assert torch.equal(pair.generate(IDS, max_new_tokens=6).new_tokens[:, 0], ref[:, len(IDS[0])])
