"""Weight-only int8 (and w8a8, int8 activations too): close to the float layer, the tied head untied, the compiled
CPU fast path exact on it, saved and loaded as it was."""

import pytest
import torch
from torch import nn

from overfill_lib import fast_decode, int8_kernel
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.pair import OverFillModel
from overfill_lib.quantize import W8A8, Int8Linear, SharedInput, W8A8Linear, quantize_int8, share_inputs
from tests.tiny_models import random_batch, tiny_model


def test_int8_linear_is_within_rounding_of_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    q = Int8Linear.from_linear(linear)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (40,)
    assert int(q.qweight.abs().amax(1).min()) == 127  # every row uses its full range
    x = torch.randn(5, 64)
    # Each weight is off by at most half a step (scale / 2): the output by at most |x| . scale / 2 per row.
    bound = x.abs().sum(1, keepdim=True) * q.scale / 2
    assert torch.all((q(x) - linear(x)).abs() <= bound + 1e-5)
    assert not torch.allclose(q(x), linear(x), atol=1e-7)  # it really is quantized
    with pytest.raises(ValueError, match="int8"):
        Int8Linear(linear.weight.detach(), q.scale)


def test_quantize_int8_unties_the_head_and_keeps_the_model_close():
    model = tiny_model("llama", seed=0, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_batch(model, 2, 7, seed=1)
    ref = model(input_ids=ids).logits
    table = model.model.embed_tokens.weight.detach().clone()
    quantize_int8(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and model.config.tie_word_embeddings is False
    assert torch.equal(model.model.embed_tokens.weight, table)  # the input table stays float
    out = model(input_ids=ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert 0.99 < cos < 1.0
    assert quantize_int8(model) is model  # idempotent


@pytest.mark.parametrize(("batch", "kernel_in_step", "scheme"),
                         [(1, False, "int8-weight-only"), (3, True, "int8-weight-only"), (2, True, W8A8),
                          (1, None, W8A8)])
def test_compiled_cpu_step_on_int8_weights_matches_the_plain_loop(batch, kernel_in_step, scheme, monkeypatch):
    """The compiled step multiplies the int8 weights by inductor's reduction (AVX-512) or by the int8 kernel (AVX2,
    where it is built); either way its tokens must be the plain (eager, dynamic cache) loop's, at batch 1 and above.
    The same for w8a8: through the kernel's w8a8_linear where built, compiled or not, or (None: no kernel, as on a
    machine without a compiler) through torch's rounding and F.linear, which dynamo must trace too."""
    if kernel_in_step is None:
        monkeypatch.setitem(int8_kernel._state, "loaded", False)
    elif int8_kernel.load():
        monkeypatch.setitem(int8_kernel._state, "in_compiled_step", kernel_in_step)
    full = quantize_int8(tiny_model("llama", seed=0), scheme)
    decoder = quantize_int8(tiny_model("llama", seed=1, hidden_size=32, intermediate_size=40), scheme)
    ids = random_batch(full, batch, 9, seed=3)
    mask = torch.ones_like(ids)
    gen = FastGenerator(full, decoder, compile=True)
    for method, (a, b) in {"overfill": (full, decoder), "full": (full, full)}.items():
        out = gen.generate(ids, mask, method=method, max_new_tokens=12, eos_token_id=[])
        ref = OverFillModel(a, b, "shared_kv").generate(ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=[])
        assert out.path == fast_decode.PATH_COMPILED
        assert torch.equal(out.new_tokens, ref.new_tokens)
    if kernel_in_step and int8_kernel.loaded():  # one kernel call per step for q, k, v and one for gate, up
        with torch.profiler.profile() as prof:
            gen.generate(ids, mask, method="full", max_new_tokens=12, eos_token_id=[])
        calls = sum(e.count for e in prof.key_averages() if e.key.startswith("overfill::"))
        layers = full.config.num_hidden_layers
        # 11 compiled steps, each: qkv, o, gate-up and down per layer, the head; and the prefill's head (its last
        # positions only: the other prefill products have too many rows for the kernel)
        assert calls == 11 * (4 * layers + 1) + 1


def test_a_frozen_int8_step_keeps_its_weights_int8_through_inductors_reduction(monkeypatch):
    """Frozen, a step's weights are constants, and inductor folds what depends on constants only: an int8 weight
    converted to float for inductor's own reduction (AVX-512, or no kernel) would become a float copy, four times the
    bytes per step. fast_decode.frozen_tracing keeps conversions out of folding: the graph holds the int8 weights as
    int8 constants, no float copy of them, and the tokens are the plain loop's."""
    if int8_kernel.load():
        monkeypatch.setitem(int8_kernel._state, "in_compiled_step", False)  # inductor's reduction, as on AVX-512
    model = quantize_int8(tiny_model("llama", seed=6))
    float_numel = sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    constants = []
    original = fast_decode.ComputeOnce.__call__

    def recording(self, graph):
        constants.extend(n.meta["val"] for n in graph.find_nodes(op="get_attr") if "val" in n.meta)
        return original(self, graph)

    monkeypatch.setattr(fast_decode.ComputeOnce, "__call__", recording)
    ids = random_batch(model, 1, 9, seed=3)
    mask = torch.ones_like(ids)
    with torch._inductor.config.patch(fx_graph_cache=False):  # compile here, so that the pass runs
        out = FastGenerator(model, None, compile=True).generate(ids, mask, method="full", max_new_tokens=8,
                                                                eos_token_id=[])
    ref = OverFillModel(model, model, "shared_kv").generate(ids, mask, max_new_tokens=8, do_sample=False,
                                                            eos_token_id=[])
    assert torch.equal(out.new_tokens, ref.new_tokens)
    assert any(c.dtype == torch.int8 for c in constants)  # frozen: the int8 weights are constants of the graph
    # No float copy of them: no more float constants than the model has float tensors (embedding, norms, scales).
    assert sum(c.numel() for c in constants if c.dtype.is_floating_point) <= float_numel


@pytest.mark.parametrize("scheme", ["int8-weight-only", W8A8])
def test_layers_that_read_one_input_are_views_of_one_matrix(tmp_path, scheme):
    """q, k, v (and gate, up) of an int8 model are rows of one matrix per layer, no second copy; the state dict keeps
    each layer's own keys and none of the group's; a weight replaced since is noticed and the group stacked again."""
    model = quantize_int8(tiny_model("llama", seed=0), scheme)
    ids = random_batch(model, 2, 7, seed=1)
    attn = model.model.layers[1].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    group = attn.shared_qkv
    assert isinstance(group, SharedInput) and isinstance(model.model.layers[1].mlp.shared_gateup, SharedInput)
    assert group.holds(layers)
    assert all(m.qweight.untyped_storage().data_ptr() == group.qweight.untyped_storage().data_ptr() for m in layers)
    assert torch.equal(group.qweight, torch.cat([m.qweight for m in layers]))
    assert not any("shared_" in key for key in model.state_dict())
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        attn.k_proj.qweight = attn.k_proj.qweight.clone()
        attn.k_proj.qweight[0, 0] = -attn.k_proj.qweight[0, 0]  # the layer changed, its old group did not
        assert not group.holds(layers)
        changed = model(input_ids=ids).logits
        share_inputs(model)
        assert attn.shared_qkv is not group and attn.shared_qkv.holds(layers)
        assert torch.equal(attn.shared_qkv.qweight[attn.q_proj.out_features], attn.k_proj.qweight[0])
        assert torch.equal(model(input_ids=ids).logits, changed) and not torch.equal(changed, ref)


@pytest.mark.parametrize(("scheme", "layer"), [("int8-weight-only", Int8Linear), (W8A8, W8A8Linear)])
def test_an_int8_model_saves_and_loads_back_with_its_int8_weights_and_logits(tmp_path, scheme, layer):
    """save_pretrained writes int8 tensors under new keys: a plain from_pretrained loaded a float model with random
    Linear weights (a load report, no error). load_causal_lm rebuilds the int8 layers (of the scheme saved: w8a8 stays
    w8a8); the pair reloads them too."""
    from overfill_lib.artifacts import load_causal_lm

    full = tiny_model("llama", seed=0)
    full.save_pretrained(tmp_path / "full")
    decoder = quantize_int8(tiny_model("llama", seed=1, tied=True), scheme)
    ids = random_batch(decoder, 2, 7, seed=1)
    decoder.save_pretrained(tmp_path / "decoder")
    again = load_causal_lm(tmp_path / "decoder", "decoder")
    assert type(again.lm_head) is layer and again.quantization == scheme
    assert not any(isinstance(m, nn.Linear) for m in again.modules())
    for name, tensor in decoder.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, decoder(input_ids=ids).logits)
    OverFillModel(full, decoder, full_id=str(tmp_path / "full")).save_pretrained(tmp_path / "pair")
    pair = OverFillModel.from_pretrained(tmp_path / "pair")
    assert type(pair.decoder.lm_head) is layer
    with torch.no_grad():
        assert torch.equal(pair.decoder(input_ids=ids).logits, decoder(input_ids=ids).logits)


def test_int8_weights_in_a_folder_that_does_not_say_so_are_refused_by_name(tmp_path):
    """Saved before config.json recorded the quantization: the load names the keys it could not place."""
    import json

    from overfill_lib.artifacts import load_causal_lm

    quantize_int8(tiny_model("llama", seed=1)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("overfill_quantization", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the decoder in .* does not fit LlamaForCausalLM: missing keys .*lm_head"
                                         r"\.weight.*unexpected keys .*lm_head\.qweight.*int8 weights"):
        load_causal_lm(tmp_path, "decoder")


def test_the_decoder_weights_setting_is_checked_and_quantizes_only_when_asked(tmp_path):
    from overfill_lib import config, cost, presets, quantize
    from overfill_lib.config import DecoderSection
    from overfill_lib.quantize import apply_decoder_weights, decoder_weights, is_quantized

    assert DecoderSection().weights == "float" and set(config.DECODER_WEIGHTS) == set(quantize.DECODER_WEIGHTS)
    with pytest.raises(ValueError, match="decoder.weights"):
        DecoderSection(weights="int4")
    assert decoder_weights(presets.load_preset("tiny")) == "float"
    assert decoder_weights(presets.load_preset("tiny", {"decoder": {"weights": "int8"}})) == "int8"
    # Checked when the preset loads: the valid values and the file (or the overrides) to fix.
    with pytest.raises(ValueError, match=r"decoder.weights 'int4'; choose one of float, int8, w8a8 \(in preset file "
                                         r".*tiny.yaml with the overrides\)"):
        presets.load_preset("tiny", {"decoder": {"weights": "int4"}})
    (tmp_path / "mine.yaml").write_text("full_model: {id: some/dir}\ndecoder: {hidden: 0.5, weights: fp8}\n")
    with pytest.raises(ValueError, match=r"'fp8'; choose one of float, int8, w8a8 \(in preset file .*mine.yaml\)"):
        presets.load_preset(str(tmp_path / "mine.yaml"))
    model = tiny_model("llama", seed=0)
    floats = quantize.parameter_count(model)
    assert apply_decoder_weights(model, "float") is model and not is_quantized(model)
    weight_bytes = cost.weight_bytes(model.config, 4)
    assert is_quantized(apply_decoder_weights(model, "int8")) and quantize.weights_of(model) == "int8"
    # An untied model counts the same parameters in int8, and a step reads one byte per weight instead of four.
    assert quantize.parameter_count(model) == floats and cost.weight_bytes(model.config, 4) * 4 == weight_bytes
    with pytest.raises(ValueError, match="already quantized as 'int8-weight-only'"):
        apply_decoder_weights(model, "w8a8")
    w8a8 = apply_decoder_weights(tiny_model("llama", seed=0), "w8a8")
    assert isinstance(w8a8.lm_head, W8A8Linear) and quantize.weights_of(w8a8) == "w8a8"
    assert quantize.parameter_count(w8a8) == floats and cost.weight_bytes(w8a8.config, 4) * 4 == weight_bytes


def test_the_decoder_that_is_timed_and_scored_runs_as_the_preset_says():
    """pipeline.decoder_as_run, the one rule notebook 03 and the ablation load decoders through: float leaves the
    decoder as it is; int8 quantizes the decoder (a pair's decoder only: the full model prefills as it is)."""
    from overfill_lib import pipeline, presets
    from overfill_lib.quantize import is_quantized

    as_given, int8 = presets.load_preset("tiny"), presets.load_preset("tiny", {"decoder": {"weights": "int8"}})
    decoder = tiny_model("llama", seed=1, hidden_size=32, intermediate_size=40)
    assert pipeline.decoder_as_run(as_given, decoder) is decoder and not is_quantized(decoder)
    assert pipeline.decoder_as_run(int8, decoder) is decoder and is_quantized(decoder)
    pair = OverFillModel(tiny_model("llama", seed=0), tiny_model("llama", seed=1, hidden_size=32, intermediate_size=40))
    assert pipeline.decoder_as_run(int8, pair) is pair
    assert is_quantized(pair.decoder) and not is_quantized(pair.full)
