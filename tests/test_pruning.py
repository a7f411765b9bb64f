"""Width and depth pruning: exactness, save/reload, KV-cache shapes, sizes, records and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, LlamaModel, T5Config

from overfill_lib.generation import returned_cache, with_cache
from overfill_lib.importance import compute_importance, magnitude_importance, random_importance
from overfill_lib.pruning import (
    PruningRecord,
    count_parameters,
    kept_count,
    layers_to_keep,
    load_pruning_record,
    prune_depth,
    prune_width,
    pruned_config,
    save_pruned,
)

try:
    from tests.tiny_models import ARCHITECTURES, VARIANTS, kv_shapes, random_batch, tiny_config, tiny_model, variant_id
except ImportError:  # tests/ itself on sys.path (plain `pytest` without the project root)
    from tiny_models import ARCHITECTURES, VARIANTS, kv_shapes, random_batch, tiny_config, tiny_model, variant_id


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _calibration(model, n=6, seq=12):
    return random_batch(model, batch=n, seq=seq, seed=1).tolist()


# ----------------------------------------------------------------------------------------------
# Exactness


@pytest.mark.parametrize("arch,tied", VARIANTS, ids=variant_id)
def test_keep_everything_reproduces_logits(arch, tied):
    model = tiny_model(arch, tied=tied)
    ids = random_batch(model)
    pruned, record = prune_width(model, random_importance(model, seed=3), hidden=0.0, intermediate=None)
    assert type(pruned) is type(model)
    assert record.new == record.original
    diff = (_logits(model, ids) - _logits(pruned, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    if tied:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    else:
        assert pruned.lm_head.weight is not pruned.model.embed_tokens.weight


@pytest.mark.parametrize("arch,tied", VARIANTS, ids=variant_id)
def test_pruned_model_reloads_identically_and_keeps_kv_shapes(arch, tied, tmp_path):
    model = tiny_model(arch, tied=tied)
    importance = compute_importance(model, _calibration(model), description="random ids", progress=False)
    pruned, record = prune_width(model, importance, hidden=0.5, intermediate=0.5, heads=0.5)
    cfg, new = model.config, pruned.config
    assert (new.hidden_size, new.intermediate_size, new.num_attention_heads) == (24, 40, 2)
    assert (new.num_hidden_layers, new.num_key_value_heads, new.head_dim) == (
        cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    assert record.new["num_parameters"] < record.original["num_parameters"]

    save_pruned(pruned, record, tmp_path / "decoder")
    files = {p.name for p in (tmp_path / "decoder").iterdir()}
    assert "pruning.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "decoder").eval()
    assert type(reloaded) is type(model)
    assert bool(reloaded.config.tie_word_embeddings) == tied

    ids = random_batch(model, batch=2, seq=9, seed=5)
    assert torch.equal(_logits(pruned, ids), _logits(reloaded, ids))
    with torch.no_grad():
        full_cache = returned_cache(model(ids, use_cache=True))
        pruned_cache = returned_cache(reloaded(ids, use_cache=True))
    assert kv_shapes(pruned_cache) == kv_shapes(full_cache)
    assert len(kv_shapes(full_cache)) == cfg.num_hidden_layers

    # The OverFill use: the pruned decoder continues from the full model's prefill cache.
    with torch.no_grad():
        full = model(ids, use_cache=True)
        step = reloaded(ids[:, -1:] * 0 + 5, **with_cache(reloaded, returned_cache(full)), use_cache=True)
    assert step.logits.shape == (2, 1, cfg.vocab_size) and torch.isfinite(step.logits).all()

    loaded = load_pruning_record(tmp_path / "decoder")
    assert loaded.kept == record.kept and loaded.importance["calibration"] == "random ids"
    assert loaded.importance["num_samples"] == 6 and loaded.environment is not None


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruning_neurons_and_heads_equals_masking_them(arch):
    # Removing MLP neurons / query heads must compute exactly what the full model computes with
    # their down_proj / o_proj input columns zeroed: checks that q, o, gate, up, down (and biases)
    # are sliced consistently with each other.
    model = tiny_model(arch)
    importance = random_importance(model, seed=11)
    pruned, record = prune_width(model, importance, intermediate=0.5, heads=2)
    masked = tiny_model(arch)
    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer, inter, heads in zip(masked.model.layers, record.kept["intermediate"], record.kept["heads"]):
            drop = sorted(set(range(model.config.intermediate_size)) - set(inter))
            layer.mlp.down_proj.weight[:, drop] = 0
            for h in set(range(model.config.num_attention_heads)) - set(heads):
                layer.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
    ids = random_batch(model)
    diff = (_logits(masked, ids) - _logits(pruned, ids)).abs().max().item()
    assert diff <= 1e-5, diff
    assert (_logits(model, ids) - _logits(pruned, ids)).abs().max().item() > 1e-3  # something was removed


def test_record_roundtrip_sorted_and_sized(tmp_path):
    model = tiny_model("qwen3")
    pruned, record = prune_width(model, random_importance(model, seed=7), hidden=20, intermediate=0.3, heads=2)
    new = pruned.config
    kept = record.kept
    assert len(kept["hidden"]) == new.hidden_size == 20
    assert kept["hidden"] == sorted(kept["hidden"]) and len(set(kept["hidden"])) == 20
    assert len(kept["intermediate"]) == len(kept["heads"]) == model.config.num_hidden_layers
    for inter, heads in zip(kept["intermediate"], kept["heads"]):
        assert inter == sorted(inter) and len(inter) == new.intermediate_size == 56
        assert heads == sorted(heads) and len(heads) == 2
        assert sorted(h // 2 for h in heads) == [0, 1]  # one query head kept in each KV group
    assert record.request == {"hidden": 20, "intermediate": 0.3, "heads": 2, "round_to": 1}
    assert record.importance["criterion"] == "random" and record.importance["seed"] == 7

    record.save(tmp_path / "r.json")
    again = PruningRecord.load(tmp_path / "r.json")
    assert again == record
    assert json.loads((tmp_path / "r.json").read_text())["original"]["hidden_size"] == 48


def test_kept_indices_follow_importance():
    model = tiny_model("llama")
    importance = random_importance(model, seed=1)
    importance.hidden = torch.arange(48, dtype=torch.float32)  # higher index = more important
    _, record = prune_width(model, importance, hidden=12)
    assert record.kept["hidden"] == list(range(36, 48))


def test_round_to():
    # nearest multiple, halves up, never above the original, at least one multiple
    assert kept_count(0.45, 3072, "hidden", 64) == 1664  # 1689.6 -> 1664 (26.4 multiples)
    assert kept_count(0.45, 8192, "intermediate", 64) == 4480  # 4505.6 -> 4480
    assert kept_count(44, 80, "intermediate", 8) == 48  # 5.5 multiples rounds up
    assert kept_count(0.0, 100, "hidden", 64) == 64  # 128 would exceed the original
    assert kept_count(0.99, 100, "hidden", 8) == 8
    assert kept_count(None, 100, "hidden") == 100 and kept_count(37, 100, "hidden") == 37

    model = tiny_model("mistral")
    pruned, record = prune_width(model, magnitude_importance(model), hidden=0.45, intermediate=0.45, round_to=8)
    assert (pruned.config.hidden_size, pruned.config.intermediate_size) == (24, 48)  # 26.4 -> 24, 44 -> 48
    assert record.request["round_to"] == 8


def test_llama_hidden_stays_a_multiple_of_heads():
    # LlamaConfig validates hidden_size % num_attention_heads == 0; Mistral does not.
    assert pruned_config(tiny_config("llama"), hidden=0.45).hidden_size == 28  # 26.4 -> 28 (multiple of 4)
    assert pruned_config(tiny_config("mistral"), hidden=0.45).hidden_size == 26
    assert pruned_config(tiny_config("llama"), hidden=0.45, heads=2).hidden_size == 26


def test_implicit_head_dim_is_made_explicit():
    # Qwen2 configs may not store head_dim (the model derives hidden_size // heads): the pruned
    # config must pin it, or the decoder's KV heads would shrink with the hidden size.
    model = tiny_model("qwen2", hidden_size=64, head_dim=None)
    assert model.config.hidden_size // model.config.num_attention_heads == 16
    pruned, _ = prune_width(model, random_importance(model), hidden=0.5)
    assert pruned.config.head_dim == 16 and pruned.config.hidden_size == 32
    ids = random_batch(model)
    with torch.no_grad():
        assert kv_shapes(returned_cache(pruned(ids, use_cache=True))) == kv_shapes(
            returned_cache(model(ids, use_cache=True)))


def test_llama_3_2_3b_at_45_percent_has_about_1_2b_params():
    config = LlamaConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    )
    full = count_parameters(config)
    small = pruned_config(config, hidden=0.45, intermediate=0.45)
    n = count_parameters(small)
    print(f"\nLlama-3.2-3B: {full:,} params; h0.45 i0.45 -> hidden {small.hidden_size}, "
          f"intermediate {small.intermediate_size}: {n:,} params")
    assert 3.2e9 < full < 3.25e9
    assert (small.num_hidden_layers, small.num_key_value_heads, small.head_dim) == (28, 8, 128)
    assert small.tie_word_embeddings
    assert 1.2e9 <= n <= 1.3e9


# ----------------------------------------------------------------------------------------------
# Depth


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prune_depth_keep_all_reproduces_logits(arch):
    model = tiny_model(arch, tied=True)
    ids = random_batch(model)
    pruned, record = prune_depth(model, [0, 1])
    assert (_logits(model, ids) - _logits(pruned, ids)).abs().max().item() <= 1e-5
    assert record.kind == "depth" and record.kept == {"layers": [0, 1]}


def test_prune_depth_subset_generates_with_cache():
    model = tiny_model("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    pruned, record = prune_depth(model, [2, 0])
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 2
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    assert record.kept["layers"] == [0, 2]
    assert torch.equal(pruned.model.layers[1].mlp.down_proj.weight, model.model.layers[2].mlp.down_proj.weight)

    ids = random_batch(model, batch=1, seq=6)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = pruned.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **kwargs)
        no_cache = pruned.generate(ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
    assert torch.equal(out.sequences, no_cache)
    assert len(kv_shapes(out.past_key_values)) == 2


def test_layers_to_keep():
    model = tiny_model("llama", num_hidden_layers=4)
    importance = random_importance(model)
    importance.layers = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert layers_to_keep(importance, 2) == [0, 2]
    with pytest.raises(ValueError, match="between 1 and 4"):
        layers_to_keep(importance, 0)


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, random_importance(model)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan")])
def test_ratio_outside_unit_interval(llama, ratio):
    model, importance = llama
    with pytest.raises(ValueError, match=r"outside \[0, 1\).*FRACTION REMOVED"):
        prune_width(model, importance, hidden=ratio)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        prune_width(model, importance, intermediate=ratio)


@pytest.mark.parametrize("size", [0, -3, 49, 10_000])
def test_size_out_of_range(llama, size):
    model, importance = llama
    with pytest.raises(ValueError, match=r"number KEPT and must be between 1 and the model's 48"):
        prune_width(model, importance, hidden=size)


def test_size_wrong_type(llama):
    model, importance = llama
    with pytest.raises(ValueError, match="float in"):
        prune_width(model, importance, hidden="half")
    with pytest.raises(ValueError, match="float in"):
        prune_width(model, importance, hidden=True)


@pytest.mark.parametrize("heads", [0, 3, 5, 6])
def test_heads_break_kv_grouping(llama, heads):
    model, importance = llama
    with pytest.raises(ValueError, match=r"KV grouping.*multiple of num_key_value_heads=2.*\[2, 4\]"):
        prune_width(model, importance, heads=heads)


def test_heads_ratio_removing_whole_groups(llama):
    model, importance = llama
    with pytest.raises(ValueError, match="removes every query head of each KV group"):
        prune_width(model, importance, heads=0.9)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        prune_width(model, importance, heads=1.0)


@pytest.mark.parametrize("round_to", [0, -8, 2.5])
def test_bad_round_to(llama, round_to):
    model, importance = llama
    with pytest.raises(ValueError, match="round_to=.* must be an int >= 1"):
        prune_width(model, importance, hidden=0.5, round_to=round_to)


def test_round_to_larger_than_dimension(llama):
    model, importance = llama
    with pytest.raises(ValueError, match="use a smaller round_to"):
        prune_width(model, importance, hidden=0.5, round_to=64)


def test_not_a_decoder_only_causal_lm(llama):
    with pytest.raises(ValueError, match="'t5' is an encoder-decoder.*decoder-only.*AutoModelForCausalLM"):
        pruned_config(T5Config(), hidden=0.5)
    with pytest.raises(ValueError, match="'bert' is not supported.*llama, mistral, qwen2, qwen3"):
        pruned_config(BertConfig(), hidden=0.5)
    with pytest.raises(ValueError, match="'gpt2' is not supported.*architectures.SUPPORTED"):
        count_parameters(GPT2Config())
    base = LlamaModel(tiny_config("llama"))
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        prune_width(base, llama[1], hidden=0.5)
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        prune_depth(base, [0])


def test_importance_of_another_model(llama):
    model, _ = llama
    other = random_importance(tiny_model("llama", hidden_size=64))
    with pytest.raises(ValueError, match="computed for another model.*compute_importance"):
        prune_width(model, other, hidden=0.5)


@pytest.mark.parametrize("keep", [[], [0, 0], [2], [-1], None, [0.5]])
def test_bad_keep_layers(llama, keep):
    with pytest.raises(ValueError, match=r"keep_layers=.*layer indices in \[0, 2\)"):
        prune_depth(llama[0], keep)


def test_every_architecture_is_registered():
    from overfill_lib.architectures import SUPPORTED

    assert {tiny_config(a).model_type for a in ARCHITECTURES} == set(SUPPORTED)


def test_rounding_that_moves_a_size_is_noted_in_the_record_and_the_log(caplog):
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    scores = magnitude_importance(model)
    with caplog.at_level("INFO", logger="overfill_lib.pruning"):
        pruned, record = prune_width(model, scores, hidden=0.5, intermediate=None, round_to=48)
    assert pruned.config.hidden_size == 48 and pruned.config.intermediate_size == 96
    assert any("hidden: 32 of 64 asked (50% removed), 48 kept (25% removed)" in n for n in record.notes)
    assert any("intermediate: 128 of 128 asked (0% removed), 96 kept" in n for n in record.notes)
    assert sum("after rounding to a multiple of 48" in r.message for r in caplog.records) == 2
    _, exact = prune_width(model, scores, hidden=0.5, intermediate=0.5, round_to=1)
    assert exact.notes == []


def test_pruning_an_int8_model_is_refused():
    """Importance computed on the float model, applied to its int8 copy: prune_width died in an AttributeError."""
    from overfill_lib.quantize import quantize_int8

    model = tiny_model("llama")
    imp = magnitude_importance(model)
    quantize_int8(model)
    with pytest.raises(ValueError, match="quantized weights .*prune the float model, then quantize the pruned decoder"):
        prune_width(model, imp, hidden=0.5)
    with pytest.raises(ValueError, match="quantized weights"):
        prune_depth(model, [0])
