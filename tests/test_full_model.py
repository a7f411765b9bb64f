import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from overfill_lib import artifacts, full_model, pipeline, presets, scoring, tasks, tokens

MICRO = full_model.FullModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=8, steps=6, batch_size=8, learning_rate=3e-3)


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    return tasks.write_suite(tasks.SuiteConfig(n_train=64, n_validation=8, n_test=10), tmp_path_factory.mktemp("suite"))


def test_tokenizer_roundtrip_and_chat_template(tmp_path):
    tok = full_model.build_tokenizer()
    text = "k:17 m:03 ?m\n{}"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    msgs = [{"role": "system", "content": "sort"}, {"role": "user", "content": "321"}]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><|system|>sort<|end|><|user|>321<|end|><|assistant|>"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == rendered
    assert again.eos_token == "<|end|>" and again.padding_side == "left"


def test_encode_example_masks_the_prompt():
    tok = full_model.build_tokenizer()
    ex = tokens.encode_examples(tok, [[{"role": "system", "content": "sort"}, {"role": "user", "content": "21"},
                                       {"role": "assistant", "content": "12"}]])[0]
    answer = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert tok.decode(answer) == "12<|end|>"


def test_training_is_reproducible_and_saves_an_hf_directory(tmp_path, suite_dir):
    rec_a = full_model.train_full_model(MICRO, suite_dir, tmp_path / "a", eval_records=10)
    rec_b = full_model.train_full_model(MICRO, suite_dir, tmp_path / "b", eval_records=10)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert rec_a["test_exact_match"] == rec_b["test_exact_match"]
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training_record.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    record = json.loads((tmp_path / "a" / "training_record.json").read_text())
    assert record["environment"]["torch"] == torch.__version__


def test_reproduce_retrains_the_committed_checkpoint_bit_for_bit(tmp_path):
    """The smoke preset's full model, trained once as 'committed', then reproduced with the same recipe and seed."""
    p = presets.load_preset("smoke", {"workdir": str(tmp_path / "work"), "suite_dir": str(tmp_path / "suite"),
                                      "full_model": {"id": str(tmp_path / "committed")}})
    result = pipeline.reproduce(p)
    assert result["bit_identical"] and result["same_metrics"] and result["max_abs_weight_difference"] == 0.0
    assert Path(result["candidate"]) == p.workdir / "reproduce" / "full_model"
    other = full_model.compare_checkpoints(tmp_path / "committed", _perturbed(tmp_path))
    assert not other["bit_identical"] and other["max_abs_weight_difference"] == pytest.approx(0.5)


def _perturbed(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "perturbed"
    shutil.copytree(tmp_path / "committed", out)
    weights = load_file(out / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.5
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_the_smaller_model_has_half_the_width():
    half = MICRO.narrower(0.5)
    assert (half.hidden_size, half.intermediate_size) == (16, 32)
    assert half.num_key_value_heads == MICRO.num_key_value_heads
    narrow = MICRO.narrower(0.5, heads=True)
    assert (narrow.num_attention_heads, narrow.num_key_value_heads, narrow.head_dim) == (
        MICRO.num_attention_heads // 2, max(1, MICRO.num_key_value_heads // 2), MICRO.head_dim)
    with pytest.raises(ValueError, match="width_ratio"):
        MICRO.narrower(1.5)


def test_committed_full_model_loads_with_auto_classes_and_uses_gqa():
    p = presets.load_preset("tiny")
    path = p.path(p.full_model.id)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    shapes = full_model.cache_shapes(model, tok, "abc")
    head_dim = model.config.head_dim
    assert all(k == (1, model.config.num_key_value_heads, len(tok("abc")["input_ids"]), head_dim) for k in shapes["keys"])
    assert sum(f.stat().st_size for f in path.iterdir()) <= 30 * 2**20


def test_committed_full_model_reaches_target_on_a_test_sample():
    p = presets.load_preset("tiny")
    model, tok = artifacts.load_model(p.path(p.full_model.id))
    test = tasks.load_split(p.suite_dir, "test")[:200]
    assert scoring.exact_match(model, tok, test)["overall"] >= 0.85


def _committed_records():
    p = presets.load_preset("tiny")
    return p, [json.loads((p.path(getattr(p, w).id) / "training_record.json").read_text()) for w in pipeline.MODELS]


def test_committed_full_and_smaller_models_follow_the_preset_recipe():
    p, (full, half) = _committed_records()
    assert full["test_exact_match"]["overall"] >= 0.90
    assert full["recipe"] == asdict(pipeline.model_recipe(p)) and half["recipe"] == asdict(pipeline.model_recipe(p, "smaller"))
    assert full["suite"] == half["suite"] == json.loads((p.suite_dir / "suite.json").read_text())
    assert half["parameters"] < full["parameters"] / 2


def test_committed_smaller_model_is_clearly_weaker_than_the_full_model():
    """The issue asks for a suite where capacity matters: same recipe and seed, half the width, clearly lower."""
    _, (full, half) = _committed_records()
    assert half["test_exact_match"]["overall"] <= full["test_exact_match"]["overall"] - 0.05


def test_broken_files_are_named_with_their_role(tmp_path):
    """A truncated safetensors shard or JSON record is an error naming the file (and the model's role), not a bare
    'incomplete metadata' or JSONDecodeError."""
    from overfill_lib import artifacts
    from overfill_lib.pair import OverFillModel
    from tests.tiny_models import tiny_model

    full, decoder = tiny_model("llama"), tiny_model("llama", hidden_size=32, seed=1)
    full.save_pretrained(tmp_path / "full")
    OverFillModel(full, decoder, full_id=str(tmp_path / "full")).save_pretrained(tmp_path / "pair")
    weights = tmp_path / "full" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"could not load the full model from {tmp_path / 'full'} .*incomplete or damaged"):
        OverFillModel.from_pretrained(tmp_path / "pair")
    record = tmp_path / "pair" / "overfill_config.json"
    record.write_text(record.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{record} is not valid JSON .*written partly"):
        artifacts.read_json(record)


def test_a_load_that_leaves_weights_unset_or_unused_names_them(tmp_path):
    """transformers fills a missing weight with a random init and only logs it; load_causal_lm refuses by name."""
    from safetensors.torch import load_file, save_file

    from tests.tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight_renamed"] = state.pop("model.layers.0.mlp.up_proj.weight")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"the full model in .* does not fit LlamaForCausalLM: missing keys \(1\): "
                                         r"model\.layers\.0\.mlp\.up_proj\.weight; unexpected keys \(1\): .*_renamed"):
        artifacts.load_causal_lm(tmp_path, "full model")


def test_saved_weights_carry_a_digest_that_a_flipped_bit_fails(tmp_path):
    """safetensors has no checksum: a model directory written through atomic_directory records each weight file's
    sha256, and load_causal_lm checks it (a folder without the record, e.g. saved by another tool, loads unchecked)."""
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    with artifacts.atomic_directory(tmp_path / "m") as tmp:
        model.save_pretrained(tmp)
    weights = tmp_path / "m" / "model.safetensors"
    record = artifacts.read_json(tmp_path / "m" / artifacts.WEIGHT_DIGESTS)
    assert record["files"] == {"model.safetensors": artifacts.sha256_of(weights)}
    artifacts.load_causal_lm(tmp_path / "m", "decoder")  # intact: loads
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10  # one bit of one weight, past the header: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{weights} has sha256 [0-9a-f]{{64}}, not the {record['files']['model.safetensors']}"
                                         r" recorded .*damaged or changed"):
        artifacts.load_causal_lm(tmp_path / "m", "decoder")


def test_read_json_of_a_binary_file_names_the_file(tmp_path):
    path = tmp_path / "training_record.json"
    path.write_bytes(b"\x89\xff\x00binary")
    with pytest.raises(ValueError, match=rf"{path} is not a JSON text file"):
        artifacts.read_json(path)
