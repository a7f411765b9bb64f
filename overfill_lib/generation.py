"""Generation in the stages gpt-fast names: prefill, decode one token, decode n tokens, speculative decode.

The stage functions are shared by the plain loop here (:func:`generate`: ``DynamicCache``, eager, sampling,
stop strings, prefill refresh) and the fast path (:mod:`overfill_lib.fast_decode`: static cache, compiled
step), so both compute one thing; an identity pair reproduces HF ``generate`` token for token. The plain loop
reads top to bottom as its stages: settle every rule once (:func:`plan_generation`), prefill and first token
(:func:`prefill_first`), decode n tokens (:func:`decode_step` each), finish (:func:`finish`); per-row state lives
in one :class:`LoopState` rather than in closures. This module is also the home of the position rules;
token ids, padding, chat encoding and the eos and pad ids are :mod:`overfill_lib.tokens`' (re-exported here).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

# Re-exported: notebooks, the lm-eval model, the data builders and tests import these from here, where they lived
# before the token rules became their own module.
from overfill_lib.tokens import (  # noqa: F401
    ContentNotText,
    check_new_tokens,
    check_positive_int,
    check_token_ids,
    encode_chat,
    encode_prompts,
    eos_ids,
    message_text,
    pad_sequences,
    pad_token_for,
    prompt_batch,
    through_first_eos,
    vocab_size_of,
)

log = logging.getLogger(__name__)

# Values HF generate falls back on when neither the model nor the caller sets them.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
}


# --------------------------------------------------------------------------------------------------
# Positions and pairs
# --------------------------------------------------------------------------------------------------


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, exactly as HF generate builds them (pads get 0)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def check_pairable(full, decoder, strategy, *, mixed_precision: bool = False) -> None:
    """Refuse a pair that cannot run: its models on two devices, or (when the decoder reads the full model's cache
    as it is) in two dtypes. ``mixed_precision``: the Trainer runs both under autocast, so the decoder's fp32
    master weights may differ from a bf16/fp16 full model while training."""
    p_full, p_dec = next(full.parameters()), next(decoder.parameters())
    if p_full.device != p_dec.device:
        raise ValueError(f"the full model is on {p_full.device} and the decoder on {p_dec.device}; put both on one "
                         "device (pair.to(device))")
    if strategy.shares_cache and p_full.dtype != p_dec.dtype and not mixed_precision:
        raise ValueError(f"the full model is {p_full.dtype} and the decoder {p_dec.dtype}, but the decoder reads the "
                         f"full model's cache as it is ({strategy.name}); cast one to the other's dtype "
                         f"(decoder.to({p_full.dtype}))")


# (position limit, "prompt" or "generation") pairs already warned about: once each per process.
_warned_positions: set[tuple[int, str]] = set()


def check_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, side: str = "left", what: str = "prompt",
                 model=None) -> None:
    """Refuse a batch the decode paths would get silently wrong: empty, a row with no real token, or padding on the
    other ``side`` (prompts are left-padded so every row's last token sits at the end; continuations right-padded).
    With ``model``: warn once when the rows are longer than its position table (:func:`check_positions`)."""
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"no {what}s to run: expected a non-empty [batch, length] batch of token ids, got shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"{what} attention_mask has shape {tuple(attention_mask.shape)}, the ids "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.bool()
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{what} row(s) {empty} have no real token (an empty {what}); drop them or give each at "
                         "least one token")
    # Padding on the wrong side: a real token followed by padding (left) or padding followed by a real token (right).
    wrong = (mask[:, :-1] & ~mask[:, 1:]) if side == "left" else (~mask[:, :-1] & mask[:, 1:])
    rows = wrong.any(-1).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"{what} row(s) {rows} are not {side}-padded: pad {what}s on the {side} "
                         f"(tokenizer.padding_side = {side!r}, or generation.pad_sequences(..., side={side!r}))")
    if model is not None:
        check_positions(model, attention_mask, what=what)


def check_positions(model, attention_mask: torch.Tensor, new_tokens: int = 0, what: str = "prompt") -> None:
    """Warn once per position limit when the longest row, plus ``new_tokens`` generated after it, needs more positions
    than ``model``'s table (``max_position_embeddings``). Rotary models run on past it, so this warns rather than
    refuses, for an over-long prompt and for a generation that runs past the end alike; the last new token is never
    fed back, so ``new_tokens`` need ``new_tokens - 1`` positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        return
    longest = int(attention_mask.sum(-1).max())  # positions follow the mask, not the padded width
    needed = longest + max(new_tokens - 1, 0)
    if needed <= limit:
        return
    kind = "prompt" if longest > limit else "generation"
    if (limit, kind) in _warned_positions:
        return
    _warned_positions.add((limit, kind))
    if kind == "prompt":
        log.warning("%ss of %d tokens exceed the model's %d positions; its outputs there are not to be trusted",
                    what, longest, limit)
    else:
        log.warning("%ss of up to %d tokens plus max_new_tokens=%d need %d positions, more than the model's %d "
                    "(max_position_embeddings); tokens generated past position %d are not to be trusted: lower "
                    "max_new_tokens or shorten the %ss", what, longest, new_tokens, needed, limit, limit - 1, what)


# --------------------------------------------------------------------------------------------------
# Generation config and logits processors
# --------------------------------------------------------------------------------------------------


def resolve_generation_config(
    model, generation_config: GenerationConfig | None = None, **kwargs: Any
) -> GenerationConfig:
    """The model's generation config (or the one given), updated by ``kwargs``, with HF's defaults filled in."""
    own = getattr(model, "generation_config", None)
    if generation_config is None:
        gc = copy.deepcopy(own) if own is not None else GenerationConfig.from_model_config(model.config)
    else:
        gc = copy.deepcopy(generation_config)
        # Special tokens come from the model when the caller's config leaves them unset, as in HF.
        for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
            if getattr(gc, name, None) is None and own is not None:
                setattr(gc, name, getattr(own, name, None))
    unused = gc.update(**{k: v for k, v in kwargs.items() if v is not None})
    if unused:
        raise TypeError(f"unknown generation arguments: {sorted(unused)}")
    for name, value in GENERATION_DEFAULTS.items():
        if getattr(gc, name, None) is None:
            setattr(gc, name, value)
    for name in ("top_p", "typical_p"):  # above 1 the warper is skipped: top_p=1.5 would silently mean 1.0
        value = getattr(gc, name, None)
        if value is not None and not (isinstance(value, numbers.Real) and 0 < value <= 1):
            raise ValueError(f"{name}={value!r} is outside (0, 1]: it is the probability mass sampling keeps "
                             "(1 keeps every token)")
    if gc.eos_token_id is None:
        gc.eos_token_id = getattr(model.config, "eos_token_id", None)
    if gc.num_beams != 1 or gc.num_return_sequences != 1:
        raise NotImplementedError("OverFill generation supports greedy and sampling only (num_beams=1, num_return_sequences=1)")
    return gc


def build_logits_processor(
    gc: GenerationConfig,
    prompt_length: int,
    device: torch.device | str = "cpu",
    extra: LogitsProcessorList | Sequence | None = None,
) -> LogitsProcessorList:
    """The processors HF generate would apply for ``gc``, in HF's order, from public classes.

    Penalties and constraints first, then any caller-given processors, then (sampling only) the
    warpers: temperature, top-k, top-p, min-p, typical-p.
    """
    eos = eos_ids(gc)
    procs = LogitsProcessorList()
    if gc.repetition_penalty not in (None, 1.0):
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=float(gc.repetition_penalty)))
    if gc.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(gc.no_repeat_ngram_size))
    if gc.min_new_tokens and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_length, gc.min_new_tokens, eos, device=device))
    if gc.suppress_tokens:
        procs.append(SuppressTokensLogitsProcessor(gc.suppress_tokens, device=device))
    if extra:
        procs.extend(extra)
    if gc.do_sample:
        if gc.temperature is not None and gc.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(gc.temperature))
        if gc.top_k:
            procs.append(TopKLogitsWarper(top_k=gc.top_k))
        if gc.top_p is not None and gc.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=gc.top_p))
        if gc.min_p is not None:
            procs.append(MinPLogitsWarper(min_p=gc.min_p))
        if gc.typical_p is not None and gc.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(mass=gc.typical_p))
    return procs


# --------------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------------


class StopStrings:
    """Stop when a row's decoded new text contains a stop string; trim it from the returned text.

    Only a tail window of tokens is decoded per step: an occurrence ending earlier would have been
    caught at an earlier step, and a stop string of L characters spans at most about L tokens.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], skip_special_tokens: bool = True):
        if tokenizer is None:
            raise ValueError("stop strings need a tokenizer (pass tokenizer= or give the pair one)")
        self.tokenizer = tokenizer
        self.stops = [s for s in stop_strings if s]
        if not self.stops:
            raise ValueError("stop_strings must contain at least one non-empty string")
        self.window = max(len(s) for s in self.stops) + 8
        self.skip_special_tokens = skip_special_tokens

    def hit(self, new_tokens: list[int]) -> bool:
        text = self.tokenizer.decode(new_tokens[-self.window :], skip_special_tokens=self.skip_special_tokens)
        return any(s in text for s in self.stops)

    def trim(self, text: str) -> str:
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(cuts)] if cuts else text


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationTimings:
    """Wall-clock seconds per stage (synchronised on CUDA at stage boundaries) and token counts."""

    prefill_s: float = 0.0  # full-model prefill + first token + building the decoder's cache (projection)
    decode_s: float = 0.0  # every decoder step after the first token, refreshes included
    refresh_s: float = 0.0  # the part of decode_s spent in prefill refresh
    batch_size: int = 0
    prompt_length: int = 0  # padded prompt width
    prompt_tokens: int = 0  # real prompt tokens, all rows
    new_tokens: int = 0  # tokens generated before each row finished (its eos included), all rows
    steps: int = 0  # generated positions (1 from the full model + decode_steps)
    decode_steps: int = 0  # decoder forwards
    refreshes: int = 0

    @property
    def per_token_decode_s(self) -> float:
        """Seconds per decoder step (each step yields one token per unfinished row)."""
        return self.decode_s / self.decode_steps if self.decode_steps else 0.0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "per_token_decode_s": self.per_token_decode_s, "total_s": self.total_s}


@dataclass
class OverFillOutput:
    """Result of :func:`generate`: ids like HF (prompt + new tokens), the new part, texts and timings."""

    sequences: torch.Tensor  # [batch, prompt_length + steps]
    new_tokens: torch.Tensor  # [batch, steps], pad after a row finished
    texts: list[str] | None  # decoded new text per row (eos dropped, stop string trimmed); None without tokenizer
    finish_reasons: list[str]  # per row: "eos", "stop" or "length"
    timings: GenerationTimings = field(default_factory=GenerationTimings)

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.new_tokens.shape[1]


# --------------------------------------------------------------------------------------------------
# Model calls
# --------------------------------------------------------------------------------------------------


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The keyword that hands ``model`` its KV cache: ``cache`` where its forward has it (transformers renamed
    ``past_key_values``, which now warns), ``past_key_values`` on the versions before the rename (5.17)."""
    inner = getattr(model, "_orig_mod", getattr(model, "module", model))  # compiled or data-parallel wrappers
    return _cache_keyword_of(type(inner))


def with_cache(model, cache) -> dict:
    return {cache_keyword(model): cache}


def returned_cache(output):
    """The cache a forward returned, under either name (see :func:`with_cache`)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def keep_last_logits(model) -> dict[str, int]:
    # Computing the LM head on the last position only, as HF generate does when the model allows it.
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def crop_cache(cache: DynamicCache, tokens: int) -> None:
    """Drop the last ``tokens`` positions of every layer of a ``DynamicCache``.

    A negative argument to ``Cache.crop`` means "remove this many" both in transformers 5.17 (where a
    positive one is an absolute length) and in later 5.x (where a positive one is refused), so this
    is the portable call.
    """
    if tokens > 0:
        cache.crop(-tokens)


# --------------------------------------------------------------------------------------------------
# The stages, shared by the plain loop below and the fast path (overfill_lib.fast_decode)
# --------------------------------------------------------------------------------------------------


@dataclass
class Prefill:
    logits: torch.Tensor  # [batch, 1, vocab]: last position only
    cache: Any  # the cache the prompt was written into
    position_ids: torch.Tensor  # [batch, prompt_length]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids [batch, q] from logits [batch, q, vocab]."""
    return logits.argmax(-1)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None,
            position_ids: torch.Tensor | None = None) -> Prefill:
    """Run ``model`` over a left-padded prompt batch into ``cache`` (default: a new ``DynamicCache``; the fast path
    passes a ``StaticCache``), computing logits at the last position only. ``position_ids`` (default: from the
    mask) are given for a chunk on top of a filled cache, whose ``attention_mask`` then covers cache + chunk."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    position_ids = positions_from_mask(attention_mask) if position_ids is None else position_ids
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **with_cache(model, cache),
        use_cache=True,
        **keep_last_logits(model),
    )
    return Prefill(out.logits[:, -1:], cache, position_ids)


def decode_one_token(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                     cache, choose: Callable[[torch.Tensor], torch.Tensor] = greedy,
                     cache_kw: str | None = None) -> torch.Tensor:
    """One decode forward on ``cache``: the newest token per row, [batch, 1] ([batch, q] to verify q drafts), at
    ``position_ids``, the mask covering cache + new tokens; ``choose`` turns the logits [batch, q, vocab] into ids.
    ``cache_kw``: :func:`cache_keyword`, given by a compiled caller (inspecting the model cannot be traced)."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                **{cache_kw or cache_keyword(model): cache}, use_cache=True)
    return choose(out.logits)


def decode_n_tokens(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tokens: list[torch.Tensor],
                    position: torch.Tensor, n: int,
                    stop: Callable[[int, list[torch.Tensor]], bool] | None = None) -> list[torch.Tensor]:
    """Up to ``n`` decode steps after ``tokens[-1]`` [batch], which sits at ``position`` [batch, 1]: each calls
    ``step(newest ids [batch, 1], their position [batch, 1]) -> next ids [batch]`` (a :func:`decode_one_token`)
    and appends its result to ``tokens``. ``stop(i, tokens)``, asked before step ``i``, ends early."""
    for i in range(n):
        if stop is not None and stop(i, tokens):
            break
        position = position + 1
        tokens.append(step(tokens[-1][:, None], position))
    return tokens


def speculative_decode(draft_step: Callable, verify_step: Callable, token: torch.Tensor, position: torch.Tensor,
                       gamma: int) -> tuple[torch.Tensor, int]:
    """One greedy draft-then-verify round (Leviathan et al. 2023; Chen et al. 2023), batched.

    ``token`` [batch] at ``position`` [batch, 1] is in neither model's cache yet. The draft extends it by ``gamma``
    greedy tokens d_1..d_gamma; the target runs [token, drafts] in one forward, its greedy g_0..g_gamma being the
    truth. ``n`` = the longest prefix where drafts equal g, the minimum over rows so the batch stays aligned (still
    exact: rows emit only the target's tokens). Returns (g_0..g_n [batch, n + 1], n); the caller rolls both caches
    back to hold token, d_1..d_n. Steps: ``(ids [batch, q], positions [batch, q]) -> greedy ids [batch, q]``.
    Only the fast path speculates: the plain loop is OverFill's reference, HF assisted generation the eager one.
    """
    x, drafts = token, []
    for j in range(gamma):
        x = draft_step(x[:, None], position + j)[:, 0]
        drafts.append(x)
    d = torch.stack(drafts, 1)
    g = verify_step(torch.cat([token[:, None], d], 1), position + torch.arange(gamma + 1, device=position.device))
    n = int((d == g[:, :gamma]).long().cumprod(1).sum(1).min())  # the round's one host sync
    if n == gamma:  # the draft has not seen its own last token yet
        draft_step(drafts[-1][:, None], position + gamma)
    return g[:, : n + 1], n


# --------------------------------------------------------------------------------------------------
# The plain loop: plan, prefill and first token, decode n tokens, finish
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationPlan:
    """Every rule of one :func:`generate` call, settled (and any bad setting refused) before a model runs."""

    limit: int  # new positions per row at most, the full model's first token included
    eos: list[int]  # stop ids (empty: never stop)
    eos_t: torch.Tensor  # the same on the device, made once rather than every step
    pad: int  # what a row emits once it has finished
    processors: LogitsProcessorList  # HF's, in HF's order (build_logits_processor)
    do_sample: bool
    generator: torch.Generator | None  # seeded: sampling is reproducible
    stops: StopStrings | None
    streamer: Any  # TextStreamer-like (put / end), or None
    refresh_every: int  # 0: never
    skip_special_tokens: bool


@dataclass
class LoopState:
    """What the plain loop changes as it runs: the rows so far and why each stopped, the caches, the timings."""

    sequences: torch.Tensor  # [batch, prompt + generated so far]; pad after a row finished
    attention_mask: torch.Tensor  # over the prompt and every token fed to a model so far
    prompt_length: int
    unfinished: torch.Tensor  # [batch] bool
    produced: torch.Tensor  # [batch]: tokens generated before each row finished, its eos included
    reasons: list[str]  # per row: "length", unless it ended by "eos" or "stop"
    timings: GenerationTimings
    cache: Any = None  # what the decoder reads and extends
    full_cache: Any = None  # the full model's own, kept only for prefill refresh
    pending: int = 0  # decoder-written positions since the last refresh

    @classmethod
    def start(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LoopState:
        batch, prompt_length = input_ids.shape
        timings = GenerationTimings(batch_size=batch, prompt_length=prompt_length,
                                    prompt_tokens=int(attention_mask.sum()))
        device = input_ids.device
        return cls(input_ids, attention_mask, prompt_length, torch.ones(batch, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device), ["length"] * batch, timings)


def _sync(device: torch.device) -> None:
    # Stage timings on CUDA would otherwise measure kernel launches, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepare_inputs(pair, input_ids, attention_mask, prompts, messages, tokenizer, chat_template_kwargs):
    given = [x is not None for x in (input_ids, prompts, messages)]
    if sum(given) != 1:
        raise ValueError("pass exactly one of input_ids, prompts (strings) or messages (conversations)")
    if prompts is not None or messages is not None:
        if tokenizer is None:
            raise ValueError("text prompts and chat messages need a tokenizer (pass tokenizer= or give the pair one)")
        if messages is not None:
            enc = encode_chat(tokenizer, messages, **(chat_template_kwargs or {}))
        else:
            enc = encode_prompts(tokenizer, [prompts] if isinstance(prompts, str) else prompts)
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]  # checked too: a mismatched tokenizer
    return prompt_batch(input_ids, attention_mask, pad_token_for(pair.full, tokenizer), pair.full)


def plan_generation(full, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    generation_config: GenerationConfig | None, max_new_tokens: int | None, *, stop_strings,
                    streamer, refresh_every: int, generator, seed, logits_processor, skip_special_tokens: bool,
                    **generation_kwargs: Any) -> GenerationPlan:
    """Settle the rules of one call before anything runs, so that a bad setting fails before a forward: how many
    tokens, which ids end a row and which pad it, how a token is chosen, the stop strings, the refresh period."""
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    if max_new_tokens is not None:
        max_new_tokens = check_new_tokens(max_new_tokens)
    # Taken out of the config update so that None means never stop, as in FastGenerator (eos_ids has the rule).
    eos_token_id = generation_kwargs.pop("eos_token_id", "default")
    gc = resolve_generation_config(full, generation_config, max_new_tokens=max_new_tokens, **generation_kwargs)
    limit = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - prompt_length
    if limit < 1:
        raise ValueError(f"nothing to generate: max_new_tokens resolves to {limit}")
    check_positions(full, attention_mask, limit)
    if refresh_every < 0:
        raise ValueError("refresh_every must be >= 0 (0: never refresh)")
    eos = eos_ids(gc, eos_token_id)
    gc.eos_token_id = eos  # what the logits processors (min_new_tokens) stop on
    pad = pad_token_for(full, tokenizer, eos, gc.pad_token_id)
    processors = build_logits_processor(gc, prompt_length, device, logits_processor)
    stops = None
    if stop_strings:
        stops = StopStrings(tokenizer, [stop_strings] if isinstance(stop_strings, str) else stop_strings,
                            skip_special_tokens)
    if streamer is not None and batch != 1:
        raise ValueError("streaming supports batch size 1 only (as in HF generate)")
    if gc.do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    return GenerationPlan(limit, eos, torch.tensor(eos, device=device, dtype=torch.long), pad, processors,
                          gc.do_sample, generator, stops, streamer, refresh_every, skip_special_tokens)


def sample(logits: torch.Tensor, sequences: torch.Tensor, plan: GenerationPlan) -> torch.Tensor:
    """Ids [batch] from the last position of ``logits`` [batch, q, vocab]: HF's processors, which read the
    ``sequences`` so far (repetition penalty, n-grams, min_new_tokens), then the argmax, or a draw when sampling."""
    # A float32 copy, as HF takes it: the processors edit scores in place, and softmax and warpers run in float32.
    scores = plan.processors(sequences, logits[:, -1].to(dtype=torch.float32, copy=True))
    if plan.do_sample:
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=plan.generator).squeeze(1)
    return scores.argmax(dim=-1)


def append_tokens(state: LoopState, next_tokens: torch.Tensor, plan: GenerationPlan) -> torch.Tensor:
    """Append one token per row, ``plan.pad`` for a row that has finished, then finish the rows that reached an eos
    or a stop string. Returns what was appended: the decoder reads it next."""
    next_tokens = torch.where(state.unfinished, next_tokens, torch.full_like(next_tokens, plan.pad))
    state.sequences = torch.cat([state.sequences, next_tokens[:, None]], dim=-1)
    state.produced.add_(state.unfinished.long())
    if plan.streamer is not None:
        plan.streamer.put(next_tokens.cpu())
    if plan.eos:
        ended = state.unfinished & torch.isin(next_tokens, plan.eos_t)
        for row in ended.nonzero().flatten().tolist():
            state.reasons[row] = "eos"
        state.unfinished = state.unfinished & ~ended
    if plan.stops is not None:
        # Decoding text costs a host round trip per row, so only the rows still running are asked.
        for row in state.unfinished.nonzero().flatten().tolist():
            if plan.stops.hit(state.sequences[row, state.prompt_length :].tolist()):
                state.reasons[row] = "stop"
                state.unfinished[row] = False
    return next_tokens


def prefill_first(pair, input_ids: torch.Tensor, state: LoopState,
                  plan: GenerationPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: the full model prefills the prompts and chooses every row's first token; the pairing strategy turns
    its cache into the one the decoder reads. Returns the first tokens [batch] and the position of each prompt's
    last token [batch, 1] (:func:`decode_n_tokens` feeds the first token one position later)."""
    first = prefill(pair.full, input_ids, state.attention_mask)
    token = append_tokens(state, sample(first.logits, state.sequences, plan), plan)
    state.cache = pair.strategy.decoder_cache(first.cache)
    # Without refresh the full model's own cache is only needed when it is the decoder's (shared_kv: one object).
    state.full_cache = first.cache if plan.refresh_every else None
    return token, first.position_ids[:, -1:]


def prefill_refresh(full, strategy, cache, full_cache, sequences, attention_mask, last_pos, n: int) -> None:
    """Prefill refresh: the full model re-processes the last ``n`` tokens the decoder wrote into the cache, as one
    chunked prefill, and its KV replaces the decoder's (tokens already generated never change; logits discarded).

    Those positions hold ``sequences[:, -n-1:-1]`` (the newest token has not been fed yet); the mask covers exactly
    cache + chunk. Under ``shared_kv`` the full model writes straight into the shared cache once it is cropped back;
    otherwise it extends its own cache and the strategy maps the new entries over. Cost: one full-model forward of
    N tokens every N decoded ones, so N=1 costs more than the full model alone; it is a quality reference.
    """
    chunk = sequences[:, -n - 1 : -1]
    positions = last_pos + torch.arange(-n + 1, 1, device=last_pos.device)
    if strategy.shares_cache:
        crop_cache(cache, n)
        target = cache
    else:
        target = full_cache
        expected = cache.get_seq_length() - n
        if full_cache.get_seq_length() != expected:
            raise RuntimeError(f"refresh: the full cache holds {full_cache.get_seq_length()} positions, expected {expected}")
    prefill(full, chunk, attention_mask, target, positions)
    if not strategy.shares_cache:
        crop_cache(cache, n)
        strategy.append_from_full(cache, full_cache, full_cache.get_seq_length() - n)


def decode_step(pair, state: LoopState, plan: GenerationPlan, ids: torch.Tensor,
                position: torch.Tensor) -> torch.Tensor:
    """Stage 2, one token per row (the step :func:`decode_n_tokens` repeats): a prefill refresh when one is due,
    then one decoder forward of the newest ``ids`` [batch, 1] at ``position`` on a mask one column wider."""
    if plan.refresh_every and state.pending == plan.refresh_every:
        r0 = time.perf_counter()
        prefill_refresh(pair.full, pair.strategy, state.cache, state.full_cache, state.sequences,
                        state.attention_mask, position - 1, state.pending)
        _sync(position.device)
        state.timings.refresh_s += time.perf_counter() - r0
        state.timings.refreshes += 1
        state.pending = 0
    state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((len(ids), 1))], dim=-1)
    state.pending += 1
    state.timings.decode_steps += 1
    choose = functools.partial(sample, sequences=state.sequences, plan=plan)
    next_tokens = decode_one_token(pair.decoder, ids, position, state.attention_mask, state.cache, choose)
    return append_tokens(state, next_tokens, plan)


def finish(state: LoopState, plan: GenerationPlan, tokenizer) -> OverFillOutput:
    """Stage 3: the output. A row's text ends before its eos (later positions hold pad), a stop string trimmed."""
    new_tokens = state.sequences[:, state.prompt_length :]
    state.timings.steps = new_tokens.shape[1]
    state.timings.new_tokens = int(state.produced.sum())
    texts = None
    if tokenizer is not None:
        texts = []
        for row in range(new_tokens.shape[0]):
            toks = new_tokens[row, : int(state.produced[row]) - (state.reasons[row] == "eos")].tolist()
            text = tokenizer.decode(toks, skip_special_tokens=plan.skip_special_tokens)
            texts.append(plan.stops.trim(text) if plan.stops is not None else text)
    log.debug("overfill generate: %s", state.timings.to_dict())
    return OverFillOutput(state.sequences, new_tokens, texts, state.reasons, state.timings)


def generate(
    pair,
    input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    prompts: Sequence[str] | str | None = None,
    messages: Sequence[Sequence[dict]] | None = None,
    tokenizer=None,
    generation_config: GenerationConfig | None = None,
    max_new_tokens: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    streamer=None,
    refresh_every: int = 0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    logits_processor: LogitsProcessorList | None = None,
    skip_special_tokens: bool = True,
    chat_template_kwargs: dict | None = None,
    **generation_kwargs: Any,
) -> OverFillOutput:
    """Generate with an OverFill pair: full-model prefill + first token, decoder for the rest.

    ``pair``: an :class:`overfill_lib.pair.OverFillModel` (its ``full``, ``decoder``, ``strategy``, ``tokenizer``).
    Inputs: ``input_ids`` (a left-padded tensor with ``attention_mask``, or ragged lists of ids; see
    :func:`prompt_batch`), ``prompts`` (strings) or ``messages`` (a batch of conversations, via the chat template).
    Decoding settings come from the full model's ``generation_config``, then ``generation_config``,
    then keyword arguments (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ...).
    ``eos_token_id`` follows :func:`eos_ids`, as in ``FastGenerator``: not given or ``"default"``, the model's own;
    ``None`` or ``[]``, never stop. ``seed`` or ``generator`` make sampling reproducible.
    ``streamer``: an HF ``TextStreamer``-compatible object (``put``/``end``), batch size 1.
    ``refresh_every``: prefill refresh period N (0: never); see :func:`prefill_refresh`.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(pair, "tokenizer", None)
    device = next(pair.full.parameters()).device
    check_pairable(pair.full, pair.decoder, pair.strategy)  # again: either may have been moved or cast since
    input_ids, attention_mask = _prepare_inputs(pair, input_ids, attention_mask, prompts, messages, tokenizer,
                                                chat_template_kwargs)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    check_padded(input_ids, attention_mask)  # positions: plan_generation checks them with the new tokens
    plan = plan_generation(pair.full, tokenizer, input_ids, attention_mask, generation_config, max_new_tokens,
                           stop_strings=stop_strings, streamer=streamer, refresh_every=refresh_every,
                           generator=generator, seed=seed, logits_processor=logits_processor,
                           skip_special_tokens=skip_special_tokens, **generation_kwargs)
    state = LoopState.start(input_ids, attention_mask)
    with torch.inference_mode():
        try:
            if streamer is not None:
                streamer.put(input_ids.cpu())
            _sync(device)
            t0 = time.perf_counter()
            token, position = prefill_first(pair, input_ids, state, plan)
            _sync(device)
            t1 = time.perf_counter()
            state.timings.prefill_s = t1 - t0
            decode_n_tokens(functools.partial(decode_step, pair, state, plan), [token], position, plan.limit - 1,
                            stop=lambda i, tokens: not bool(state.unfinished.any()))
            _sync(device)
            state.timings.decode_s = time.perf_counter() - t1
        finally:
            if streamer is not None:
                streamer.end()
    return finish(state, plan, tokenizer)
