"""Latency measurement: timings, sweeps, achieved bandwidth and the speculative-decoding comparison.

Decode is memory-bound, so every decode timing is reported beside the bytes its step reads (``cost``) as a fraction
of the copy bandwidth measured in the same run. Every record carries the ``path`` that made it (fast compiled or
eager, HF ``generate``, the eager pair, HF assisted, modelled), an out-of-memory point is recorded as such, and the
results JSON is rewritten after every point. Only torch and transformers are imported, for bare GPU machines::

    python -m overfill_lib.latency --suite real --device cuda --out results/gpu/h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoModelForCausalLM

from overfill_lib import cost, fast_decode, quantize
from overfill_lib.artifacts import environment_record, load_causal_lm, read_json, write_json
from overfill_lib.generation import eos_ids, positions_from_mask, through_first_eos, with_cache
from overfill_lib.timing import copy_bandwidth, summarize, time_repeated

log = logging.getLogger(__name__)

FORMAT = "overfill-latency"
FORMAT_VERSION = 1
PATH_HF = "hf-generate-eager"
PATH_PAIR = "pair-generate-eager"
PATH_ASSISTED = "hf-assisted"


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass
class LatencySettings:
    """What a profiling run sweeps; a preset's ``latency:`` section gives any of these keys.

    The three sweeps share one base point (``base_prompt``, ``base_new_tokens``, batch 1): the
    output-length sweep varies new tokens, the prompt-length sweep the prompt, the batch sweep the
    batch. With equal base prompt and new-token counts many points share a cache length, so
    compiled graphs are reused across sweeps.
    """

    output_lengths: list[int] = field(default_factory=lambda: [32, 128, 512, 2048])
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    base_prompt: int = 128
    base_new_tokens: int = 128
    methods: list[str] = field(default_factory=lambda: list(fast_decode.DECODE_METHODS))
    warmup: int = 2
    repeats: int = 5
    draft_tokens: int = 4  # speculative draft length (gamma) of measured runs and sweep-wide modelling
    draft_token_grid: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 6, 8])  # gammas modelled at the base point
    acceptance_grid: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    eager_baselines: bool = True  # time the eager paths at the base point (fast vs slow)
    eager_new_tokens: int | None = None  # new tokens of the eager runs (default base_new_tokens)
    measured_speculative: bool = True  # run the speculative loop (meaningful only with trained weights)
    copy_bytes: int | None = None  # copy-benchmark tensor size (default 1 GiB on GPU, 256 MiB on CPU)
    roofline_contexts: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192, 32768, 131072])
    seed: int = 0
    # The fast path's decode step: "auto" compiles it (a CPU too; eager if compiling fails), false runs it eagerly.
    # One compile per (model, batch, cache length) costs seconds on a GPU and 2-50 s on a 2-core CPU.
    compile: bool | str = "auto"

    @classmethod
    def from_dict(cls, data: dict | None, base: LatencySettings | None = None) -> LatencySettings:
        """Settings from a mapping (a preset's ``latency:`` section) on top of ``base``; unknown keys are refused."""
        from overfill_lib.config import values

        merged = {**asdict(base or cls()), **values(cls, data, "latency")}
        settings = cls(**merged)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("output_lengths", "prompt_lengths", "batch_sizes", "draft_token_grid"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ValueError(f"latency setting {name}={values!r} must be a non-empty list of positive ints")
        for name in ("base_prompt", "base_new_tokens", "repeats", "draft_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"latency setting {name}={value!r} must be a positive int")
        if self.warmup < 0:
            raise ValueError(f"latency setting warmup={self.warmup} must be >= 0")
        bad = [m for m in self.methods if m not in fast_decode.DECODE_METHODS]
        if bad:
            raise ValueError(f"unknown latency method(s) {bad}; choose from {', '.join(fast_decode.DECODE_METHODS)}")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"latency setting compile={self.compile!r}: use auto, true or false")
        if any(not 0.0 <= a <= 1.0 for a in self.acceptance_grid):
            raise ValueError(f"acceptance_grid {self.acceptance_grid} must hold rates in [0, 1]")

    def points(self) -> list[dict]:
        """The distinct (batch, prompt, new_tokens) points of the three sweeps, each with the sweeps it belongs to."""
        out: dict[tuple[int, int, int], list[str]] = {}
        for n in self.output_lengths:
            out.setdefault((1, self.base_prompt, n), []).append("output")
        for p in self.prompt_lengths:
            out.setdefault((1, p, self.base_new_tokens), []).append("prompt")
        for b in self.batch_sizes:
            out.setdefault((b, self.base_prompt, self.base_new_tokens), []).append("batch")
        base = (1, self.base_prompt, self.base_new_tokens)
        out.setdefault(base, []).append("base")
        return [{"batch": b, "prompt": p, "new_tokens": n, "sweeps": s} for (b, p, n), s in out.items()]


# Sweeps for real-size models on a GPU (the ranges) and a quick variant of them.
REAL_SETTINGS = LatencySettings()
QUICK_SETTINGS = LatencySettings(
    output_lengths=[32, 256], prompt_lengths=[128, 2048], batch_sizes=[1, 16], base_prompt=128,
    base_new_tokens=256, repeats=3, draft_token_grid=[2, 4], eager_new_tokens=32,
)


# --------------------------------------------------------------------------------------------------
# Real-size architectures with random weights
# --------------------------------------------------------------------------------------------------


def real_size_pairs() -> dict[str, tuple[Any, Any]]:
    """(full config, decoder config) of the paper's two Llama pairings.

    3B -> "1B": hidden and intermediate pruned 45%, rounded to multiples of 8 (the llama-3.2-3b preset).
    8B -> "3B": hidden 2432, intermediate 7680 (the rebuttal's sizes; the llama-3.1-8b preset).
    """
    from overfill_lib.architectures import published_config
    from overfill_lib.pruning import pruned_config

    c3, c8 = published_config("llama-3.2-3b"), published_config("llama-3.1-8b")
    return {
        "llama-3.2-3b": (c3, pruned_config(c3, hidden=0.45, intermediate=0.45, round_to=8)),
        "llama-3.1-8b": (c8, pruned_config(c8, hidden=2432, intermediate=7680)),
    }


def build_random_model(config, device: str | torch.device, dtype: torch.dtype):
    """A causal LM from ``config`` with random weights, allocated directly on ``device`` in ``dtype``."""
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------

PromptFn = Callable[[int, int], torch.Tensor]


def random_prompts(vocab_size: int, seed: int = 0, low: int = 0) -> PromptFn:
    """Prompt ids [batch, length] drawn uniformly (content does not change a random model's cost)."""

    def make(batch: int, length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 7919 * batch + length)
        return torch.randint(low, vocab_size, (batch, length), generator=g)

    return make


def tiled_prompts(prompts: Sequence[Sequence[int]]) -> PromptFn:
    """Prompt ids [batch, length] made of whole real prompts laid end to end, cut on the left.

    Each row ends exactly at the end of one real prompt (its generation header), so a trained
    model continues with a real answer whatever the length; rows start at different prompts.
    """
    prompts = [list(p) for p in prompts if len(p)]
    if not prompts:
        raise ValueError("tiled_prompts needs at least one non-empty prompt")

    def make(batch: int, length: int) -> torch.Tensor:
        rows = []
        for r in range(batch):
            ids: list[int] = []
            k = r
            while len(ids) < length:
                ids = list(prompts[k % len(prompts)]) + ids
                k += batch
            rows.append(ids[-length:])
        return torch.tensor(rows, dtype=torch.long)

    return make


# --------------------------------------------------------------------------------------------------
# Measuring one configuration
# --------------------------------------------------------------------------------------------------


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, getattr(torch, "OutOfMemoryError", ())) or isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def oom_guard(record: dict, device: torch.device, cleanup: Callable[[], None] | None = None):
    """Record an out-of-memory point as such (``status: "oom"``) instead of ending the sweep."""
    try:
        yield
    except Exception as e:
        if not _is_oom(e):
            raise
        record.update(status="oom", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        log.warning("out of memory at %s", {k: record.get(k) for k in ("pair", "method", "batch", "prompt", "new_tokens")})
        if cleanup is not None:
            cleanup()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _bandwidth_fields(step_bytes: dict | None, per_token_s: float, copy_bw: dict | None) -> dict:
    if step_bytes is None or per_token_s <= 0:
        return {"bytes_per_step": step_bytes, "achieved_bytes_per_s": None, "bandwidth_fraction": None}
    achieved = step_bytes["total"] / per_token_s
    fraction = achieved / copy_bw["bytes_per_s"] if copy_bw else None
    return {"bytes_per_step": step_bytes, "achieved_bytes_per_s": achieved, "bandwidth_fraction": fraction}


def measure_fast(
    gen: fast_decode.FastGenerator,
    method: str,
    *,
    batch: int,
    prompt: int,
    new_tokens: int,
    prompt_fn: PromptFn,
    warmup: int,
    repeats: int,
    draft_tokens: int = 4,
    copy_bw: dict | None = None,
) -> dict:
    """Time ``gen.generate(method)`` at one point: TTFT, per-token, end-to-end, tokens/s, memory, bandwidth.

    eos is disabled so every run produces exactly ``new_tokens`` tokens.
    """
    ids = prompt_fn(batch, prompt).to(gen.device)
    kw = dict(method=method, max_new_tokens=new_tokens, eos_token_id=[], num_draft_tokens=draft_tokens)
    for _ in range(warmup):
        gen.generate(ids, **kw)
    _reset_peak(gen.device)
    runs = [gen.generate(ids, **kw) for _ in range(repeats)]
    t = [r.timings for r in runs]
    ttft = summarize(x.ttft_s for x in t)
    per_token = summarize(x.per_token_s for x in t) if new_tokens > 1 else None
    e2e = summarize(x.total_s for x in t)
    nbytes = cost.dtype_bytes(gen.dtype)
    full_cfg = gen.full.config if gen.full is not None else gen.decoder.config
    dec_cfg = gen.decoder.config if gen.decoder is not None else full_cfg
    record = {
        "method": method, "path": runs[0].path, "status": "ok", "batch": batch, "prompt": prompt,
        "new_tokens": new_tokens, "max_cache_len": t[0].max_cache_len,
        "ttft_s": ttft, "per_token_s": per_token, "e2e_s": e2e,
        "tokens_per_s": batch * new_tokens / e2e["median"],
        "decode_tokens_per_s": batch / per_token["median"] if per_token else None,
        "peak_memory_bytes": _peak(gen.device),
    }
    record |= _bandwidth_fields(
        cost.method_step_bytes(method, full_cfg, dec_cfg, nbytes, batch, t[0].max_cache_len),
        per_token["median"] if per_token else 0.0, copy_bw,
    )
    record["memory_estimate_bytes"] = cost.memory_estimate(method, full_cfg, dec_cfg, nbytes, batch, t[0].max_cache_len)
    if method == "speculative":
        record |= {"draft_tokens": draft_tokens, "acceptance": summarize(x.acceptance or 0.0 for x in t),
                   "rounds": t[0].rounds}
    return record


@torch.inference_mode()
def measure_forward(
    gen: fast_decode.FastGenerator,
    role: str,
    *,
    batch: int,
    context: int,
    queries: int,
    cache_len: int,
    prompt_fn: PromptFn,
    warmup: int,
    repeats: int,
) -> dict:
    """Seconds per forward of ``queries`` new tokens on a static cache (a draft step or a verify step).

    The cache holds ``context`` prompt positions; each sample runs ``k`` forwards back to back
    (the context grows by ``queries`` each, staying within ``cache_len``) and is rolled back to
    ``context`` before the next sample, outside the timed region. The step function is the one
    generation uses (same compiled graphs, same path label).
    """
    model = gen.full if role == "full" else gen.decoder
    k = max(1, min(8, (cache_len - context) // queries))
    if context + k * queries > cache_len:
        raise ValueError(f"cache_len {cache_len} cannot hold context {context} + {queries} new tokens")
    # The generation runs' own cache object at this shape: under CUDA graphs a different buffer
    # would force graphs to be re-recorded for new static addresses.
    cache = gen.cache("main", model, batch, cache_len)
    ids = prompt_fn(batch, context).to(gen.device)
    mask = torch.ones(batch, cache_len, dtype=torch.long, device=gen.device)
    model(input_ids=ids, **with_cache(model, cache), use_cache=True, attention_mask=mask[:, :context])
    new = prompt_fn(batch, queries).to(gen.device)
    positions = [(context + j * queries + torch.arange(queries, device=gen.device)).repeat(batch, 1) for j in range(k)]

    def run():
        for pos in positions:
            gen.step(model, new, pos, mask, cache)

    seconds = time_repeated(run, gen.device, warmup=warmup, repeats=repeats,
                            before=lambda: fast_decode.set_cache_length(cache, context))
    return {"role": role, "batch": batch, "context": context, "queries": queries, "cache_len": cache_len,
            "path": gen.path, "seconds": summarize(s / k for s in seconds), "forwards_per_sample": k}


@torch.inference_mode()
def measure_hf_generate(model, *, batch: int, prompt: int, new_tokens: int, prompt_fn: PromptFn, warmup: int,
                        repeats: int, assistant=None) -> dict:
    """Hugging Face ``generate`` (eager, dynamic cache), greedy; ``assistant``: assisted generation.

    TTFT is the time of a 1-token call; per-token = (e2e(N) - e2e(1)) / (N - 1) on medians.
    ``min_new_tokens`` holds eos off so each call makes exactly N tokens.
    """
    device = next(model.parameters()).device
    ids = prompt_fn(batch, prompt).to(device)
    mask = torch.ones_like(ids)
    extra = {"assistant_model": assistant} if assistant is not None else {}

    def call(n: int):
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      **extra)

    first = summarize(time_repeated(call(1), device, warmup=warmup, repeats=repeats))
    e2e = summarize(time_repeated(call(new_tokens), device, warmup=min(warmup, 1), repeats=repeats))
    per_token = (e2e["median"] - first["median"]) / (new_tokens - 1) if new_tokens > 1 else None
    return {
        "method": "speculative" if assistant is not None else None, "path": PATH_ASSISTED if assistant is not None else PATH_HF,
        "status": "ok", "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "ttft_s": first,
        "per_token_s": {"median": per_token, "p10": None, "p90": None, "n": repeats} if per_token is not None else None,
        "e2e_s": e2e, "tokens_per_s": batch * new_tokens / e2e["median"], "peak_memory_bytes": None,
        "per_token_note": "(median e2e(N) - median e2e(1)) / (N - 1)",
    }


def measure_pair_generate(full, decoder, *, batch: int, prompt: int, new_tokens: int, prompt_fn: PromptFn,
                          warmup: int, repeats: int) -> dict:
    """OverFill's plain loop (:func:`overfill_lib.generation.generate`: eager, dynamic cache), greedy."""
    from overfill_lib.pair import OverFillModel

    pair = OverFillModel(full, decoder, "shared_kv")
    device = next(full.parameters()).device
    ids = prompt_fn(batch, prompt).to(device)

    def run():
        return pair.generate(ids, torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)

    for _ in range(warmup):
        run()
    t = [run().timings for _ in range(repeats)]
    ttft = summarize(x.prefill_s for x in t)
    per_token = summarize(x.per_token_decode_s for x in t) if new_tokens > 1 else None
    e2e = summarize(x.total_s for x in t)
    return {
        "method": "overfill", "path": PATH_PAIR, "status": "ok", "batch": batch, "prompt": prompt,
        "new_tokens": new_tokens, "ttft_s": ttft, "per_token_s": per_token, "e2e_s": e2e,
        "tokens_per_s": batch * new_tokens / e2e["median"], "peak_memory_bytes": None,
    }


# --------------------------------------------------------------------------------------------------
# Speculative decoding: acceptance
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def acceptance_rate(target, draft, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    max_new_tokens: int = 32, eos_token_id="default") -> dict:
    """Per-token acceptance of greedy speculative decoding, by teacher forcing.

    The target generates greedily (fast path); both models then read prompt + generated tokens in
    one forward each, and at every generated position we check whether the draft's greedy choice
    equals the target's token. Under greedy verification that match is exactly "the draft token is
    accepted", so the mean is the per-token acceptance rate alpha of the standard analysis.
    ``target_agreement`` (the target's teacher-forced argmax vs its own generated tokens) checks
    that the two computations agree numerically.
    """
    device = next(target.parameters()).device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    out = fast_decode.FastGenerator(full=target, compile=False).generate(
        input_ids, attention_mask, method="full", max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    new = out.new_tokens
    prompt = input_ids.shape[1]
    eos = eos_ids(target, eos_token_id)
    real = through_first_eos(new, eos)  # the generated positions, up to and including each row's eos
    seq = out.sequences
    mask = torch.cat([attention_mask, real.long()], 1)
    pos = positions_from_mask(mask)
    predictions = {}
    for name, model in (("target", target), ("draft", draft)):
        logits = model(input_ids=seq, attention_mask=mask, position_ids=pos).logits
        predictions[name] = logits[:, prompt - 1 : -1].argmax(-1)  # predicts new[:, t] for every t
    hits = (predictions["draft"] == new) & real
    agree = (predictions["target"] == new) & real
    n = int(real.sum())
    return {"alpha": float(hits.sum()) / n, "positions": n, "target_agreement": float(agree.sum()) / n,
            "prompts": int(new.shape[0]), "max_new_tokens": max_new_tokens}


# --------------------------------------------------------------------------------------------------
# A suite: every sweep for one or more (full, decoder) pairs
# --------------------------------------------------------------------------------------------------


@dataclass
class PairSpec:
    """A (full, decoder) pair to profile: ``load()`` returns the two models, on the device, in the dtype."""

    name: str
    load: Callable[[], tuple[Any, Any]]
    prompt_fn: PromptFn | None = None  # default: random ids over the vocabulary
    alpha: dict | None = None  # measured acceptance (see acceptance_rate), if any
    weights: str = "random"  # "random" or "trained": whether measured speculative runs mean anything


def _save(results: dict, out: Path | None) -> None:
    if out is not None:
        write_json(out, results)


def run_suite(
    pairs: Sequence[PairSpec],
    settings: LatencySettings,
    *,
    device: str | torch.device,
    compile: bool | str | None = None,
    label: str = "",
    out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Profile every pair over the settings' sweeps; returns (and keeps writing to ``out``) the results.
    ``compile``: the fast path's (``True``, ``False``, ``"auto"``); default ``settings.compile``."""
    device = torch.device(device)
    out = Path(out) if out is not None else None
    copy_bw = copy_bandwidth(device, settings.copy_bytes)
    log.info("copy bandwidth on %s: %.1f GB/s", device, copy_bw["bytes_per_s"] / 1e9)
    results = {
        "format": FORMAT, "version": FORMAT_VERSION, "label": label,
        "environment": environment_record(str(device), settings.seed),
        "settings": asdict(settings), "copy_bandwidth": copy_bw,
        "pairs": {}, "records": [], "forward_costs": [], "speculative_model": [],
    }
    _save(results, out)
    for spec in pairs:
        _profile_pair(results, spec, settings, device, settings.compile if compile is None else compile, progress, out)
    return results


def _profile_pair(results: dict, spec: PairSpec, settings: LatencySettings, device: torch.device,
                  compile: bool | str, progress: bool, out: Path | None) -> None:
    """One pair: its summary, every sweep point, the eager baselines and the speculative model; then its models and
    compiled graphs are freed before the next pair loads."""
    full, decoder = spec.load()
    for model in (full, decoder):
        # Inference only; and the eager pair path freezes the full model, which would otherwise
        # change a compiled graph's guards (requires_grad) half-way through.
        model.requires_grad_(False)
    prompt_fn = spec.prompt_fn or random_prompts(full.config.vocab_size, settings.seed)
    gen = fast_decode.FastGenerator(full, decoder, compile=compile)
    results["pairs"][spec.name] = _pair_info(spec, full, decoder, gen, settings, results["copy_bandwidth"])
    _sweep_points(results, spec, gen, prompt_fn, settings, device, progress, out)
    if settings.eager_baselines:
        _eager_baselines(results, spec, gen, full, decoder, prompt_fn, settings, device)
        _save(results, out)
    _speculative_model(results, spec, settings)
    _save(results, out)
    compiled = gen.step.compiled
    gen.clear_caches()
    del gen, full, decoder
    if compiled:
        torch.compiler.reset()  # drop this pair's graphs (and CUDA-graph memory) before the next pair
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _pair_info(spec: PairSpec, full, decoder, gen, settings: LatencySettings, copy_bw: dict) -> dict:
    """What the pair is (sizes, dtype, path, measured acceptance) and what the cost model predicts for it."""
    dtype = next(full.parameters()).dtype
    nbytes = cost.dtype_bytes(dtype)
    info = {
        "dtype": str(dtype).removeprefix("torch."), "weights": spec.weights, "path": gen.path,
        "decoder_weights": quantize.weights_of(decoder),  # a preset's decoder.weights
        "full": cost.model_summary(full.config, nbytes), "decoder": cost.model_summary(decoder.config, nbytes),
        "acceptance": spec.alpha,
        "kv_crossover_context": {str(b): cost.kv_crossover_context(decoder.config, nbytes, b, full.config)
                                 for b in settings.batch_sizes},
    }
    info["roofline"] = {
        role: cost.roofline(cfg, nbytes, copy_bw["bytes_per_s"], contexts=settings.roofline_contexts,
                            batches=settings.batch_sizes, kv_config=full.config)
        for role, cfg in (("full", full.config), ("decoder", decoder.config))
    }
    return info


def _sweep_points(results, spec, gen, prompt_fn, settings, device, progress: bool, out: Path | None) -> None:
    """Every method at every sweep point on the fast path, then the forward costs there; saved after each."""
    from tqdm.auto import tqdm

    copy_bw = results["copy_bandwidth"]
    methods = [m for m in settings.methods if m != "speculative" or spec.weights == "trained" and settings.measured_speculative]
    points = settings.points()
    bar = tqdm(total=len(points) * (len(methods) + 1), desc=f"latency {spec.name}", disable=not progress)
    for point in points:
        b, p, n = point["batch"], point["prompt"], point["new_tokens"]
        for method in methods:
            record = {"pair": spec.name, "sweeps": point["sweeps"], "method": method, "path": gen.path,
                      "batch": b, "prompt": p, "new_tokens": n}
            with oom_guard(record, device, gen.clear_caches):
                record |= measure_fast(gen, method, batch=b, prompt=p, new_tokens=n, prompt_fn=prompt_fn,
                                       warmup=settings.warmup, repeats=settings.repeats,
                                       draft_tokens=settings.draft_tokens, copy_bw=copy_bw)
            results["records"].append(record)
            _save(results, out)
            bar.update()
        # Per-forward costs of a draft step and a verify step at this point, for the speculative model.
        gammas = settings.draft_token_grid if "base" in point["sweeps"] else [settings.draft_tokens]
        _forward_costs(results, spec.name, gen, point, gammas, prompt_fn, settings, device)
        _save(results, out)
        bar.update()
    bar.close()


def _speculative_model(results: dict, spec: PairSpec, settings: LatencySettings) -> None:
    """Modelled speculative decoding from the measured draft and verify costs, over the acceptance grid plus the
    pair's measured acceptance."""
    alphas = list(settings.acceptance_grid)
    if spec.alpha:
        alphas = sorted(set(alphas) | {round(spec.alpha["alpha"], 4)})
    for c in _cost_pairs(results, spec.name):
        for row in cost.model_speculative({c["gamma"]: (c["draft_s"], c["verify_s"])}, alphas):
            results["speculative_model"].append({"pair": spec.name, **c["point"], "source_path": c["path"], **row})


def _forward_costs(results, name, gen, point, gammas, prompt_fn, settings, device) -> None:
    b, p, n = point["batch"], point["prompt"], point["new_tokens"]
    # The cache length of the two-stage runs at this point, so compiled graphs are shared with them.
    cache_len = p + n
    for role, queries in [("decoder", 1)] + [("full", g + 1) for g in gammas]:
        if queries > n:
            continue
        row = {"pair": name, "sweeps": point["sweeps"], "batch": b, "prompt": p, "new_tokens": n, "role": role,
               "queries": queries, "status": "ok", "path": gen.path}
        with oom_guard(row, device, gen.clear_caches):
            row |= measure_forward(gen, role, batch=b, context=p, queries=queries, cache_len=cache_len,
                                   prompt_fn=prompt_fn, warmup=settings.warmup, repeats=settings.repeats)
        results["forward_costs"].append(row)


def _cost_pairs(results: dict, name: str) -> list[dict]:
    """(draft step, verify) cost pairs per point and gamma, from the measured forward costs."""
    rows = [r for r in results["forward_costs"] if r["pair"] == name and r["status"] == "ok"]
    out = []
    for draft in (r for r in rows if r["role"] == "decoder"):
        key = (draft["batch"], draft["prompt"], draft["new_tokens"])
        for verify in (r for r in rows if r["role"] == "full" and (r["batch"], r["prompt"], r["new_tokens"]) == key):
            out.append({
                "point": {"batch": key[0], "prompt": key[1], "new_tokens": key[2], "sweeps": draft["sweeps"]},
                "gamma": verify["queries"] - 1, "draft_s": draft["seconds"]["median"],
                "verify_s": verify["seconds"]["median"], "path": draft["path"],
            })
    return out


def _eager_baselines(results, spec, gen, full, decoder, prompt_fn, settings, device) -> None:
    """The eager paths the fast path replaces, at the base point (batch 1)."""
    p = settings.base_prompt
    n = settings.eager_new_tokens or settings.base_new_tokens
    common = dict(batch=1, prompt=p, new_tokens=n, prompt_fn=prompt_fn, warmup=1, repeats=max(1, min(settings.repeats, 3)))
    jobs = [
        ("full", lambda: measure_hf_generate(full, **common)),
        ("decoder", lambda: measure_hf_generate(decoder, **common)),
        ("overfill", lambda: measure_pair_generate(full, decoder, **common)),
    ]
    if spec.weights == "trained":  # assisted generation with a random draft accepts nothing: not worth timing
        jobs.append(("speculative", lambda: measure_hf_generate(full, assistant=decoder, **common)))
    for method, job in jobs:
        record = {"pair": spec.name, "sweeps": ["eager"], "method": method, "batch": 1, "prompt": p, "new_tokens": n}
        with oom_guard(record, device):
            record |= job()
            record["method"] = method
        results["records"].append(record)
    # The fast path at the same point, if the sweeps did not already time it.
    have = {(r["method"], r["batch"], r["prompt"], r["new_tokens"]) for r in results["records"]
            if r["pair"] == spec.name and r.get("path", "").startswith("fast")}
    for method in ("full", "decoder", "overfill"):
        if (method, 1, p, n) not in have:
            record = {"pair": spec.name, "sweeps": ["eager"], "method": method, "path": gen.path, "batch": 1,
                      "prompt": p, "new_tokens": n}
            with oom_guard(record, device, gen.clear_caches):
                record |= measure_fast(gen, method, batch=1, prompt=p, new_tokens=n, prompt_fn=prompt_fn,
                                       warmup=settings.warmup, repeats=settings.repeats,
                                       copy_bw=results["copy_bandwidth"])
            results["records"].append(record)


def summary_rows(results: dict) -> list[dict]:
    """One flat row per measured record (milliseconds, tokens/s, bandwidth fraction), for a table."""
    rows = []
    for r in results["records"]:
        def ms(key):
            v = r.get(key)
            return None if not v or v.get("median") is None else round(1000 * v["median"], 3)

        rows.append({
            "pair": r.get("pair"), "method": r.get("method"), "path": r.get("path"), "status": r.get("status"),
            "batch": r.get("batch"), "prompt": r.get("prompt"), "new_tokens": r.get("new_tokens"),
            "ttft_ms": ms("ttft_s"), "per_token_ms": ms("per_token_s"), "e2e_ms": ms("e2e_s"),
            "tokens_per_s": r.get("tokens_per_s") and round(r["tokens_per_s"], 1),
            "bandwidth_fraction": r.get("bandwidth_fraction") and round(r["bandwidth_fraction"], 3),
            "sweeps": ",".join(r.get("sweeps", [])),
        })
    return rows


def cpu_decode_rows(results: dict) -> list[dict]:
    """One row per (preset, dtype, method) of a ``benchmarks/cpu_decode.py`` results JSON, for a table."""
    rows = []
    for preset, by_dtype in results["presets"].items():
        for dtype, r in by_dtype["dtypes"].items():
            for method, m in r["methods"].items():
                rows.append({
                    "preset": preset, "dtype": dtype, "method": method, "MB per step": round(m["step_bytes"] / 1e6, 1),
                    **{f"{path} ms": round(m[path]["ms_per_token"], 2) if path in m else None
                       for path in ("plain", "eager", "compiled")},
                    "compiled / plain": round(m["compiled_over_plain"], 2),
                    "compiled GB/s": round(m["compiled"]["bytes_per_s"] / 1e9, 1),
                    "of read bandwidth": round(m["compiled"]["fraction_of_read_bandwidth"], 4),
                    "read GB/s": round(r["read_bandwidth_bytes_per_s"] / 1e9, 1),
                    "tokens == plain": all(m[p]["tokens_equal_plain"] for p in ("eager", "compiled") if p in m),
                })
    return rows


def load_results(path: str | Path) -> dict:
    """A results JSON written by :func:`run_suite`; ValueError if it is not one."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an OverFill latency results file (format {FORMAT!r})")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has latency results version {data.get('version')}, this code reads {FORMAT_VERSION}")
    return data


def find_results(directory: str | Path) -> list[Path]:
    """Committed results JSONs (e.g. ``results/gpu/*.json``) that :func:`load_results` can read."""
    found = []
    for p in sorted(Path(directory).glob("*.json")):
        try:
            load_results(p)
        except (ValueError, OSError) as e:
            log.info("skipping %s: %s", p, e)
            continue
        found.append(p)
    return found


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def real_pair_specs(names: Sequence[str] | None, device: str | torch.device, dtype: torch.dtype) -> list[PairSpec]:
    configs = real_size_pairs()
    names = list(names or configs)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise ValueError(f"unknown real-size pair(s) {unknown}; choose from {', '.join(configs)}")
    specs = []
    for name in names:
        full_cfg, dec_cfg = configs[name]
        specs.append(PairSpec(
            name, lambda f=full_cfg, d=dec_cfg: (build_random_model(f, device, dtype), build_random_model(d, device, dtype))))
    return specs


def _load_dir(path: str | Path, device, dtype):
    model = load_causal_lm(path, "model", dtype=dtype, trust_remote_code=False)
    return model.to(device).eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m overfill_lib.latency",
        description="Profile OverFill decoding (fast static-cache path and eager baselines) and write a results JSON.",
    )
    parser.add_argument("--suite", choices=("real", "tiny"), default="real",
                        help="real: Llama-3.2-3B and Llama-3.1-8B pairs, random weights; tiny: --full/--decoder dirs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", required=True, help="results JSON (rewritten after every point)")
    parser.add_argument("--pairs", nargs="*", default=None, help="real suite: which pairs (default all)")
    parser.add_argument("--full", help="tiny suite: full-model directory")
    parser.add_argument("--decoder", help="tiny suite: decoder directory")
    parser.add_argument("--trained", action="store_true", help="tiny suite: weights are trained (time speculative runs)")
    parser.add_argument("--quick", action="store_true", help="a few points per sweep (minutes, not an hour)")
    parser.add_argument("--compile", choices=("auto", "true", "false"), help="default: the settings' (auto)")
    parser.add_argument("--settings", default=None, help="JSON/YAML mapping of LatencySettings keys to override")
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch threads for CPU timing (default: torch's)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cpu" and args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    settings = QUICK_SETTINGS if args.quick else REAL_SETTINGS
    if args.settings:
        from overfill_lib.artifacts import read_mapping

        settings = LatencySettings.from_dict(read_mapping(Path(args.settings).read_text(), f"--settings {args.settings}"),
                                             settings)
    compile = {"auto": "auto", "true": True, "false": False, None: None}[args.compile]
    if args.suite == "real":
        if device.type != "cuda":
            parser.error("--suite real builds 3B and 8B models: it needs --device cuda (tens of GB on a CPU)")
        specs = real_pair_specs(args.pairs, device, dtype)
        label = f"real-size architectures, random {str(dtype).removeprefix('torch.')} weights"
    else:
        if not (args.full and args.decoder):
            parser.error("--suite tiny needs --full DIR and --decoder DIR")
        specs = [PairSpec("tiny", lambda: (_load_dir(args.full, device, dtype), _load_dir(args.decoder, device, dtype)),
                          weights="trained" if args.trained else "random")]
        label = "local models"
    run_suite(specs, settings, device=device, compile=compile, label=label, out=args.out)
    log.info("results written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
