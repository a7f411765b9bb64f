"""The fast decode path: one static KV cache, a compiled decode step, no host round trip per token.

At batch 1 on a GPU the plain loop (:mod:`overfill_lib.generation`) is bound by kernel launches and Python, not
by memory bandwidth, so it cannot show what a smaller decoder buys. Built from the same stages, this path removes
that overhead as gpt-fast does: a ``StaticCache`` allocated once and reused (under ``shared_kv`` the decoder reads
and extends the full model's prefilled cache itself), a ``torch.compile``d decode step (CUDA graphs on CUDA; on CPU
its matrix-vector products become fused reductions, :class:`MatVecAsReduction`), and eos checked every
``sync_every`` steps. Greedy only, reproducing the plain loop's tokens exactly (in fp32; in bf16 a different
summation order can break a near-tie the other way). Every output names its path (compiled or eager), so a timing
never silently compares a fast path with a slow one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import types
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass
from transformers import StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from overfill_lib import int8_kernel, quantize
from overfill_lib.architectures import head_dim_of
from overfill_lib.artifacts import PROJECT_ROOT
from overfill_lib.generation import (
    cache_keyword,
    check_new_tokens,
    check_padded,
    check_positions,
    decode_n_tokens,
    decode_one_token,
    eos_ids,
    greedy,
    pad_token_for,
    prefill,
    prompt_batch,
    speculative_decode,
    through_first_eos,
)
from overfill_lib.pairing import kv_mismatches

log = logging.getLogger(__name__)

DECODE_METHODS = ("overfill", "full", "decoder", "speculative")
PATH_COMPILED = "fast-static-compiled"
PATH_EAGER = "fast-static-eager"
# Enough dynamo cache entries for one decode-step graph per (model, batch, cache length, query
# length) of a latency sweep; dynamo's default (8) would silently fall back to eager mid-sweep.
RECOMPILE_LIMIT = 256


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class FastTimings:
    """Seconds per stage (CUDA events on GPU, perf_counter on CPU) and what was computed."""

    ttft_s: float = 0.0  # prefill + first token (speculative: the full model's prefill)
    decode_s: float = 0.0  # everything after the first token (speculative: draft prefill included)
    batch_size: int = 0
    prompt_length: int = 0  # padded prompt width
    max_cache_len: int = 0  # static cache positions allocated (what every decode step's attention reads)
    steps: int = 0  # generated positions per row (new_tokens.shape[1])
    forwards: int = 0  # model forwards after the prefill(s)
    rounds: int = 0  # speculative: draft/verify rounds
    proposed: int = 0  # speculative: draft tokens proposed
    accepted: int = 0  # speculative: draft tokens accepted (per round the minimum over the batch rows)

    @property
    def total_s(self) -> float:
        return self.ttft_s + self.decode_s

    @property
    def per_token_s(self) -> float:
        """Seconds per output position after the first (each yields one token per row)."""
        return self.decode_s / (self.steps - 1) if self.steps > 1 else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_s": self.total_s, "per_token_s": self.per_token_s, "acceptance": self.acceptance}


@dataclass
class FastOutput:
    """Like :class:`overfill_lib.generation.OverFillOutput`: ids (prompt + new), the new part, why each row ended."""

    sequences: torch.Tensor  # [batch, prompt_length + steps]
    new_tokens: torch.Tensor  # [batch, steps], pad after a row's eos
    finish_reasons: list[str]  # "eos" or "length" per row
    method: str
    path: str
    timings: FastTimings = field(default_factory=FastTimings)


# --------------------------------------------------------------------------------------------------
# Pieces: positions, caches, the step
# --------------------------------------------------------------------------------------------------


def set_cache_length(cache: StaticCache, length: int | torch.Tensor) -> None:
    """Roll every layer of a static cache back (or forward) to ``length`` filled positions, in place.

    A static layer counts its filled positions in a tensor (``cumulative_length``, a static address
    under CUDA graphs); the next update writes from there. Entries past it are stale but harmless:
    the causal mask hides positions after the query, and later updates overwrite them.
    """
    for layer in cache.layers:
        counter = getattr(layer, "cumulative_length", None)
        if not torch.is_tensor(counter):
            raise TypeError(
                f"{type(layer).__name__} keeps no tensor length counter; speculative rollback needs "
                "transformers' StaticLayer (transformers >= 5.17)"
            )
        counter.fill_(length)


def _standard_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` with default contiguous strides (size-1 dimensions included).

    Dynamo guards on every stride, even of size-1 dimensions, so an input sliced from a wider tensor
    (a ``[batch, 1]`` column of ``[batch, n]``) would compile a new graph for every ``n``.
    """
    expected, acc = [], 1
    for size in reversed(t.shape):
        expected.append(acc)
        acc *= max(size, 1)
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


# Inductor keeps what it compiled (its FX graph cache) in $TORCHINDUCTOR_CACHE_DIR, by default a folder of the system's
# temporary directory that a reboot or a fresh container empties. Pointing it at the project's artifacts keeps it:
# a later run that meets the same graph skips the C++ compile (dynamo still traces, a few seconds per graph).
DEFAULT_COMPILE_CACHE = PROJECT_ROOT / "artifacts" / "inductor-cache"


def use_compile_cache(directory: str | Path = DEFAULT_COMPILE_CACHE) -> Path:
    """Keep inductor's compiled graphs in ``directory`` across runs (sets ``TORCHINDUCTOR_CACHE_DIR`` unless the
    environment already names a folder of its own, which wins) and return the directory in use. Call it before the
    first compile."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its default into the environment the first time it asks (an import can do that), so that value
    # is not a choice someone made.
    if current is None or Path(current).resolve() == Path(default_cache_dir()).resolve():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = current = str(Path(directory).resolve())
    chosen = Path(current)
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def compile_cache_counts() -> dict[str, int]:
    """Inductor's FX graph cache hits and misses so far in this process (a warm cache: hits, no misses)."""
    from torch._dynamo.utils import counters

    return {"hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "misses": int(counters["inductor"]["fxgraph_cache_miss"])}


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < RECOMPILE_LIMIT:
        log.info("raising torch._dynamo.config.%s to %d (one graph per sweep shape)", name, RECOMPILE_LIMIT)
        setattr(config, name, RECOMPILE_LIMIT)


class MatVecAsReduction(torch.overrides.TorchFunctionMode):
    """Inside the compiled CPU decode step, a linear layer applied to one row is ``(x * W).sum(-1)``, not a GEMM.

    At batch 1 every projection is a matrix-vector product. Through ``aten.mm`` (MKL / oneDNN) they ran at about
    11 GB/s on this project's 2-core machine, on one core and a third of its read bandwidth; as a multiply-and-sum,
    inductor fuses each into one vectorized reduction over all cores that reads the weight once (about 25 GB/s for
    SmolLM2's 113 MB lm_head). The sum accumulates in fp32, as the GEMM does; linears on several rows are left alone.

    With ``fp32_template`` (:func:`fp32_gemm_template`: AVX-512 code, a model whose fp32 weights outgrow the caches),
    except fp32 weights that are the model's parameters: once inductor freezes them (:func:`compile_for_one_model`), its
    C++ GEMM template prepacks each into blocks and reads them faster than the reductions read the plain matrix
    (interleaved on an AVX-512 EPYC, the same tokens: SmolLM2's full model 8.79 ms per token against 11.92 when the
    machine's memory reads 74-84 GB/s, less at 52, where both are bound by the bandwidth; the 50% decoder 4.13 against
    5.02; oneDNN's packed linear, the other choice, 10.98 for the decoder). With inductor's 256-bit code on that machine
    (AVX2 emulated) the template was the slower, 10.95 against 10.40. A weight computed in the step (an int8 one
    converted to float) is no parameter and stays a reduction that reads int8; bf16 weights stay reductions too (the
    template with bf16 weights: 13.34 against 7.85 for the full model).

    Traced by dynamo, so it costs nothing at run time; in eager mode it would materialize ``x * W``, so it is used
    only under ``torch.compile``.

    bf16 weights go to the project's CPU kernel instead (``overfill::bf16_linear``: each weight widened to fp32 in
    registers, fp32 sums) where :func:`overfill_lib.int8_kernel.use_kernel` puts it in compiled steps (AVX2): there
    inductor's bf16 reduction read the full model's weights at 36% of the bandwidth (16.6 ms per token, no faster than
    fp32's 16.3, on the AVX2 EPYC). Emulated on an AVX-512 EPYC (inductor's 256-bit code against the kernel's AVX2
    path, interleaved): 8.56 against 7.52 ms per token for SmolLM2's full model, the same tokens; with AVX-512
    inductor's reduction was faster (7.60 against 9.29), so there it stays.
    """

    def __init__(self, fp32_template: bool = False):
        super().__init__()
        self.fp32_template = fp32_template

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].numel() == args[0].shape[-1]:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if self.fp32_template and weight.dtype == torch.float32 and isinstance(weight, torch.nn.Parameter):
                return func(*args, **kwargs)  # inductor's GEMM template, on weights it prepacks (see above)
            to_kernel = weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            if to_kernel and int8_kernel.use_kernel(compiling=True):
                y = torch.ops.overfill.bf16_linear(x.float(), weight)
            else:
                y = (x.unsqueeze(-2) * weight).sum(-1, dtype=torch.float32)
            return (y if bias is None else y + bias).to(x.dtype)
        return func(*args, **kwargs)


def decode_one_token_cpu(*args, fp32_template: bool = False, **kwargs) -> torch.Tensor:
    """:func:`~overfill_lib.generation.decode_one_token` with one-row linears as reductions (the CPU compile target)."""
    with MatVecAsReduction(fp32_template):
        return decode_one_token(*args, **kwargs)


def grouped_query_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention, except that on a CPU, with a mask or one query, grouped key/value heads go to
    SDPA as they are (``enable_gqa``) instead of being copied once per query head first (``repeat_kv``, what
    transformers does under dynamo): a compiled CPU step then reads each layer's static cache in place instead of
    writing and reading a copy three times its size for SmolLM2 (9 heads, 3 key/value heads). Interleaved on the
    AVX-512 EPYC, the same tokens: int8 decoder 1.97 ms per token against 2.18 (32 new tokens), 2.35 against 2.78
    (200), int8 full model 3.89 against 4.05. Anything else goes to transformers' function unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = (groups == 1 or query.device.type != "cpu" or (attention_mask is None and query.shape[2] > 1)
             or any(kwargs.get(k) is not None for k in ("position_bias", "softcap")))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def grouped_query_sdpa():
    """Within it, models whose attention is ``sdpa`` run :func:`grouped_query_attention` (transformers' attention
    registry, restored after). Around every compiled CPU step, whose graph dynamo traces with it and whose guards
    expect it."""
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")  # a local override someone else set, kept
    ALL_ATTENTION_FUNCTIONS["sdpa"] = grouped_query_attention
    try:
        yield
    finally:
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous


FP32_TEMPLATE_MIN_BYTES = 64 * 2**20  # fp32 linear weights that outgrow a CPU's caches (fp32_gemm_template)


def fp32_gemm_template(model) -> bool:
    """Whether the compiled CPU steps of ``model`` leave its one-row products on fp32 weights to inductor's GEMM
    template (:class:`MatVecAsReduction`, :func:`compile_for_one_model`): where inductor writes AVX-512 code (its
    choice of instruction set, which ``torch._inductor.config.cpp.simdlen`` narrows) and the model's fp32 linear
    weights outgrow the caches (:data:`FP32_TEMPLATE_MIN_BYTES`). A model that fits there gains nothing from
    prepacked weights, while the template's autotuning costs seconds per shape and its graphs skip inductor's cache
    (notebook 03's sweeps of the tiny models compile dozens). Read outside the traced step, which takes it as a
    constant."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    fp32_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32)
    return fp32_bytes >= FP32_TEMPLATE_MIN_BYTES and pick_vec_isa().bit_width() >= 512


class ComputeOnce(CustomGraphPass):
    """Inductor pass (after its own): identical calls to the project's kernels (``torch.ops.overfill``, pure
    functions) in one graph are computed once. The int8 layers that read one input call one product on their
    group's matrix (:class:`overfill_lib.quantize.SharedInput`), so q, k and v make one kernel call, gate and up one."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        first: dict = {}
        for node in list(graph.nodes):
            if not (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
                    and node.target.namespace == "overfill"):
                continue
            key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
            if key in first:
                node.replace_all_uses_with(first[key])
                graph.erase_node(node)
            else:
                first[key] = node

    def uuid(self) -> str:
        return "overfill-compute-once-1"  # part of inductor's cache key: change it when the pass changes


_TWINS = itertools.count()


def cpp_wrapper_enabled() -> bool:
    """Whether CPU decode steps are compiled with inductor's C++ wrapper (``OVERFILL_CPP_WRAPPER``: ``1``, the
    default, or ``0``)."""
    value = os.environ.get("OVERFILL_CPP_WRAPPER", "1")
    if value not in ("0", "1"):
        raise ValueError(f"OVERFILL_CPP_WRAPPER={value!r}: use 1 (inductor's C++ wrapper, the default) or 0 (Python)")
    return value == "1"


def compile_for_one_model(mode: str | None = None, cpp_wrapper: bool = True, freezing: bool = True,
                          fp32_template: bool = False):
    """:func:`decode_one_token_cpu` compiled for one model only: under a code object of its own (dynamo keeps compiled
    graphs per code object) and without guards on the model's modules.

    Before every call dynamo checked the ~700 parameters and attributes of a model it had already checked: 2 ms of a
    10 ms int8 decoder step on the AVX2 machine, which ``skip_guard_eval_unsafe`` did not remove (interleaved, the
    same tokens: 8.07-9.24 ms per token without those guards against 9.99-11.19 with them). Without them a graph
    must never meet another model, hence a code object per model; the guards on the inputs (shapes, the cache, grad
    mode) stay, so a new shape still compiles a new graph.

    The graph's wrapper (the code that allocates buffers and calls each kernel in turn) is C++ unless
    ``OVERFILL_CPP_WRAPPER=0``: the Python one spent 2-4 ms of every SmolLM2 step calling ~250 kernels and int8
    products (interleaved on the AVX2 machine: full model fp32 27.2 against 29.1 ms per token, int8 12.4 against
    14.1). Built apart from the kernels (``cpp_wrapper_build_separate``), a cold compile costs about what the Python
    wrapper's does; together it took 329 s instead of 55. ``cpp_wrapper=False`` keeps the Python one.

    Two more cuts of the step's fixed cost. :class:`ComputeOnce`: the int8 layers that read one input make one kernel
    call (121 instead of 211 per SmolLM2 step; int8 full model on the AVX2 machine, interleaved: 10.06 ms per token
    before, 9.23 after). ``freezing``: the model's weights become constants of the graph, not a few hundred arguments
    handed over at every call. The model reaches the graph as an argument, so inductor has parameters to freeze only
    when dynamo's ``prepare_freezing`` is set while the step is traced (:func:`frozen_tracing`, which :class:`StepFn`
    sets for such calls); without it (as before December 2026) ``freezing`` compiled the very same graph, and the
    gains once measured for it were the machine's drift. Frozen for real, interleaved on an AVX-512 EPYC,
    the same tokens: fp32 decoder 5.13 ms per token against 5.27, bf16 decoder 3.93 against 4.15, fp32 full model
    14.42 against 14.75, int8 decoder through the kernel 2.69 against 2.87. A weight replaced by another tensor, or
    changed in place, may not be seen by the step, and ``generate`` refuses that model (:meth:`StepFn.check_unchanged`).
    Inductor also folds what depends on constants only, and an int8 weight converted to float inside the step
    (inductor's own int8 reduction, AVX-512) would become a float copy read at every step (int8 decoder 4.76 ms per
    token against 2.36): so no dtype conversion is folded in these graphs (:func:`frozen_tracing`), the reduction still
    reads int8, and those steps are frozen too (int8 full model 4.33 against 4.59 unfrozen, decoder 2.33 against 2.38).

    ``fp32_template`` (:func:`fp32_gemm_template`): inductor's GEMM template (``max_autotune_gemm``, C++ or ATen,
    inductor benchmarks both per shape at compile time) takes the fp32 linears (:class:`MatVecAsReduction`) and a
    batch's GEMMs; it prepacks their weights into a copy of its own, so a step may not see a weight changed in place,
    and ``generate`` refuses such a model. Linears that read one input (q, k and v; gate and up) are concatenated
    first (``cpp.enable_concat_linear``), one product each: interleaved, the fp32 decoder 5.15 ms per token against
    5.36, the full model 12.08 against 12.32. Such graphs are not kept in inductor's cache (the autotuner's oneDNN
    choice leaves packed tensors in the graph, which inductor cannot pickle), so a new process compiles an fp32 step
    again, about a minute for each SmolLM2 model.

    And no ``size_asserts``: inductor's check, at every call, of the shape and strides of every input (the model's
    weights included, when not frozen: 578 inputs in SmolLM2's int8 step) and of every extern kernel's output. The
    inputs that change (ids, positions, mask, cache) are guarded by dynamo, and the model's own tensors are checked
    once per ``generate`` instead (:meth:`StepFn.check_unchanged`). Interleaved on an AVX-512 EPYC, the same tokens:
    int8 decoder 2.36 ms per token against 2.62 with the checks, int8 full model 4.42 against 4.65, fp32 decoder
    5.65 against 5.82.
    """
    fn = decode_one_token_cpu
    twin = types.FunctionType(fn.__code__.replace(co_name=f"{fn.__name__}_{next(_TWINS)}"), fn.__globals__,
                              fn.__name__)
    twin.__kwdefaults__ = {"fp32_template": fp32_template}
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "freezing": freezing,
               "post_grad_custom_post_pass": ComputeOnce(), "size_asserts": False}
    if fp32_template:
        options |= {"max_autotune_gemm": True, "max_autotune_gemm_backends": "CPP,ATEN",
                    "cpp.enable_concat_linear": True}
    if cpp_wrapper:
        options |= {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
    step = torch.compile(twin, mode=mode, fullgraph=True, dynamic=False, options=options)
    step.frozen = freezing  # StepFn runs its calls that may trace under frozen_tracing()
    return step


@contextlib.contextmanager
def frozen_tracing():
    """What a step compiled with ``freezing`` is traced under (:func:`compile_for_one_model`): dynamo's
    ``prepare_freezing``, so that inductor has the model's parameters to freeze, and no dtype conversion among the
    constants inductor folds, so that an int8 weight stays int8 (converted in registers as the reduction reads it)."""
    from torch._inductor import constant_folding

    convert = torch.ops.prims.convert_element_type.default
    with torch._dynamo.config.patch(prepare_freezing=True):
        constant_folding.add_dont_constant_fold(convert)
        try:
            yield
        finally:
            constant_folding._dont_constant_fold.remove(convert)  # only the entry added here


class StepFn:
    """The decode stage, :func:`~overfill_lib.generation.decode_one_token` (greedy), on a static cache.

    ``compile``: ``torch.compile(fullgraph=True, dynamic=False)`` of that very function (on CPU of
    :func:`decode_one_token_cpu`), one graph per (model, batch, cache length, q); ``mode`` defaults to
    ``"reduce-overhead"`` (CUDA graphs) on CUDA and inductor's default on CPU. ``fallback``: if compiling
    fails, log it and run eagerly (``compiled`` turns False so the path label stays true); otherwise the
    error is raised.

    Guards: before running a compiled graph, dynamo checks that its inputs still match what it was compiled for (the
    modules, shapes, the cache). On a CPU each model gets its own compiled function without the guards on its modules
    (:func:`compile_for_one_model`; keyed on the model object and its quantization, so a model quantized in place
    compiles anew; a model changed otherwise after its first compiled step wants a new
    generator: its weights are constants of the compiled graph, and one whose tensors were replaced or changed shape,
    strides or dtype is refused by name, :meth:`check_unchanged`). And once a step has run compiled on a model, a cache
    object and input shapes, the same call can only pick the same graph again, so later calls run under
    ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``. Anything new (another model, cache or shape) runs with
    every remaining guard first. On a GPU neither: one compiled function, every guard (not yet run there). On a CPU the
    graphs' wrapper is C++ unless ``OVERFILL_CPP_WRAPPER=0`` (:func:`cpp_wrapper_enabled`, read here, so a bad value
    fails before any compile); with ``fallback``, a first compile that fails with it is tried again with the Python
    wrapper before running eagerly.
    """

    def __init__(self, compile: bool, device: torch.device, mode: str | None = None, fallback: bool = False):
        self.device = torch.device(device)
        self.compiled = bool(compile)
        self.fallback = fallback
        self.mode = mode if mode is not None else ("reduce-overhead" if self.device.type == "cuda" else None)
        self._fn = decode_one_token
        self._compiled_once = False
        self._warm: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(id(cache), shapes): step}
        self._per_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CPU: model -> {key: fn}
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CPU: model -> {quantization: layout}
        self.cpp_wrapper = self.compiled and self.device.type == "cpu" and cpp_wrapper_enabled()  # checked here
        if self.compiled:
            _raise_recompile_limit()
            if self.device.type != "cpu":
                self._fn = torch.compile(decode_one_token, mode=self.mode, fullgraph=True, dynamic=False)

    def compiled_for(self, model):
        """The compiled step that runs ``model``: on a CPU its own, frozen (:func:`compile_for_one_model`)."""
        if self.device.type != "cpu":
            return self._fn
        key = getattr(model, "quantization", None)
        per_key = self._per_model.setdefault(model, {})
        if key not in per_key:
            if any(p.dtype == torch.bfloat16 for p in model.parameters()):
                int8_kernel.load()  # bf16 products may go to the kernel (MatVecAsReduction): loaded before tracing
            quantize.share_inputs(model)  # (again) in case a .to() or a replaced weight undid the stacking
            self._layouts.setdefault(model, {})[key] = _layout(model)
            per_key[key] = compile_for_one_model(self.mode, self.cpp_wrapper, fp32_template=fp32_gemm_template(model))
        return per_key[key]

    def check_unchanged(self, models) -> None:
        """Raise if a model's tensors were replaced, changed in place (their version counter) or changed shape,
        strides or dtype since its CPU step was compiled: the step holds the weights it was compiled with (fp32 ones
        as a prepacked copy) and checks none of them when it runs (:func:`compile_for_one_model`). Once per
        ``generate``, not per step. A change made through ``.data`` bumps no counter and is not seen."""
        for model in models:
            recorded = self._layouts.get(model, {}).get(getattr(model, "quantization", None))
            if recorded is not None and recorded != _layout(model):
                raise ValueError(f"this {type(model).__name__}'s weights were replaced, changed in place, or changed "
                                 "shape, strides or dtype after its decode step was compiled, and a compiled step "
                                 "holds the weights it was compiled with: make a new FastGenerator for the changed "
                                 "model")

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.compiled and self.device.type == "cuda" and self.mode in ("reduce-overhead", "max-autotune")

    def __call__(self, model, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
        kw = cache_keyword(model)
        if not self.compiled:
            return decode_one_token(model, input_ids, position_ids, attention_mask, cache, cache_kw=kw)
        if self.uses_cuda_graphs:
            # Tells CUDA graph trees that the previous replay's outputs are consumed (we clone them).
            torch.compiler.cudagraph_mark_step_begin()
        input_ids, position_ids, attention_mask = map(_standard_layout, (input_ids, position_ids, attention_mask))
        warm = self._warm.setdefault(model, {})
        key = (id(cache), input_ids.shape, position_ids.shape, attention_mask.shape, torch.is_inference_mode_enabled())
        step = warm.get(key)  # what ran on this model, cache and shapes before (no per-step lookup)
        try:
            if step is None:
                step = self.compiled_for(model)
            if key in warm and self.device.type == "cpu":  # the same graph again: no guards, no tracing
                context = torch.compiler.set_stance(skip_guard_eval_unsafe=True)
            else:  # may trace: a frozen step must be traced under frozen_tracing()
                context = frozen_tracing() if getattr(step, "frozen", False) else contextlib.nullcontext()
            attention = grouped_query_sdpa() if self.device.type == "cpu" else contextlib.nullcontext()
            with context, attention:
                out = step(model, input_ids, position_ids, attention_mask, cache, cache_kw=kw).clone()
        except Exception as e:
            # Only a failure to compile at all falls back; out-of-memory and later errors are real.
            if not self.fallback or self._compiled_once or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            if self.cpp_wrapper:  # first the Python wrapper, which needs less of the C++ toolchain
                log.warning("compiling the decode step with inductor's C++ wrapper failed (%s: %s); trying the Python "
                            "wrapper (OVERFILL_CPP_WRAPPER=0 skips this try)", type(e).__name__, e)
                self.cpp_wrapper = False
                self._per_model.clear()
                self._warm.clear()
                return self(model, input_ids, position_ids, attention_mask, cache)
            log.warning("torch.compile of the decode step failed (%s: %s); running eagerly", type(e).__name__, e)
            self.compiled = False
            return decode_one_token(model, input_ids, position_ids, attention_mask, cache, cache_kw=kw)
        self._compiled_once = True
        warm[key] = step
        return out

    def forget(self) -> None:
        """Run every later call with all its guards again (the caches it saw are gone)."""
        self._warm.clear()


def _layout(model) -> list:
    """What a compiled (frozen) step takes for granted about a model: each parameter and buffer, by its memory,
    shape, strides, dtype and version (in-place changes: the step may hold a prepacked copy)."""
    return [(t.data_ptr(), t.shape, t.stride(), t.dtype, _version(t))
            for t in itertools.chain(model.parameters(), model.buffers())]


def _version(t: torch.Tensor) -> int | None:
    """How many times ``t`` was changed in place (None for a tensor made under inference mode, which keeps no count)."""
    return None if t.is_inference() else t._version


class _Clock:
    """Stage marks without host syncs: CUDA events on GPU (read once at the end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds from the first mark to each later one."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(m) / 1000.0 for m in self.marks[1:]]
        return [m - self.marks[0] for m in self.marks[1:]]


def _finish(new: torch.Tensor, eos: list[int], pad: int) -> tuple[torch.Tensor, list[str]]:
    """Pad each row after its first eos and stop where the last row ended, as the plain loop does."""
    if not eos or new.shape[1] == 0:
        return new, ["length"] * new.shape[0]
    real = through_first_eos(new, eos)
    ended = torch.isin(new, torch.tensor(eos, device=new.device)).any(1)
    new = new.masked_fill(~real, pad)
    reasons = ["eos" if e else "length" for e in ended.tolist()]
    if bool(ended.all()):
        new = new[:, : int(real.sum(1).max())]  # every row ended: stop where the last one did
    return new, reasons


def _all_ended(tokens: list[torch.Tensor], eos_t: torch.Tensor | None) -> bool:
    return eos_t is not None and bool(torch.isin(torch.stack(tokens, 1), eos_t).any(1).all())


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------


class FastGenerator:
    """Static-cache greedy generation for OverFill and its baselines, compiled where it pays.

    Args:
        full: the full model (prefill for ``overfill``; alone for ``full``; target for ``speculative``).
        decoder: the pruned decoder (decode for ``overfill``; alone for ``decoder``; draft for ``speculative``).
        compile: ``True``, ``False`` or ``"auto"`` (compiled, and if compiling fails, eager with a warning and
            the ``path`` label saying so). Eager is the reference; it is no faster than plain ``generate``
            (on CPU compiled steps were 3-4x faster, see ``benchmarks/cpu_decode.py``), and a first compile
            costs seconds per (model, batch, cache length) on a GPU, 2-50 s on a 2-core CPU.
        mode: ``torch.compile`` mode (default ``"reduce-overhead"`` on CUDA, inductor's default on CPU).
        sync_every: decode steps between eos checks (each check is one host sync).
    """

    def __init__(self, full=None, decoder=None, *, compile: bool | str = "auto", mode: str | None = None, sync_every: int = 16):
        if full is None and decoder is None:
            raise ValueError("FastGenerator needs a full model, a decoder, or both")
        models = [m for m in (full, decoder) if m is not None]
        devices = {next(m.parameters()).device for m in models}
        dtypes = {next(m.parameters()).dtype for m in models}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ValueError(
                f"the full model and the decoder must share one device and dtype (got {sorted(map(str, devices))}, "
                f"{sorted(map(str, dtypes))}): their KV cache is one tensor. Move both with .to(device, dtype)."
            )
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile={compile!r}: use True, False or 'auto'")
        if sync_every < 1:
            raise ValueError(f"sync_every={sync_every} must be >= 1")
        self.full, self.decoder = full, decoder
        self.device = devices.pop()
        self.dtype = dtypes.pop()
        if full is not None and decoder is not None:
            _check_shared_shape(full.config, decoder.config)
        self.step = StepFn(bool(compile), self.device, mode, fallback=compile == "auto")
        self.sync_every = sync_every
        self._caches: dict[tuple, StaticCache] = {}
        for m in models:
            m.eval()

    @classmethod
    def from_pair(cls, pair, **kwargs) -> FastGenerator:
        """From an :class:`overfill_lib.pair.OverFillModel`; the fast path needs its ``shared_kv`` strategy."""
        if pair.strategy.name != "shared_kv":
            raise ValueError(
                f"the fast path shares one static cache between the models, which needs strategy 'shared_kv' "
                f"(this pair uses {pair.strategy.name!r}); generate with pair.generate(...) instead"
            )
        return cls(pair.full, pair.decoder, **kwargs)

    @property
    def path(self) -> str:
        return PATH_COMPILED if self.step.compiled else PATH_EAGER

    def clear_caches(self) -> None:
        """Free the pooled static caches (a new shape allocates a new one)."""
        self._caches.clear()
        self.step.forget()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def cache(self, slot: str, model, batch: int, length: int) -> StaticCache:
        """A zeroed static cache of ``length`` positions, reused across calls with the same shape.

        Reuse matters under CUDA graphs: a recorded graph reads the cache at fixed addresses, and a new
        allocation would force a re-record. ``slot`` separates caches used at the same time
        (the speculative target's and draft's).
        """
        c = model.config
        key = (slot, batch, length, c.num_hidden_layers, c.num_key_value_heads, head_dim_of(c))
        cache = self._caches.get(key)
        if cache is None:
            cache = StaticCache(config=c, max_cache_len=length)
            self._caches[key] = cache
        else:
            cache.reset()
        return cache

    def _model(self, role: str):
        model = self.full if role == "full" else self.decoder
        if model is None:
            raise ValueError(f"this method needs the {role} model; build FastGenerator(full=..., decoder=...)")
        return model

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int],
        attention_mask: torch.Tensor | None = None,
        *,
        method: str = "overfill",
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None | str = "default",
        pad_token_id: int | None = None,
        num_draft_tokens: int = 4,
    ) -> FastOutput:
        """Greedy generation by ``method`` (``overfill``, ``full``, ``decoder``, ``speculative``).

        ``input_ids`` [batch, prompt] left-padded, with ``attention_mask`` (default all ones), or ragged lists of
        ids, as ``pair.generate`` takes them (:func:`~overfill_lib.generation.prompt_batch`).
        ``eos_token_id``: as in ``pair.generate`` (:func:`~overfill_lib.generation.eos_ids`): ``"default"`` (the
        first model's generation config), ids, or ``None`` / ``[]`` to always produce ``max_new_tokens`` (benchmarks).
        """
        if method not in DECODE_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(DECODE_METHODS)}")
        max_new_tokens = check_new_tokens(max_new_tokens)
        self.step.check_unchanged(m for m in (self.full, self.decoder) if m is not None)
        first = self._model("decoder" if method == "decoder" else "full")
        eos = eos_ids(first, eos_token_id)
        pad = pad_token_for(first, eos=eos, pad_token_id=pad_token_id)
        input_ids, attention_mask = prompt_batch(input_ids, attention_mask, pad, first)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        check_padded(input_ids, attention_mask)  # positions: check_positions below, with the new tokens
        check_positions(first, attention_mask, max_new_tokens)
        if method == "speculative":
            if num_draft_tokens < 1:
                raise ValueError(f"num_draft_tokens={num_draft_tokens} must be >= 1")
            new, timings = self._speculative(input_ids, attention_mask, max_new_tokens, eos, num_draft_tokens)
        else:
            prefill_model = first
            step_model = self._model("full" if method == "full" else "decoder")
            new, timings = self._two_stage(prefill_model, step_model, input_ids, attention_mask, max_new_tokens, eos)
        new, reasons = _finish(new, eos, pad)
        timings.steps = new.shape[1]
        return FastOutput(torch.cat([input_ids, new], 1), new, reasons, method, self.path, timings)

    # -- one model prefills, one (maybe the same) decodes ------------------------------------------

    def _two_stage(self, prefill_model, step_model, input_ids, attention_mask, limit: int, eos: list[int]):
        batch, prompt = input_ids.shape
        length = prompt + limit
        cache = self.cache("main", prefill_model, batch, length)
        # Fixed-width mask: the prompt's padding, then ones; the causal mask hides unwritten positions.
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, limit)], 1)
        eos_t = torch.tensor(eos, device=self.device, dtype=torch.long) if eos else None
        clock = _Clock(self.device)
        clock.mark()
        first = prefill(prefill_model, input_ids, attention_mask, cache)
        tokens = [greedy(first.logits[:, -1])]
        clock.mark()
        decode_n_tokens(lambda ids, pos: self.step(step_model, ids, pos, mask, cache)[:, 0], tokens,
                        first.position_ids[:, -1:], limit - 1,
                        stop=lambda i, tokens: i % self.sync_every == 0 and _all_ended(tokens, eos_t))
        clock.mark()
        ttft, total = clock.seconds()
        timings = FastTimings(ttft_s=ttft, decode_s=total - ttft, batch_size=batch, prompt_length=prompt,
                              max_cache_len=length, forwards=len(tokens) - 1)
        return torch.stack(tokens, 1), timings

    def _speculative(self, input_ids, attention_mask, limit: int, eos: list[int], gamma: int):
        """Rounds of :func:`~overfill_lib.generation.speculative_decode`, both static caches rolled back after each."""
        full, draft = self._model("full"), self._model("decoder")
        batch, prompt = input_ids.shape
        length = prompt + limit + gamma + 1  # the last round may verify past the limit
        target_cache = self.cache("target", full, batch, length)
        draft_cache = self.cache("draft", draft, batch, length)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, length - prompt)], 1)
        eos_t = torch.tensor(eos, device=self.device, dtype=torch.long) if eos else None
        timings = FastTimings(batch_size=batch, prompt_length=prompt, max_cache_len=length)
        clock = _Clock(self.device)
        clock.mark()
        first = prefill(full, input_ids, attention_mask, target_cache)
        tokens = [greedy(first.logits[:, -1])]
        clock.mark()
        prefill(draft, input_ids, attention_mask, draft_cache)
        filled = prompt  # positions written in both caches
        last = first.position_ids[:, -1:] + 1  # position of tokens[-1], not yet in either cache
        while len(tokens) < limit and not _all_ended(tokens, eos_t):
            accepted, n = speculative_decode(lambda ids, pos: self.step(draft, ids, pos, mask, draft_cache),
                                             lambda ids, pos: self.step(full, ids, pos, mask, target_cache),
                                             tokens[-1], last, gamma)
            filled += n + 1
            set_cache_length(target_cache, filled)
            set_cache_length(draft_cache, filled)
            tokens.extend(accepted.unbind(1))
            last = last + n + 1
            timings.forwards += gamma + 1 + (n == gamma)
            timings.rounds += 1
            timings.proposed += gamma
            timings.accepted += n
        clock.mark()
        ttft, total = clock.seconds()
        timings.ttft_s, timings.decode_s = ttft, total - ttft
        return torch.stack(tokens[:limit], 1), timings


def _check_shared_shape(full_config, decoder_config) -> None:
    if bad := kv_mismatches(full_config, decoder_config):
        diff = "; ".join(bad)
        raise ValueError(
            f"the fast path needs the decoder's KV cache to have the full model's shape, but they differ in {diff}. "
            "Pair them with a projection strategy and use pair.generate(...) instead."
        )
