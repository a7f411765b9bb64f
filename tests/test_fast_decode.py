"""The fast decode path (static cache, compiled step) reproduces the plain loop's greedy tokens exactly."""

import copy

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


def test_compiled_speculative_verify_returns_the_full_models_greedy_tokens(models):
    """Compiled on CPU the verify step attends with several queries, a mask and grouped key/value heads
    (fast_decode.grouped_query_attention), the draft step with one."""
    full, _ = models
    ids, mask = left_padded(full)
    out = FastGenerator(full, noisy_copy(full, 0.1), compile=True).generate(ids, mask, method="speculative",
                                                                            max_new_tokens=NEW, num_draft_tokens=2)
    assert out.path == fast_decode.PATH_COMPILED
    assert torch.equal(out.new_tokens, plain(full, full, ids, mask).new_tokens)


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


def test_matvec_as_reduction_rewrites_only_one_row_linears():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    one, rows = torch.randn(1, 1, 40, generator=g), torch.randn(2, 3, 40, generator=g)
    calls = []

    class Counting(fast_decode.MatVecAsReduction):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.linear:
                calls.append(args[0].shape)
            return super().__torch_function__(func, types, args, kwargs)

    parameter = torch.nn.Parameter(weight, requires_grad=False)
    with Counting(fp32_template=True):
        y1 = torch.nn.functional.linear(one, weight, bias)
        y2 = torch.nn.functional.linear(rows, weight)
        y3 = torch.nn.functional.linear(one.bfloat16(), weight.bfloat16())
        y4 = torch.nn.functional.linear(one, parameter, bias)
    with Counting():
        y5 = torch.nn.functional.linear(one, parameter, bias)
    assert len(calls) == 5
    # With fp32_template an fp32 parameter stays a linear (inductor's GEMM template, test below), bit for bit;
    # without, it is a reduction like any weight.
    assert torch.equal(y4, torch.nn.functional.linear(one, weight, bias))
    assert torch.equal(y5, y1)
    # One row: a multiply-and-sum, equal up to summation order; several rows: the GEMM itself, bit for bit.
    torch.testing.assert_close(y1, torch.nn.functional.linear(one, weight, bias))
    assert not torch.equal(y1, y1.new_zeros(y1.shape)) and y1.shape == (1, 1, 48)
    assert torch.equal(y2, torch.nn.functional.linear(rows, weight))
    assert y3.dtype == torch.bfloat16
    torch.testing.assert_close(y3.float(), torch.nn.functional.linear(one, weight), atol=0.15, rtol=0.02)


FP32_BAR = fast_decode.FP32_TEMPLATE_MIN_BYTES


def _avx512() -> bool:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return pick_vec_isa().bit_width() >= 512


def test_one_row_fp32_linears_reach_inductors_gemm_template(monkeypatch):
    """Compiled on an AVX-512 CPU, the one-row linears of an fp32 model whose weights outgrow the caches are left to
    inductor's C++ GEMM template (its prepacked weights read faster than the reductions read them,
    MatVecAsReduction): the template is offered for every product and the head; with AVX2 code, or for a model that
    fits in the caches, for none; the tokens stay the plain loop's either way."""
    import torch._inductor.compile_fx  # noqa: F401  (imported first: the template module alone is a cycle)
    from torch._inductor.codegen.cpp_gemm_template import CppGemmTemplate

    offered = []
    original = CppGemmTemplate.add_choices.__func__

    def counting(cls, choices, layout, input_nodes, *args, **kwargs):
        offered.append(tuple(input_nodes[1].get_size()))
        return original(cls, choices, layout, input_nodes, *args, **kwargs)

    monkeypatch.setattr(CppGemmTemplate, "add_choices", classmethod(counting))
    model = tiny_model("llama", seed=6)
    ids, mask = left_padded(model, batch=1)
    # One product per input: q, k and v concatenated (cpp.enable_concat_linear), o, gate and up concatenated, down;
    # and the head. Only where inductor writes AVX-512 code; with 256-bit code (as on AVX2) they stay reductions;
    # and only for weights that outgrow the caches, which the tiny model's do once the bar is lowered.
    products = 4 * model.config.num_hidden_layers + 1
    cases = [(None, FP32_BAR, 0), (256, 0, 0), (None, 0, products if _avx512() else 0)]
    for simdlen, bar, expected in cases:
        offered.clear()
        monkeypatch.setattr(fast_decode, "FP32_TEMPLATE_MIN_BYTES", bar)
        with torch._inductor.config.patch({"fx_graph_cache": False, "cpp.simdlen": simdlen}):  # compile here
            assert fast_decode.fp32_gemm_template(model) == (expected > 0)
            out = FastGenerator(model, None, compile=True).generate(ids, mask, method="full", max_new_tokens=NEW)
        assert torch.equal(out.new_tokens, plain(model, model, ids, mask).new_tokens)
        assert len(offered) == expected, (simdlen, bar, offered)


def test_cpu_compile_target_is_the_reduction_step_compiled_once_per_model(models):
    """On a CPU each model gets its own compiled copy of the reduction step (a code object of its own, no guards on
    its modules): the same one on every call, another for another model or once the model is quantized in place."""
    full, decoder = models
    step = fast_decode.StepFn(compile=True, device=torch.device("cpu"))
    first = step.compiled_for(decoder)
    assert first._torchdynamo_orig_callable.__code__.co_code == fast_decode.decode_one_token_cpu.__code__.co_code
    assert first._torchdynamo_orig_callable.__code__ is not fast_decode.decode_one_token_cpu.__code__
    assert step.compiled_for(decoder) is first and step.compiled_for(full) is not first
    decoder.quantization = "int8-weight-only"  # what quantize_int8 records (quantize.QUANTIZATION): another model now
    try:
        assert step.compiled_for(decoder) is not first
    finally:
        del decoder.quantization
    assert fast_decode.StepFn(compile=False, device=torch.device("cpu"))._fn is generation.decode_one_token


def test_models_of_one_shape_never_share_a_compiled_step(models):
    """Without guards on the modules, a graph compiled for one model must never run another of the same input
    shapes: the full model and a copy of it with int8 weights, alternating through one generator, each give their
    own plain loop's tokens."""
    from overfill_lib import quantize

    full, _ = models
    twin = quantize.quantize_int8(copy.deepcopy(full)).requires_grad_(False)
    gen = FastGenerator(full, twin, compile=True)
    ids, mask = left_padded(full, batch=1)
    for _ in range(2):
        for method, (a, b) in {"full": (full, full), "decoder": (twin, twin)}.items():
            out = gen.generate(ids, mask, method=method, max_new_tokens=NEW)
            assert torch.equal(out.new_tokens, plain(a, b, ids, mask).new_tokens), method


def test_a_model_whose_tensors_changed_after_compiling_is_refused_and_one_quantized_in_place_compiles_anew():
    """A CPU step holds the model's tensors as constants and checks neither them nor the inputs' layouts when it runs
    (frozen, no guards on the modules, no size asserts): generate refuses a model whose weights were replaced,
    changed strides or changed in place since its step was compiled, by name (a new generator takes the changed
    model); quantizing in place is another model, compiled anew, and matches its own plain loop."""
    from overfill_lib import quantize

    model = tiny_model("llama", seed=4)
    gen = FastGenerator(model, None, compile=True)
    ids, mask = left_padded(model, batch=1)
    gen.generate(ids, mask, method="full", max_new_tokens=4)
    down = model.model.layers[0].mlp.down_proj
    weight = down.weight
    down.weight = torch.nn.Parameter(weight.detach().t().contiguous().t())  # same values and shape, other strides
    with pytest.raises(ValueError, match="changed shape, strides or dtype.*new FastGenerator"):
        gen.generate(ids, mask, method="full", max_new_tokens=4)
    down.weight = torch.nn.Parameter(weight.detach().clone())  # same values and layout, another tensor
    with pytest.raises(ValueError, match="were replaced.*new FastGenerator"):
        gen.generate(ids, mask, method="full", max_new_tokens=4)
    down.weight = weight
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)  # in place: the step holds a prepacked copy of fp32 weights
    with pytest.raises(ValueError, match="changed in place.*new FastGenerator"):
        gen.generate(ids, mask, method="full", max_new_tokens=4)
    out = FastGenerator(model, None, compile=True).generate(ids, mask, method="full", max_new_tokens=NEW)
    assert torch.equal(out.new_tokens, plain(model, model, ids, mask).new_tokens)
    quantize.quantize_int8(model)
    out = gen.generate(ids, mask, method="full", max_new_tokens=NEW)
    assert out.path == fast_decode.PATH_COMPILED
    assert torch.equal(out.new_tokens, plain(model, model, ids, mask).new_tokens)


def compiled_graphs(monkeypatch, model) -> list:
    """The graphs inductor compiles (after its own passes) for ``model``'s CPU decode step, at batch 1; the fast path's
    tokens checked against the plain loop's on the way."""
    graphs = []
    original = fast_decode.ComputeOnce.__call__

    def keep(self, graph):
        graphs.append(graph)
        return original(self, graph)

    monkeypatch.setattr(fast_decode.ComputeOnce, "__call__", keep)
    ids, mask = left_padded(model, batch=1)
    with torch._inductor.config.patch(fx_graph_cache=False):  # compile here, so that the pass runs
        out = FastGenerator(model, None, compile=True).generate(ids, mask, method="full", max_new_tokens=NEW)
    assert torch.equal(out.new_tokens, plain(model, model, ids, mask).new_tokens)
    return graphs


def test_a_frozen_cpu_step_takes_the_weights_as_constants_not_as_inputs(monkeypatch):
    """The model reaches the compiled step as an argument: inductor's freezing has its weights to freeze only if dynamo
    traced under prepare_freezing (fast_decode.frozen_tracing). Frozen, the graph inductor compiles takes only the
    step's own inputs (ids, positions, mask, the cache), not the model's tensors; and the tokens stay the plain
    loop's."""
    model = tiny_model("llama", seed=5)
    seen = [len(graph.find_nodes(op="placeholder")) for graph in compiled_graphs(monkeypatch, model)]
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    assert seen and max(seen) < tensors, (seen, tensors)


def test_grouped_query_attention_is_transformers_sdpa_without_the_copy():
    """Equal to transformers' sdpa attention on grouped heads (one query, several with a mask, no mask) and on plain
    heads; the registry holds transformers' function again after the context, an error inside included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    g = torch.Generator().manual_seed(0)
    for groups, queries, masked in [(3, 1, True), (3, 1, False), (3, 4, True), (1, 1, True)]:
        module = torch.nn.Module()
        module.num_key_value_groups, module.is_causal = groups, True
        q = torch.randn(2, 3 * groups, queries, 16, generator=g)
        k, v = (torch.randn(2, 3, 10, 16, generator=g) for _ in range(2))
        mask = torch.rand(2, 1, queries, 10, generator=g) > 0.3 if masked else None
        ours, _ = fast_decode.grouped_query_attention(module, q, k, v, mask, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-6), (groups, queries, masked)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(RuntimeError), fast_decode.grouped_query_sdpa():
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is fast_decode.grouped_query_attention
        raise RuntimeError
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa


def test_the_compiled_cpu_step_reads_the_cache_without_copying_it_per_query_head(monkeypatch):
    """The attention in the graph inductor compiles takes the cache's key/value heads (2 for 4 query heads here), not
    a copy repeated per query head (fast_decode.grouped_query_attention); and the tokens stay the plain loop's."""
    model = tiny_model("llama", seed=6)
    seen = [n.args[1].meta["val"].shape[1] for graph in compiled_graphs(monkeypatch, model) for n in graph.nodes
            if "scaled_dot_product" in str(n.target)]
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    assert seen and set(seen) == {config.num_key_value_heads}, seen


def test_compiled_step_matches_plain_loop_on_cpu(models):
    """Compiled on CPU: at batch 1 the one-row linears are reductions (MatVecAsReduction), at batch 2 GEMMs."""
    full, decoder = models
    gen = FastGenerator(full, decoder)  # compile="auto": compiled on CPU too
    for batch in (1, 2):
        ids, mask = left_padded(full, batch=batch)
        for method, (a, b) in {"overfill": (full, decoder), "full": (full, full)}.items():
            out = gen.generate(ids, mask, method=method, max_new_tokens=NEW)
            assert out.path == fast_decode.PATH_COMPILED
            assert torch.equal(out.new_tokens, plain(a, b, ids, mask).new_tokens)


def test_python_wrapper_setting_matches_plain_loop_and_bad_values_fail_early(models, monkeypatch):
    """OVERFILL_CPP_WRAPPER=0 compiles CPU steps with inductor's Python wrapper (the default C++ one is what the test
    above runs); a value other than 0 or 1 fails when the generator is built, not at its first step."""
    full, decoder = models
    monkeypatch.setenv("OVERFILL_CPP_WRAPPER", "0")
    gen = FastGenerator(full, decoder, compile=True)
    assert not gen.step.cpp_wrapper
    ids, mask = left_padded(full, batch=1)
    assert torch.equal(gen.generate(ids, mask, method="overfill", max_new_tokens=NEW).new_tokens,
                       plain(full, decoder, ids, mask).new_tokens)
    monkeypatch.setenv("OVERFILL_CPP_WRAPPER", "yes")
    with pytest.raises(ValueError, match="OVERFILL_CPP_WRAPPER='yes'"):
        FastGenerator(full, decoder)
    monkeypatch.delenv("OVERFILL_CPP_WRAPPER")
    assert FastGenerator(full, decoder).step.cpp_wrapper


def test_a_failing_cpp_wrapper_falls_back_to_the_python_one(models, monkeypatch):
    """compile="auto": a first compile that fails with the C++ wrapper is tried with the Python one (still compiled,
    the plain loop's tokens), not run eagerly; compile=True raises."""
    full, decoder = models
    real = fast_decode.compile_for_one_model

    def cpp_fails(mode=None, cpp_wrapper=True, freezing=True, **kwargs):
        if not cpp_wrapper:
            return real(mode, cpp_wrapper, freezing, **kwargs)

        def broken(*args, **kwargs):
            raise RuntimeError("no C++ wrapper here")
        return broken

    monkeypatch.setattr(fast_decode, "compile_for_one_model", cpp_fails)
    ids, mask = left_padded(full, batch=1)
    gen = FastGenerator(full, decoder)
    out = gen.generate(ids, mask, method="overfill", max_new_tokens=NEW)
    assert out.path == fast_decode.PATH_COMPILED and not gen.step.cpp_wrapper
    assert torch.equal(out.new_tokens, plain(full, decoder, ids, mask).new_tokens)
    with pytest.raises(RuntimeError, match="no C.. wrapper here"):
        FastGenerator(full, decoder, compile=True).generate(ids, mask, method="overfill", max_new_tokens=NEW)


def test_warm_steps_skip_guards_and_still_match_the_plain_loop(models):
    """A step seen once (model, cache, shapes) runs later without its full guard check; alternating models and
    shapes still gives the plain loop's tokens, and clearing the caches forgets what was seen."""
    full, decoder = models
    gen = FastGenerator(full, decoder, compile=True)
    for _ in range(2):
        for batch in (1, 2):
            ids, mask = left_padded(full, batch=batch)
            for method, (a, b) in {"overfill": (full, decoder), "full": (full, full)}.items():
                out = gen.generate(ids, mask, method=method, max_new_tokens=NEW)
                assert torch.equal(out.new_tokens, plain(a, b, ids, mask).new_tokens)
    assert len(gen.step._warm[decoder]) == 2 and len(gen.step._warm[full]) == 2  # one cache per batch size
    gen.clear_caches()
    assert len(gen.step._warm) == 0


def test_cpu_decode_benchmark_feeds_notebook_03(models):
    """benchmarks/cpu_decode.py on the tiny test pair, one round: every method on every path, tokens checked, and
    its JSON read by the table and figure notebook 03 shows."""
    from benchmarks import cpu_decode
    from overfill_lib import latency, plots

    full, decoder = models
    ids = random_batch(full, 1, 8, seed=5)
    r = cpu_decode.measure(full, decoder, ids, new_tokens=12, repeats=1)
    assert set(r["methods"]) == set(cpu_decode.METHODS)
    for row in r["methods"].values():
        assert row["eager"]["tokens_equal_plain"] and row["compiled"]["tokens_equal_plain"]
        assert all(row[p]["ms_per_token"] > 0 for p in cpu_decode.PATHS)
        assert row["compiled"]["fraction_of_read_bandwidth"] == pytest.approx(
            row["step_bytes"] / (row["compiled"]["ms_per_token"] / 1e3) / r["read_bandwidth_bytes_per_s"])
    results = {"environment": {}, "presets": {"test": {"dtypes": {"float32": r}}}}
    rows = latency.cpu_decode_rows(results)
    assert [row["method"] for row in rows] == list(cpu_decode.METHODS) and all(row["tokens == plain"] for row in rows)
    assert len(plots.cpu_decode_figure(results).data) == len(cpu_decode.PATHS)
    # --paths plain compiled (the eager fast path left out): the table and the figure draw what was timed
    lean = cpu_decode.measure(full, decoder, ids, new_tokens=6, repeats=1, paths=("plain", "compiled"))
    results = {"environment": {}, "presets": {"test": {"dtypes": {"float32": lean}}}}
    assert all(row["eager ms"] is None and row["tokens == plain"] for row in latency.cpu_decode_rows(results))
    assert {trace.name for trace in plots.cpu_decode_figure(results).data} == {"plain", "compiled"}


def test_cpu_decode_benchmark_at_batch_two_counts_every_row(models):
    """Batched: tokens per second count every row, a step reads the KV cache of every row, tokens still checked."""
    from benchmarks import cpu_decode
    from overfill_lib import cost

    full, decoder = models
    ids = random_batch(full, 1, 8, seed=5).repeat(2, 1)
    r = cpu_decode.measure(full, decoder, ids, new_tokens=4, repeats=1, paths=("plain", "compiled"))
    assert r["batch"] == 2 and set(r["compile_cache"]) == {"hits", "misses"}
    row = r["methods"]["full"]
    assert row["compiled"]["tokens_equal_plain"]
    assert row["compiled"]["tokens_per_s"] == pytest.approx(2e3 / row["compiled"]["ms_per_token"])
    assert row["step_bytes"] == cost.decode_step_bytes(full.config, 4, batch=2, kv_positions=12,
                                                       kv_config=full.config)["total"]


def test_compile_cache_is_the_environments_when_it_names_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fast_decode.use_compile_cache(tmp_path / "other") == tmp_path / "mine" and (tmp_path / "mine").is_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert fast_decode.use_compile_cache(tmp_path / "other") == (tmp_path / "other").resolve()
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # inductor's own default is not a choice
    assert fast_decode.use_compile_cache(tmp_path / "kept") == (tmp_path / "kept").resolve()
    assert set(fast_decode.compile_cache_counts()) == {"hits", "misses"}


def test_lists_of_ids_are_accepted_as_pair_generate_accepts_them(models):
    """Ragged lists are left-padded (as pair.generate pads them), one flat list is one prompt, numpy integers count
    as integers; an attention_mask with lists is refused, not silently ignored."""
    import numpy as np

    full, decoder = models
    gen = FastGenerator(full, decoder, compile=False)
    rows = [[5, 17, 33, 9, 41], [7, 8], [70, 3, 22]]
    ids, mask = generation.pad_sequences(rows, 0, side="left")
    kw = {"method": "overfill", "max_new_tokens": 5, "eos_token_id": []}
    padded = gen.generate(ids, mask, **kw)
    assert torch.equal(gen.generate(rows, **kw).new_tokens, padded.new_tokens)
    reference = plain(full, decoder, rows, None, eos_token_id=[]).new_tokens[:, :5]
    assert torch.equal(gen.generate(rows, **kw).new_tokens, reference)
    assert torch.equal(gen.generate(rows[0], **kw).new_tokens, gen.generate(torch.tensor(rows[0]), **kw).new_tokens)
    assert torch.equal(gen.generate(rows, **{**kw, "max_new_tokens": np.int64(5)}).new_tokens, padded.new_tokens)
    with pytest.raises(ValueError, match="attention_mask.*only with a tensor of ids"):
        gen.generate(rows, mask, **kw)
    with pytest.raises(ValueError, match="no prompts to run"):
        gen.generate([], **kw)
