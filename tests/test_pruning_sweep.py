"""Pruning sweeps, reply loss, decode bytes, preset calibration and importance reuse (notebook 01's library)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from overfill_lib import architectures as arch
from overfill_lib import full_model, importance, pipeline, presets, pruning, tasks, tokens

try:
    from tests.tiny_models import tiny_model
except ImportError:  # tests/ itself on sys.path (plain `pytest` without the project root)
    from tiny_models import tiny_model

SUITE = tasks.SuiteConfig(n_train=24, n_validation=10, n_test=5)


@pytest.fixture(scope="module")
def tokenizer():
    return full_model.build_tokenizer()


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    return tasks.write_suite(SUITE, tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def validation(suite_dir):
    return tasks.load_split(suite_dir, "validation")


def _model(tokenizer, tied=True, seed=0):
    return tiny_model("llama", tied=tied, seed=seed, vocab_size=len(tokenizer))


def _preset(tmp_path, suite_dir, **calibration):
    return presets.load_preset("smoke", {"workdir": str(tmp_path / "work"), "suite_dir": str(suite_dir),
                                         "calibration": {"samples": 12, "batch_size": 5, **calibration}})


# ----------------------------------------------------------------------------------------------
# reply loss


def test_reply_loss_is_the_mean_over_reply_tokens_whatever_the_batching(tokenizer, validation):
    model = _model(tokenizer)
    # Independent reference: one example at a time, cross-entropy of the reply tokens computed by hand.
    total, count = 0.0, 0
    for row in tokens.encode_examples(tokenizer, [r["messages"] for r in validation]):
        ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        keep = labels[1:] != -100
        total += float(F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))
        count += int(keep.sum())
    expected = total / count
    for batch_size in (1, 3, 64):
        assert pruning.reply_loss(model, tokenizer, validation, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    assert not model.training
    with pytest.raises(ValueError, match="at least one record"):
        pruning.reply_loss(model, tokenizer, [])


# ----------------------------------------------------------------------------------------------
# the sweep


def test_sweep_one_row_per_criterion_and_ratio(tokenizer, suite_dir, validation, tmp_path):
    model = _model(tokenizer)
    imps = pipeline.channel_importance(_preset(tmp_path, suite_dir), model, tokenizer, progress=False,
                                       layer_skip_loss=False)
    ratios = [0.0, 0.25, 0.5]
    calls = []

    def evaluate(m):
        calls.append(m.config.hidden_size)
        return {"loss": pruning.reply_loss(m, tokenizer, validation)}

    table = pruning.sweep(model, imps, ratios, evaluate, dtype_bytes=4, progress=False)
    assert len(table) == len(calls) == 3 * len(ratios)
    assert sorted(zip(table.criterion, table.ratio)) == sorted((c, r) for c in imps for r in ratios)
    assert table["loss"].map(math.isfinite).all()
    unpruned = pruning.reply_loss(model, tokenizer, validation)
    for criterion, rows in table.groupby("criterion"):
        rows = rows.sort_values("ratio")
        # ratio 0 keeps every unit: the unpruned model's loss exactly (up to float summation order)
        assert rows.iloc[0]["loss"] == pytest.approx(unpruned, rel=1e-5), criterion
        assert rows.iloc[0]["parameters"] == sum(p.numel() for p in model.parameters())
        assert rows["parameters"].is_monotonic_decreasing and rows["parameters"].nunique() == len(ratios)
        assert (rows["hidden_size"] % model.config.num_attention_heads == 0).all()  # Llama's constraint holds
    # every criterion gives the same sizes at a ratio; only which units are kept differs
    assert table.groupby("ratio")["parameters"].nunique().eq(1).all()
    assert (table["decode_bytes"] == table["parameters"] * 4).all()  # tied: every parameter is read once
    assert (table.loc[table.ratio > 0].groupby("ratio")["loss"].nunique() > 1).all()

    heads = pruning.sweep(model, {"activation": imps["activation"]}, [0.25], evaluate, heads=0.5, progress=False)
    assert heads.iloc[0]["num_attention_heads"] == model.config.num_attention_heads // 2


def test_sweep_refuses_bad_input(tokenizer):
    model = _model(tokenizer)
    imp = importance.random_importance(model)
    ok = lambda m: {"loss": 1.0}  # noqa: E731
    with pytest.raises(ValueError, match=r"fractions removed in \[0, 1\)"):
        pruning.sweep(model, {"random": imp}, [0.5, 1.0], ok)
    with pytest.raises(ValueError, match=r"fractions removed"):
        pruning.sweep(model, {"random": imp}, [], ok)
    with pytest.raises(ValueError, match="map a name to an Importance"):
        pruning.sweep(model, {}, [0.5], ok)
    with pytest.raises(ValueError, match="dict of numbers"):
        pruning.sweep(model, {"random": imp}, [0.5], lambda m: 1.0, progress=False)


# ----------------------------------------------------------------------------------------------
# decode bytes and exact sizes


def _llama_params(c) -> int:
    """Parameters of a bias-free Llama, counted by hand from its shape (independent of transformers)."""
    h, i, hd = c.hidden_size, c.intermediate_size, c.head_dim
    attn = h * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attn + 3 * h * i + 2 * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return c.vocab_size * h + c.num_hidden_layers * per_layer + h + head


def test_paper_decoder_sizes():
    spec = presets.load_preset("llama-3.2-3b")["decoder"]
    report = pruning.size_report(arch.published_config("llama-3.2-3b"), hidden=spec["hidden"],
                                 intermediate=spec["intermediate"], round_to=spec["round_to"], dtype_bytes="bfloat16")
    new = report["pruned"]
    assert report["original"]["num_parameters"] == _llama_params(arch.published_config("llama-3.2-3b"))
    assert new["hidden_size"] % 24 == 0 and new["hidden_size"] % 8 == 0 and new["intermediate_size"] % 8 == 0
    assert abs(new["hidden_size"] - 0.55 * 3072) <= 12 and abs(new["intermediate_size"] - 0.55 * 8192) <= 4
    assert (new["num_key_value_heads"], new["head_dim"], new["num_hidden_layers"]) == (8, 128, 28)
    assert new["decode_bytes"] == 2 * new["num_parameters"]  # tied
    assert report["notes"]  # the hidden size had to be rounded to a multiple of the head count
    eight = pruning.size_report(arch.published_config("llama-3.1-8b"), hidden=2432, intermediate=7680)
    assert round(eight["pruned"]["num_parameters"] / 1e9, 1) == 3.2  # the rebuttal's 8B -> 3B decoder
    with pytest.raises(ValueError, match="no published shape"):
        arch.published_config("gpt-5")


# ----------------------------------------------------------------------------------------------
# calibration data and importance reuse


def test_suite_calibration_renders_conversations(tokenizer, suite_dir):
    ids, description = importance.calibration_samples({"source": "suite", "samples": 4}, tokenizer,
                                                      suite_dir=suite_dir)
    records = tasks.load_split(suite_dir, "train")[:4]
    assert len(ids) == 4 and "4 conversations" in description
    assert tokenizer.decode(ids[0]) == tokenizer.apply_chat_template(records[0]["messages"], tokenize=False)
    assert ids[0].count(tokenizer.bos_token_id) == 1
    cut, _ = importance.calibration_samples({"source": "suite", "samples": 4, "seq_len": 7}, tokenizer,
                                            suite_dir=suite_dir)
    assert [len(x) for x in cut] == [7] * 4 and cut[0] == ids[0][:7]


def test_text_calibration_reads_local_files_only(tokenizer, tmp_path, monkeypatch):
    text = "".join(f" line {i} of some text\n" for i in range(40))
    (tmp_path / "train.txt").write_text(text)
    ids, _ = importance.calibration_samples({"source": "wikitext", "path": str(tmp_path), "samples": 3,
                                             "seq_len": 16}, tokenizer)
    assert [len(x) for x in ids] == [16, 16, 16]
    assert sum(ids, []) == tokenizer(text, add_special_tokens=False)["input_ids"][:48]  # consecutive windows
    with pytest.raises(FileNotFoundError, match="calibration.path"):
        importance.calibration_samples({"source": "wikitext", "path": str(tmp_path / "nope")}, tokenizer)

    # the hub layout: <subset>/{train,test}-*.parquet with a "text" column; only the train files are read
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path / "wikitext-2-raw-v1"
    hub.mkdir()
    pq.write_table(pa.table({"text": ["", " = Title = \n", " some train words here\n"] * 8}), hub / "train-0.parquet")
    pq.write_table(pa.table({"text": ["test only " * 50]}), hub / "test-0.parquet")
    ids, description = importance.calibration_samples({"source": "wikitext", "path": str(hub), "samples": 2,
                                                       "seq_len": 20}, tokenizer)
    assert [len(x) for x in ids] == [20, 20] and "test only" not in tokenizer.decode(sum(ids, []))
    assert tokenizer.decode(ids[0]) == " = Title = \n some tr"  # empty lines skipped, texts concatenated

    import huggingface_hub

    def not_cached(*args, **kwargs):
        assert kwargs.get("local_files_only") is True  # never the network
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(FileNotFoundError, match="not in the local hub cache.*calibration.path"):
        importance.calibration_samples({"source": "wikitext"}, tokenizer)
    with pytest.raises(ValueError, match="unknown calibration source 'c4'"):
        importance.calibration_samples({"source": "c4"}, tokenizer)
    with pytest.raises(ValueError, match="calibration: unknown keys \\[.sample.\\]; valid keys: source, samples"):
        importance.calibration_samples({"source": "suite", "sample": 3}, tokenizer)
    with pytest.raises(ValueError, match="samples=0 must be a positive int"):
        importance.calibration_samples({"source": "suite", "samples": 0}, tokenizer)


def test_channel_importance_is_saved_and_reused_for_the_same_weights(tokenizer, suite_dir, tmp_path):
    model = _model(tokenizer)
    preset = _preset(tmp_path, suite_dir)
    first = pipeline.channel_importance(preset, model, tokenizer, progress=False)
    act = first["activation"]
    assert act.num_samples == 12 and act.layers_skip_loss is not None
    torch.testing.assert_close(act.hidden, act.hidden_per_layer.sum(0))  # per-layer parts add up to the score
    mag = first["magnitude"]  # the embedding's share belongs to no layer, so the layers hold less than the total
    assert (mag.hidden_per_layer.square().sum(0) <= mag.hidden.square() * (1 + 1e-5)).all()
    stamp = (tmp_path / "work/importance/activation/importance.safetensors").stat().st_mtime_ns
    again = pipeline.channel_importance(preset, model, tokenizer, progress=False)
    assert (tmp_path / "work/importance/activation/importance.safetensors").stat().st_mtime_ns == stamp
    for name in first:
        assert torch.equal(again[name].hidden, first[name].hidden)
    assert torch.equal(again["activation"].hidden_per_layer, act.hidden_per_layer)

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # other weights: scores must be recomputed, not reused
    changed = pipeline.channel_importance(preset, model, tokenizer, criteria=["magnitude"], progress=False)
    assert changed["magnitude"].extra["request"]["weights"] != mag.extra["request"]["weights"]
    assert not torch.equal(changed["magnitude"].hidden, mag.hidden)


def test_rank_agreement():
    a = importance.random_importance(tiny_model("llama"), seed=1)
    b = importance.random_importance(tiny_model("llama"), seed=2)
    flipped = importance.Importance(hidden=-a.hidden, intermediate=-a.intermediate, heads=-a.heads, layers=a.layers,
                                    criterion="flipped", model_type="llama")
    table = importance.rank_agreement({"a": a, "a again": a, "flipped": flipped, "b": b})
    assert table.loc["a vs a again"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert table.loc["a vs flipped"].tolist() == pytest.approx([-1.0, -1.0, -1.0])
    assert abs(table.loc["a vs b", "intermediate (mean over layers)"]) < 0.5


def test_layer_ablation_drops_each_layer_once(tokenizer, validation):
    model = _model(tokenizer)
    table = pruning.layer_ablation(model, lambda m: {"layers": m.config.num_hidden_layers,
                                                     "loss": pruning.reply_loss(m, tokenizer, validation[:4])},
                                   progress=False)
    n = model.config.num_hidden_layers
    assert table["dropped_layer"].tolist() == list(range(n)) and (table["layers"] == n - 1).all()
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert (table["parameters"] == sum(p.numel() for p in model.parameters()) - per_layer).all()
    assert table["loss"].map(math.isfinite).all() and table["loss"].nunique() == n
