"""Importance scores: hooks, padding, aggregation definitions, criteria, persistence and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaModel

from overfill_lib.importance import (
    Importance,
    activation_importance,
    calibration_batches,
    compute_importance,
    magnitude_importance,
    random_importance,
)

try:
    from tests.tiny_models import ARCHITECTURES, random_batch, tiny_config, tiny_model
except ImportError:  # tests/ itself on sys.path (plain `pytest` without the project root)
    from tiny_models import ARCHITECTURES, random_batch, tiny_config, tiny_model


def _samples(model, lengths=(12, 7, 10, 4), seed=1) -> list[list[int]]:
    ids = random_batch(model, batch=len(lengths), seq=max(lengths), seed=seed)
    return [row[:n].tolist() for row, n in zip(ids, lengths)]


def _activation(model, data, **kwargs) -> Importance:
    return compute_importance(model, data, progress=False, **kwargs)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _assert_same_scores(a: Importance, b: Importance, rtol=1e-5):
    for name in ("hidden", "intermediate", "heads", "layers"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=rtol, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_activation_shapes_every_architecture(arch):
    model = tiny_model(arch)
    imp = _activation(model, _samples(model), batch_size=2)
    cfg = model.config
    assert imp.hidden.shape == (cfg.hidden_size,)
    assert imp.intermediate.shape == (cfg.num_hidden_layers, cfg.intermediate_size)
    assert imp.heads.shape == (cfg.num_hidden_layers, cfg.num_attention_heads)
    assert imp.layers.shape == (cfg.num_hidden_layers,)
    for t in (imp.hidden, imp.intermediate, imp.heads, imp.layers):
        assert torch.isfinite(t).all() and (t >= 0).all()
    assert (imp.num_samples, imp.num_tokens) == (4, 33)
    assert (imp.criterion, imp.aggregation, imp.model_type) == ("activation", "l2", cfg.model_type)


def test_hooks_remove_themselves():
    model = tiny_model("qwen3")
    before = _hooks(model)
    _activation(model, _samples(model), layer_skip_loss=True)
    assert _hooks(model) == before

    def failing():
        yield {"input_ids": random_batch(model)}
        raise RuntimeError("data source broke")

    with pytest.raises(RuntimeError, match="data source broke"):
        _activation(model, failing())
    assert _hooks(model) == before
    assert not model.training


def test_padding_is_excluded():
    model = tiny_model("llama")
    samples = _samples(model)
    one_by_one = _activation(model, samples, batch_size=1)  # no padding at all
    right_padded = _activation(model, samples, batch_size=4)
    other_pad_id = _activation(model, samples, batch_size=4, pad_token_id=17)
    _assert_same_scores(one_by_one, right_padded)
    _assert_same_scores(right_padded, other_pad_id)

    # Left padding through explicit batch dicts: positions count valid tokens only.
    width = max(map(len, samples))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in samples])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in samples])
    left_padded = _activation(model, [{"input_ids": ids, "attention_mask": mask}])
    _assert_same_scores(one_by_one, left_padded)
    assert left_padded.num_tokens == sum(map(len, samples)) == one_by_one.num_tokens


def test_aggregation_definitions():
    model = tiny_model("mistral")
    samples = _samples(model)
    l2 = _activation(model, samples, aggregation="l2")
    mean = _activation(model, samples, aggregation="mean")
    l1 = _activation(model, samples, aggregation="l1")
    # Per-sample statistics m_s, one sample at a time (N = 1: mean = l1 = l2 = m_s).
    per_sample = [_activation(model, [s], aggregation="mean") for s in samples]
    for name in ("intermediate", "heads", "layers"):
        m = torch.stack([getattr(p, name) for p in per_sample])  # [N, ...]
        torch.testing.assert_close(getattr(l2, name), m.square().sum(0).sqrt(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(getattr(mean, name), m.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(getattr(l1, name), m.sum(0), rtol=1e-5, atol=1e-6)
    # hidden: each norm output is aggregated over samples, then summed over norms and layers,
    # so for l1 (linear) it equals the sum of the per-sample scores; for l2 it is bounded by it.
    hidden_m = torch.stack([p.hidden for p in per_sample])
    torch.testing.assert_close(l1.hidden, hidden_m.sum(0), rtol=1e-5, atol=1e-6)
    assert (l2.hidden <= hidden_m.square().sum(0).sqrt() * 2 * model.config.num_hidden_layers).all()
    # The variants differ (l1 = N * mean: same ranking, different scale; l2 ranks differently).
    torch.testing.assert_close(l1.hidden, mean.hidden * len(samples), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(l2.hidden / l2.hidden.sum(), mean.hidden / mean.hidden.sum(), rtol=1e-3)
    rms = _activation(model, samples, seq_aggregation="l2")
    assert rms.seq_aggregation == "l2" and (rms.hidden >= l2.hidden - 1e-5).all()  # RMS >= mean |a|
    assert not torch.allclose(rms.hidden, l2.hidden)


def _zero_hidden_channel_(model, k):
    """Zero every weight that reads or writes residual channel k (and its norm gains)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("embed_tokens.weight", "lm_head.weight")) or name.endswith(
                ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
            ):
                p[:, k] = 0
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p[k, :] = 0
            elif name.endswith("layernorm.weight") or name == "model.norm.weight":
                p[k] = 0


@pytest.mark.parametrize("criterion", ["activation", "magnitude"])
def test_zeroed_units_rank_last(criterion):
    model = tiny_model("qwen2", num_hidden_layers=3)
    _zero_hidden_channel_(model, 5)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[7] = 0  # neuron 7 of layer 0: act(0) * up = 0
        model.model.layers[0].mlp.up_proj.weight[7] = 0
        model.model.layers[0].mlp.down_proj.weight[:, 7] = 0
        # layer 1 becomes the identity: nothing is added to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    imp = compute_importance(model, _samples(model), criterion=criterion, layer_skip_loss=True, progress=False)
    assert imp.hidden.argmin().item() == 5 and imp.hidden[5].item() == pytest.approx(0.0, abs=1e-6)
    assert imp.intermediate[0].argmin().item() == 7 and imp.intermediate[0, 7].item() == pytest.approx(0.0, abs=1e-6)
    assert imp.layers.argmin().item() == 1
    if criterion == "activation":
        assert imp.layers[1].item() == pytest.approx(0.0, abs=1e-5)
        assert imp.layers_skip_loss.shape == (3,)
        assert imp.layers_skip_loss[1].item() == pytest.approx(0.0, abs=1e-5)
        assert imp.layers_skip_loss.argmax().item() != 1



def test_importance_of_an_int8_model_is_refused():
    """int8 layers hold no ``weight``: magnitude scores came out all zero, with no error."""
    from overfill_lib.quantize import quantize_int8

    model = quantize_int8(tiny_model("llama"))
    for criterion in ("magnitude", "random"):
        with pytest.raises(ValueError, match="quantized weights .*need the float model.*quantize_int8\\(decoder\\)"):
            compute_importance(model, criterion=criterion)
    with pytest.raises(ValueError, match="quantized weights"):
        activation_importance(model, _samples(model), progress=False)

def test_magnitude_and_random_criteria():
    model = tiny_model("llama", tied=True)
    mag = compute_importance(model, criterion="magnitude")
    assert mag.criterion == "magnitude" and mag.num_samples == 0 and (mag.hidden > 0).all()
    # a channel's magnitude includes its embedding column (tied: counted once)
    col = model.model.embed_tokens.weight[:, 0].square().sum()
    assert mag.hidden[0].square() > col
    assert torch.equal(mag.hidden, magnitude_importance(model).hidden)

    r1, r2 = (compute_importance(model, criterion="random", seed=s) for s in (1, 2))
    assert torch.equal(r1.hidden, random_importance(model, seed=1).hidden)
    assert not torch.equal(r1.hidden, r2.hidden)
    assert r1.seed == 1 and r1.heads.shape == (2, 4)


def test_save_load_roundtrip(tmp_path):
    model = tiny_model("qwen3")
    imp = compute_importance(model, _samples(model), layer_skip_loss=True, description="4 random samples",
                             progress=False)
    imp.save(tmp_path / "imp")
    assert {p.name for p in (tmp_path / "imp").iterdir()} == {"importance.safetensors", "importance.json"}
    back = Importance.load(tmp_path / "imp")
    for name in ("hidden", "intermediate", "heads", "layers", "layers_skip_loss"):
        assert torch.equal(getattr(back, name), getattr(imp, name)), name
    assert back.metadata() == imp.metadata()
    assert (back.num_samples, back.num_tokens, back.calibration) == (4, 33, "4 random samples")

    rnd = random_importance(model, seed=4)
    rnd.save(tmp_path / "rnd")
    back = Importance.load(tmp_path / "rnd")
    assert back.layers_skip_loss is None and back.seed == 4 and torch.equal(back.heads, rnd.heads)


def test_calibration_input_forms():
    model = tiny_model("llama")
    samples = _samples(model, lengths=(5, 5, 5))
    as_lists = _activation(model, samples, batch_size=2)
    as_tensor = _activation(model, torch.tensor(samples))
    as_dicts = _activation(model, [{"input_ids": samples[:2]}, {"input_ids": samples[2], "attention_mask": [1] * 5}])
    # per-sample dicts, as a tokenized datasets.Dataset yields them (masked-out tokens dropped)
    rows = [{"input_ids": s + [9], "attention_mask": [1] * 5 + [0], "text": "x"} for s in samples]
    as_rows = _activation(model, rows)
    _assert_same_scores(as_lists, as_tensor)
    _assert_same_scores(as_lists, as_dicts)
    _assert_same_scores(as_lists, as_rows)
    batches = list(calibration_batches(samples, batch_size=2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert [b["input_ids"].shape[0] for b in calibration_batches(torch.tensor(samples), batch_size=2)] == [2, 1]


@pytest.mark.parametrize("empty", [[], iter([]), (x for x in [])])
def test_empty_calibration_data(empty):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration data is empty"):
        _activation(model, empty)
    assert _hooks(model) == 0


def test_calibration_without_tokens():
    model = tiny_model("llama")
    ids = random_batch(model)
    with pytest.raises(ValueError, match="no unpadded tokens"):
        _activation(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}])
    with pytest.raises(ValueError, match="needs calibration data"):
        compute_importance(model)
    with pytest.raises(ValueError, match="calibration items must be"):
        _activation(model, ["some text"])


def test_bad_choices_and_models():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown criterion 'taylor'; choose one of activation, magnitude, random"):
        compute_importance(model, criterion="taylor")
    with pytest.raises(ValueError, match="unknown aggregation 'max'; choose one of l2, mean, l1"):
        _activation(model, _samples(model), aggregation="max")
    with pytest.raises(ValueError, match="unknown seq_aggregation"):
        _activation(model, _samples(model), seq_aggregation="l1")
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        compute_importance(LlamaModel(tiny_config("llama")), criterion="magnitude")


def test_padding_without_a_mask_is_not_signal_and_foreign_ids_are_refused():
    """Left-padded rows without a mask, and token lists carrying padding, give the scores of the unpadded samples;
    ids outside the vocabulary are a ValueError naming the mismatch."""
    model = tiny_model("llama")
    pad = 0
    samples = [list(range(5, 15)), list(range(20, 26)), list(range(30, 38))]
    exact = activation_importance(model, samples, batch_size=3, pad_token_id=pad, progress=False)
    width = max(map(len, samples))
    left = torch.tensor([[pad] * (width - len(s)) + s for s in samples])
    right_lists = [s + [pad] * (width - len(s)) for s in samples]
    for data in (left, right_lists, {"input_ids": left}):
        padded = activation_importance(model, data, batch_size=3, pad_token_id=pad, progress=False)
        for key in ("hidden", "intermediate"):
            torch.testing.assert_close(getattr(padded, key), getattr(exact, key))
    with pytest.raises(ValueError, match="vocabulary has .* entries: were the samples made with another tokenizer"):
        activation_importance(model, [[5, 6, model.config.vocab_size + 3]], pad_token_id=pad, progress=False)
