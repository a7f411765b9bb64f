"""OverFill generation: identity with HF generate, batching, sampling, stop strings, streaming, refresh.

Models are tiny random fp32 models built inline (hidden 32, 2 layers), so the file runs in seconds
on CPU. The ``case`` fixture yields (full model, tokenizer or None, prompts); add a case to
``CASES`` (e.g. the project's trained full model) to run the identity checks on it too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TextIteratorStreamer,
)

from overfill_lib.generation import encode_chat, pad_sequences, with_cache
from overfill_lib.pair import OverFillModel

torch.set_num_threads(1)
VOCAB = 96
IDS = [[5, 17, 33, 9, 41, 12, 60], [7, 8, 9], [70, 3, 22, 45, 11]]  # different lengths -> left padding
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
]


def tiny_llama(seed: int = 0, vocab: int = VOCAB, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval()


def pruned_like(full, seed: int = 1) -> LlamaForCausalLM:
    """A width-'pruned' decoder with random weights: narrower hidden/MLP, same layers, KV heads, head_dim."""
    return tiny_llama(seed, vocab=full.config.vocab_size, hidden_size=16, intermediate_size=32,
                      pad_token_id=full.config.pad_token_id, eos_token_id=full.config.eos_token_id,
                      bos_token_id=full.config.bos_token_id)


def subset_decoder(full, keep: list[int]):
    """A depth-pruned decoder: copies of the full model's layers ``keep``, renumbered for the cache."""
    dec = copy.deepcopy(full)
    dec.model.layers = torch.nn.ModuleList(dec.model.layers[i] for i in keep)
    for j, layer in enumerate(dec.model.layers):
        layer.self_attn.layer_idx = j
    dec.config.num_hidden_layers = len(keep)
    if getattr(dec.config, "layer_types", None):
        dec.config.layer_types = [dec.config.layer_types[i] for i in keep]
    return dec


def char_tokenizer():
    from overfill_lib.full_model import build_tokenizer

    return build_tokenizer()


def char_llama(tok, seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(seed, vocab=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)


@dataclass
class Case:
    full: torch.nn.Module
    tokenizer: object | None
    prompts: list[list[int]]


def _llama_case():
    return Case(tiny_llama(), None, IDS)


def _qwen2_case():
    return Case(tiny_qwen2(), None, IDS)


def _char_llama_case():
    tok = char_tokenizer()
    enc = encode_chat(tok, CONVERSATIONS)
    prompts = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    return Case(char_llama(tok), tok, prompts)


def _shared_tiny_case(arch: str):
    """A model from the project's shared tiny-model builders (O(1)-scale random weights)."""

    def build():
        from tests.tiny_models import tiny_model

        return Case(tiny_model(arch), None, IDS)

    return build


def _tiny_full_model_case():
    """The project's committed, trained full model on suite prompts of different lengths."""
    from overfill_lib import artifacts, presets, tasks

    preset = presets.load_preset("tiny")
    full, tok = artifacts.load_model(preset.path(preset.full_model.id))
    records = tasks.first_per_family(tasks.load_split(preset.suite_dir, "test"), 1)
    enc = encode_chat(tok, [r["messages"][:-1] for r in records])
    prompts = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    return Case(full, tok, prompts)


CASES = {
    "tiny_full_model": _tiny_full_model_case,
    "llama": _llama_case,
    "qwen2": _qwen2_case,
    "char_llama": _char_llama_case,
    "mistral": _shared_tiny_case("mistral"),
    "qwen3": _shared_tiny_case("qwen3"),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]()


def hf_greedy(full, prompts, pad_id, max_new_tokens, **kw) -> torch.Tensor:
    ids, mask = pad_sequences(prompts, pad_id, side="left")
    return full.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, **kw)


# ----------------------------------------------------------------------------------------------
# identity: decoder = copy of the full model
# ----------------------------------------------------------------------------------------------


def test_identity_matches_hf_generate(case):
    pair = OverFillModel(case.full, copy.deepcopy(case.full))
    pad = case.full.config.pad_token_id
    ref = hf_greedy(case.full, case.prompts, pad, 10)
    out = pair.generate(case.prompts, max_new_tokens=10, tokenizer=case.tokenizer)
    assert torch.equal(out.sequences, ref)
    assert out.new_tokens.shape[1] == out.timings.steps
    # Again with an eos the model actually emits mid-way, so the eos/pad path is exercised too.
    eos = int(ref[0, -6])
    ref = hf_greedy(case.full, case.prompts, pad, 10, eos_token_id=eos)
    out = pair.generate(case.prompts, max_new_tokens=10, eos_token_id=eos, tokenizer=case.tokenizer)
    assert torch.equal(out.sequences, ref)
    assert out.finish_reasons[0] == "eos"


def test_identity_chat_template_text_path():
    tok = char_tokenizer()
    full = char_llama(tok)
    pair = OverFillModel(full, copy.deepcopy(full), tokenizer=tok)
    out = pair.chat(CONVERSATIONS, max_new_tokens=12)
    batch = tok.apply_chat_template(CONVERSATIONS, add_generation_prompt=True, padding=True, return_dict=True,
                                    return_tensors="pt")
    ref = full.generate(**batch, max_new_tokens=12, do_sample=False)
    assert torch.equal(out.sequences, ref)
    ref_texts = tok.batch_decode(ref[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.texts == ref_texts


# ----------------------------------------------------------------------------------------------
# non-identity pair: batching, sampling
# ----------------------------------------------------------------------------------------------


def test_batched_equals_single_prompts():
    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    batched = pair.generate(IDS, max_new_tokens=8)
    for row, prompt in enumerate(IDS):
        alone = pair.generate([prompt], max_new_tokens=8).new_tokens[0]
        n = alone.shape[0]
        assert torch.equal(batched.new_tokens[row, :n], alone)
        assert (batched.new_tokens[row, n:] == full.config.pad_token_id).all()


def test_inputs_that_would_give_wrong_tokens_are_refused_in_every_path(caplog):
    """Right padding (a row whose last position is padding would continue from a pad), a row with no real token, an
    empty batch and a non-positive max_new_tokens: refused by plain and fast generation, scoring and the loss."""
    from overfill_lib.fast_decode import FastGenerator

    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    fast = FastGenerator(full, pair.decoder, compile=False)
    right, right_mask = pad_sequences(IDS, 0, side="right")
    left, left_mask = pad_sequences(IDS, 0, side="left")
    for run in (lambda i, m: pair.generate(i, m, max_new_tokens=4), lambda i, m: fast.generate(i, m, max_new_tokens=4)):
        with pytest.raises(ValueError, match=r"prompt row\(s\) \[1, 2\] are not left-padded.*padding_side = 'left'"):
            run(right, right_mask)
        empty_row = left_mask.clone()
        empty_row[1] = 0
        with pytest.raises(ValueError, match=r"prompt row\(s\) \[1\] have no real token"):
            run(left, empty_row)
    with pytest.raises(ValueError, match="no prompts to run"):
        pair.generate([], max_new_tokens=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            pair.generate(IDS, max_new_tokens=bad)
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            fast.generate(left, left_mask, max_new_tokens=bad)
    cont, cont_mask = pad_sequences([[4, 5], [6]], 0, side="left")  # continuations must be right-padded
    with pytest.raises(ValueError, match=r"continuation row\(s\) \[1\] are not right-padded"):
        pair.loss(left[:2], cont, left_mask[:2], cont_mask)
    with pytest.raises(ValueError, match="context row.*not left-padded"):
        pair.forward_continuation(right[:2], cont, right_mask[:2], torch.ones_like(cont))
    # Longer than the position table: warned about once.
    short = OverFillModel(tiny_llama(max_position_embeddings=8), pruned_like(full))
    with caplog.at_level("WARNING", logger="overfill_lib.generation"):
        short.generate([list(range(3, 13))], max_new_tokens=1)
        short.generate([list(range(3, 13))], max_new_tokens=1)
    assert sum("exceed the model's 8 positions" in r.message for r in caplog.records) == 1


def test_sampling_is_reproducible_with_a_seed():
    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = pair.generate(IDS, seed=123, **kw).sequences
    b = pair.generate(IDS, seed=123, **kw).sequences
    c = pair.generate(IDS, generator=torch.Generator().manual_seed(123), **kw).sequences
    assert torch.equal(a, b) and torch.equal(a, c)
    others = [pair.generate(IDS, seed=s, **kw).sequences for s in (1, 2)]
    assert any(not torch.equal(a, o) for o in others)
    torch.manual_seed(7)
    d = pair.generate(IDS, **kw).sequences
    torch.manual_seed(7)
    assert torch.equal(d, pair.generate(IDS, **kw).sequences)


def test_unknown_generation_argument_is_refused():
    full = tiny_llama()
    pair = OverFillModel(full, copy.deepcopy(full))
    with pytest.raises(TypeError, match="unknown generation arguments"):
        pair.generate(IDS, max_new_tokens=2, not_an_option=3)


# ----------------------------------------------------------------------------------------------
# stop strings, eos, streaming, timings
# ----------------------------------------------------------------------------------------------


def _char_pair():
    tok = char_tokenizer()
    full = char_llama(tok)
    return OverFillModel(full, pruned_like(full), tokenizer=tok), tok


def test_stop_strings_and_eos_are_trimmed():
    pair, tok = _char_pair()
    conv = CONVERSATIONS[:1]
    # Special tokens are suppressed so the random model writes plain characters (and the processor is exercised).
    plain = dict(max_new_tokens=16, suppress_tokens=tok.all_special_ids)
    free = pair.chat(conv, **plain)
    text = free.texts[0]
    assert len(text) == 16 and free.finish_reasons == ["length"], text
    stop = text[4:6]
    cut = text.find(stop)
    stopped = pair.chat(conv, stop_strings=[stop, "never-there"], **plain)
    assert stopped.texts[0] == text[:cut]
    assert stopped.finish_reasons == ["stop"]
    # eos: take the token at new position 5 as eos; the text ends right before its first occurrence.
    new = free.new_tokens[0].tolist()
    eos = new[5]
    first = new.index(eos)
    ended = pair.chat(conv, eos_token_id=[eos, tok.eos_token_id], **plain)
    assert ended.finish_reasons == ["eos"]
    assert ended.new_tokens.shape[1] == first + 1
    assert ended.texts[0] == tok.decode(new[:first], skip_special_tokens=True)


def test_streaming_yields_the_returned_text():
    pair, tok = _char_pair()
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = pair.chat(CONVERSATIONS[:1], max_new_tokens=12, streamer=streamer, suppress_tokens=tok.all_special_ids)
    assert len(out.texts[0]) == 12
    assert "".join(streamer) == out.texts[0]
    with pytest.raises(ValueError, match="batch size 1"):
        pair.chat(CONVERSATIONS, max_new_tokens=2, streamer=TextIteratorStreamer(tok))


def test_timings_and_counts():
    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    out = pair.generate(IDS, max_new_tokens=6, eos_token_id=[95])
    t = out.timings
    assert t.batch_size == 3 and t.prompt_length == 7 and t.prompt_tokens == sum(map(len, IDS))
    assert t.steps == out.new_tokens.shape[1] and t.decode_steps == t.steps - 1
    assert t.prefill_s > 0 and t.decode_s > 0 and t.per_token_decode_s == pytest.approx(t.decode_s / t.decode_steps)
    assert set(t.to_dict()) >= {"prefill_s", "decode_s", "per_token_decode_s", "new_tokens", "refreshes"}


# ----------------------------------------------------------------------------------------------
# prefill refresh
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def decoder_reads_full_kv_reference(full, decoder, prompt, max_new_tokens, eos):
    """Independent reference for refresh N=1: each step the full model computes the KV of the whole
    sequence but the newest token, and the decoder predicts the next token from that cache + the newest."""
    seq = list(prompt)
    new = [int(full(torch.tensor([seq])).logits[0, -1].argmax())]
    while len(new) < max_new_tokens and new[-1] != eos:
        context = seq + new[:-1]
        cache = DynamicCache(config=full.config)
        full(torch.tensor([context]), **with_cache(full, cache), use_cache=True)
        logits = decoder(torch.tensor([[new[-1]]]), position_ids=torch.tensor([[len(context)]]),
                         **with_cache(decoder, cache), use_cache=True).logits
        new.append(int(logits[0, -1].argmax()))
    return new


def test_refresh_every_token_matches_decoder_reading_full_kv():
    full = tiny_llama()
    decoder = pruned_like(full)
    pair = OverFillModel(full, decoder)
    out = pair.generate(IDS, max_new_tokens=8, refresh_every=1)
    plain = pair.generate(IDS, max_new_tokens=8)
    eos = full.config.eos_token_id
    for row, prompt in enumerate(IDS):
        ref = decoder_reads_full_kv_reference(full, decoder, prompt, 8, eos)
        assert out.new_tokens[row, : len(ref)].tolist() == ref
    assert out.timings.refreshes == out.timings.decode_steps - 1
    # The refreshed cache is not the decoder's own: the outputs should differ somewhere.
    assert not torch.equal(out.sequences, plain.sequences)


@pytest.mark.parametrize("strategy", ["shared_kv", "kv_projection"])
def test_refresh_with_identity_pair_is_exact(strategy):
    """With decoder = full, refreshed KV equals what was there, so output equals HF greedy (bookkeeping check)."""
    full = tiny_llama()
    pair = OverFillModel(full, copy.deepcopy(full), strategy)
    ref = hf_greedy(full, IDS, 0, 9)
    out = pair.generate(IDS, max_new_tokens=9, refresh_every=3)
    assert torch.equal(out.sequences, ref)
    assert out.timings.refreshes == 2


def test_refresh_runs_for_layer_subset():
    full = tiny_llama(num_hidden_layers=3)
    pair = OverFillModel(full, subset_decoder(full, [0, 2]), "layer_subset", layers=[0, 2])
    out = pair.generate(IDS, max_new_tokens=7, refresh_every=2)
    assert out.timings.refreshes >= 1 and out.new_tokens.shape[1] >= 1


# ----------------------------------------------------------------------------------------------
# bad inputs: one rule for both generation paths, clear errors instead of cryptic or silent ones
# ----------------------------------------------------------------------------------------------


def _emitting_eos_pair():
    """A pair and its fast generator whose models' own eos is a token they emit within 8 steps (so stopping shows)."""
    from overfill_lib.fast_decode import FastGenerator

    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    free = pair.generate(IDS, max_new_tokens=8, eos_token_id=[]).new_tokens
    for model in (full, pair.decoder):
        model.generation_config.eos_token_id = int(free[0, 2])
    return pair, FastGenerator(full, pair.decoder, compile=False)


def test_eos_token_id_means_the_same_on_both_generation_paths():
    """None and [] never stop (as eos_token_id=None given to HF generate), 'default' and no argument stop at the model's
    own eos; both paths agree token for token. A string id or a float is refused, never split into digits or rounded."""
    pair, fast = _emitting_eos_pair()
    left, mask = pad_sequences(IDS, 0, side="left")
    runs = {"plain": lambda **kw: pair.generate(left, mask, max_new_tokens=8, **kw),
            "fast": lambda **kw: fast.generate(left, mask, max_new_tokens=8, **kw)}
    out = {(path, str(eos)): run(**({} if eos == "absent" else {"eos_token_id": eos}))
           for path, run in runs.items() for eos in ("absent", "default", None, [])}
    for path in runs:
        never, default = out[path, "[]"], out[path, "default"]
        assert torch.equal(out[path, "None"].new_tokens, never.new_tokens)
        assert never.finish_reasons == ["length"] * 3 and never.new_tokens.shape[1] == 8
        assert torch.equal(out[path, "absent"].new_tokens, default.new_tokens) and default.finish_reasons[0] == "eos"
    for eos in ("absent", "default", "None", "[]"):
        assert torch.equal(out["plain", eos].new_tokens, out["fast", eos].new_tokens)
    for run in runs.values():
        with pytest.raises(ValueError, match=r"eos_token_id='60' is a string \(the id 60\?\).*integer id"):
            run(eos_token_id="60")
        for bad in (2.0, True, [1, -3]):
            with pytest.raises(ValueError, match=r"eos_token_id=.*is not a token id"):
                run(eos_token_id=bad)


@pytest.mark.parametrize("bad, message", [
    ([[5, 17, VOCAB]], (rf"input_ids hold token id {VOCAB} \(row 0, position 2\), outside this model's vocabulary "
                        rf"of {VOCAB} ids.*tokenizer")),
    ([[5, -1, 9]], r"input_ids hold token id -1 \(row 0, position 1\).*pad_token_id.*attention_mask"),
    ([[5, 2.5, 9]], r"input_ids row 0 holds 2.5 \(float\): token ids are integers"),
    (torch.tensor([[5.0, 7.0]]), r"input_ids is a torch.float32 tensor: token ids are integers.*torch.long"),
])
def test_bad_token_ids_are_refused_by_name_in_every_path(bad, message):
    from overfill_lib.fast_decode import FastGenerator

    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    fast = FastGenerator(full, pair.decoder, compile=False)
    with pytest.raises(ValueError, match=message):
        pair.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        fast.generate(bad, max_new_tokens=2)
    if not torch.is_tensor(bad):
        with pytest.raises(ValueError, match=message.replace("input_ids", "contexts")):
            pair.score(bad, [[4]])
        with pytest.raises(ValueError, match=message.replace("input_ids", "continuations")):
            pair.score([[4]], bad)


def test_score_batch_size_and_numpy_integers():
    import numpy as np

    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    contexts, continuations = IDS, [[4, 5], [6], [7, 8, 9]]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {bad!r}"):
            pair.score(contexts, continuations, batch_size=bad)
    by_two = pair.score(contexts, continuations, batch_size=2)
    assert pair.score(contexts, continuations, batch_size=np.int64(2)) == by_two
    numpy_ids = [np.array(c, dtype=np.int64) for c in contexts]
    assert pair.score(numpy_ids, continuations) == pair.score(contexts, continuations)
    # numpy integers count as integers (as Python ints do); bools and floats stay refused (the test above)
    assert torch.equal(pair.generate(IDS, max_new_tokens=np.int64(3)).sequences,
                       pair.generate(IDS, max_new_tokens=3).sequences)


def test_top_p_outside_0_1_is_refused():
    full = tiny_llama()
    pair = OverFillModel(full, pruned_like(full))
    for bad in (1.5, 0.0, -0.1):
        with pytest.raises(ValueError, match=rf"top_p={bad} is outside \(0, 1\]"):
            pair.generate(IDS, max_new_tokens=2, do_sample=True, top_p=bad, seed=0)
    pair.generate(IDS, max_new_tokens=2, do_sample=True, top_p=1.0, seed=0)


def test_generation_past_the_position_table_is_warned_about_in_both_paths(monkeypatch, caplog):
    """An over-long prompt is warned about (test above); so is a prompt that fits but whose new tokens run past."""
    from overfill_lib import generation
    from overfill_lib.fast_decode import FastGenerator

    monkeypatch.setattr(generation, "_warned_positions", set())
    full = tiny_llama(max_position_embeddings=12)
    pair = OverFillModel(full, pruned_like(full))
    fast = FastGenerator(full, pair.decoder, compile=False)
    with caplog.at_level("WARNING", logger="overfill_lib.generation"):
        pair.generate(IDS, max_new_tokens=6, eos_token_id=[])  # the last new token is never fed: 7 + 6 - 1 = 12 fit
        assert not caplog.records
        pair.generate(IDS, max_new_tokens=8, eos_token_id=[])
        fast.generate(IDS, max_new_tokens=8, eos_token_id=[])
    (record,) = caplog.records  # once per position table, as for over-long prompts
    assert ("prompts of up to 7 tokens plus max_new_tokens=8 need 14 positions, more than the model's 12 "
            "(max_position_embeddings)" in record.getMessage())
    monkeypatch.setattr(generation, "_warned_positions", set())
    with caplog.at_level("WARNING", logger="overfill_lib.generation"):
        fast.generate(IDS, max_new_tokens=8, eos_token_id=[])
    assert len(caplog.records) == 2
