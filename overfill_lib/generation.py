"""OverFill generation: the full model prefills and picks the first token, the decoder continues.

The loop mirrors Hugging Face ``generate`` (greedy / multinomial sampling) closely enough that an
identity pair (decoder = the full model) reproduces ``full.generate`` token for token:

1. The full model runs the (left-padded) prompt with ``position_ids`` from the attention mask's
   cumulative sum, filling a ``DynamicCache``; its last logits give the first new token.
2. The pairing strategy turns that cache into the decoder's (``shared_kv``: the same object).
3. The decoder takes one token per step at the next position, the attention mask growing by one
   column of ones per step (finished rows keep emitting ``pad``, as in HF).

Sampling goes through ``transformers`` logits processors built from a ``GenerationConfig``
(repetition penalty, temperature, top-k, top-p, ...). Stopping: eos ids, stop strings (checked on
the decoded text; trimmed from the returned text, not from the token ids), ``max_new_tokens``.

**Prefill refresh** (future work named by the authors, built here): with ``refresh_every=N`` the
full model re-processes, every N decoder steps, the last N tokens the decoder wrote into the cache
(one chunked forward over them with the cache cropped back by N) and its KV replaces the decoder's.
Tokens already generated never change (no verify or rollback); the refresh's logits are discarded.
Cost: one full-model forward of N tokens every N decoded tokens, i.e. roughly one extra read of
the full model's weights per refresh (memory-bound for small N), plus its attention over the
context. N=1 therefore costs more than running the full model alone; it is a quality reference.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

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

if TYPE_CHECKING:
    from overfill_lib.pair import OverFillModel

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
# Inputs
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


_warned_positions: set[int] = set()


def check_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, side: str = "left", what: str = "prompt",
                 model=None) -> None:
    """Refuse a batch the decode paths would get silently wrong: empty, a row with no real token, or padding on the
    other ``side`` (prompts are left-padded so every row's last token sits at the end; continuations right-padded).
    With ``model``: warn once when the rows are longer than its position table."""
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
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and input_ids.shape[1] > limit and limit not in _warned_positions:
        _warned_positions.add(limit)
        log.warning("%ss of %d tokens exceed the model's %d positions; its outputs there are not to be trusted",
                    what, input_ids.shape[1], limit)


def check_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    return max_new_tokens


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ragged token lists into (ids, attention_mask) tensors on the given side."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pad_token_for(model, tokenizer=None) -> int:
    """The pad id: generation config, then config, then tokenizer, then eos, then 0."""
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        pad = getattr(source, "pad_token_id", None) if source is not None else None
        if pad is not None:
            return int(pad)
    eos = _eos_list(getattr(model, "generation_config", None)) or _eos_list(model.config)
    return eos[0] if eos else 0


def _eos_list(config) -> list[int]:
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def encode_chat(tokenizer, conversations: Sequence[Sequence[dict]], **template_kwargs) -> dict[str, torch.Tensor]:
    """Apply the tokenizer's chat template (with the generation prompt) to a batch of conversations.

    Returns left-padded ``input_ids`` and ``attention_mask``. The template text already holds any
    BOS, so it is tokenized without adding special tokens again (as ``apply_chat_template`` does).
    """
    texts = [
        tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False, **template_kwargs)
        for messages in conversations
    ]
    return encode_prompts(tokenizer, texts, add_special_tokens=False)


def encode_prompts(tokenizer, prompts: Sequence[str], add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """Tokenize plain-text prompts into a left-padded batch."""
    ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids, attention_mask = pad_sequences(ids, pad, side="left")
    return {"input_ids": input_ids, "attention_mask": attention_mask}


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
    eos = _eos_list(gc)
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
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Prefill:
    logits: torch.Tensor  # [batch, 1, vocab]: last position only
    cache: DynamicCache
    position_ids: torch.Tensor  # [batch, prompt_length]


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


def full_prefill(full, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Prefill:
    """Run the full model over a left-padded prompt batch, returning its last logits and its cache."""
    cache = DynamicCache(config=full.config)
    position_ids = positions_from_mask(attention_mask)
    out = full(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **with_cache(full, cache),
        use_cache=True,
        **keep_last_logits(full),
    )
    return Prefill(out.logits[:, -1:], cache, position_ids)


def _sync(device: torch.device) -> None:
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
        return enc["input_ids"], enc["attention_mask"]
    if not torch.is_tensor(input_ids):
        if len(input_ids) == 0:
            raise ValueError("no prompts to run: input_ids is an empty list")
        return pad_sequences(input_ids, pad_token_for(pair.full, tokenizer), side="left")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask


def generate(
    pair: OverFillModel,
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

    Inputs: ``input_ids`` (a left-padded tensor with ``attention_mask``, or ragged lists of ids),
    ``prompts`` (strings) or ``messages`` (a batch of conversations, via the chat template).
    Decoding settings come from the full model's ``generation_config``, then ``generation_config``,
    then keyword arguments (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
    ``repetition_penalty``, ...). ``seed`` or ``generator`` make sampling reproducible.
    ``streamer``: an HF ``TextStreamer``-compatible object (``put``/``end``), batch size 1.
    ``refresh_every``: prefill refresh period N (0: never); see the module docstring.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(pair, "tokenizer", None)
    full, decoder, strategy = pair.full, pair.decoder, pair.strategy
    device = next(full.parameters()).device
    check_pairable(full, decoder, strategy)  # again: either may have been moved or cast since the pair was built
    input_ids, attention_mask = _prepare_inputs(
        pair, input_ids, attention_mask, prompts, messages, tokenizer, chat_template_kwargs
    )
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    check_padded(input_ids, attention_mask, model=full)
    batch, prompt_length = input_ids.shape
    if max_new_tokens is not None:
        check_new_tokens(max_new_tokens)

    gc = resolve_generation_config(full, generation_config, max_new_tokens=max_new_tokens, **generation_kwargs)
    limit = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - prompt_length
    if limit < 1:
        raise ValueError(f"nothing to generate: max_new_tokens resolves to {limit}")
    if refresh_every < 0:
        raise ValueError("refresh_every must be >= 0 (0: never refresh)")
    eos = _eos_list(gc)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    # Finished rows emit pad; like HF, fall back on the first eos id when no pad id is configured.
    pad = int(gc.pad_token_id) if gc.pad_token_id is not None else (eos[0] if eos else pad_token_for(full, tokenizer))
    processors = build_logits_processor(gc, prompt_length, device, logits_processor)
    stops = None
    if stop_strings:
        stops = StopStrings(tokenizer, [stop_strings] if isinstance(stop_strings, str) else stop_strings, skip_special_tokens)
    if streamer is not None and batch != 1:
        raise ValueError("streaming supports batch size 1 only (as in HF generate)")
    if gc.do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    def choose(logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        scores = processors(sequences, logits[:, -1].to(dtype=torch.float32, copy=True))
        if gc.do_sample:
            probs = torch.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
        return scores.argmax(dim=-1)

    timings = GenerationTimings(batch_size=batch, prompt_length=prompt_length, prompt_tokens=int(attention_mask.sum()))
    reasons = ["length"] * batch
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    sequences = input_ids
    produced = torch.zeros(batch, dtype=torch.long, device=device)

    def advance(next_tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (pad for finished rows) and update which rows are finished."""
        nonlocal sequences, unfinished
        next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
        produced.add_(unfinished.long())
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos:
            ended = unfinished & torch.isin(next_tokens, eos_t)
            for row in ended.nonzero().flatten().tolist():
                reasons[row] = "eos"
            unfinished = unfinished & ~ended
        if stops is not None:
            for row in unfinished.nonzero().flatten().tolist():
                if stops.hit(sequences[row, prompt_length:].tolist()):
                    reasons[row] = "stop"
                    unfinished[row] = False
        return next_tokens

    with torch.inference_mode():
        try:
            if streamer is not None:
                streamer.put(input_ids.cpu())
            _sync(device)
            t0 = time.perf_counter()
            prefill = full_prefill(full, input_ids, attention_mask)
            next_tokens = advance(choose(prefill.logits, sequences))
            cache = strategy.decoder_cache(prefill.cache)
            # Without refresh the full model's own cache is only needed when it is the decoder's.
            full_cache = prefill.cache if refresh_every else None
            last_pos = prefill.position_ids[:, -1:]
            del prefill
            _sync(device)
            t1 = time.perf_counter()
            timings.prefill_s = t1 - t0
            pending = 0  # decoder-written positions since the last refresh
            keep = keep_last_logits(decoder)
            while sequences.shape[1] - prompt_length < limit and bool(unfinished.any()):
                if refresh_every and pending == refresh_every:
                    r0 = time.perf_counter()
                    _refresh(full, strategy, cache, full_cache, sequences, attention_mask, last_pos, pending)
                    _sync(device)
                    timings.refresh_s += time.perf_counter() - r0
                    timings.refreshes += 1
                    pending = 0
                last_pos = last_pos + 1
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
                out = decoder(
                    input_ids=next_tokens[:, None],
                    attention_mask=attention_mask,
                    position_ids=last_pos,
                    **with_cache(decoder, cache),
                    use_cache=True,
                    **keep,
                )
                pending += 1
                timings.decode_steps += 1
                next_tokens = advance(choose(out.logits, sequences))
                del out
            _sync(device)
            timings.decode_s = time.perf_counter() - t1
        finally:
            if streamer is not None:
                streamer.end()

    new_tokens = sequences[:, prompt_length:]
    timings.steps = new_tokens.shape[1]
    timings.new_tokens = int(produced.sum())
    texts = None
    if tokenizer is not None:
        texts = []
        for row in range(batch):
            # A row's text ends before its eos; later positions hold pad.
            toks = new_tokens[row, : int(produced[row]) - (reasons[row] == "eos")].tolist()
            text = tokenizer.decode(toks, skip_special_tokens=skip_special_tokens)
            texts.append(stops.trim(text) if stops is not None else text)
    log.debug("overfill generate: %s", timings.to_dict())
    return OverFillOutput(sequences, new_tokens, texts, reasons, timings)


def crop_cache(cache: DynamicCache, tokens: int) -> None:
    """Drop the last ``tokens`` positions of every layer of a ``DynamicCache``.

    A negative argument to ``Cache.crop`` means "remove this many" both in transformers 5.17 (where a
    positive one is an absolute length) and in later 5.x (where a positive one is refused), so this
    is the portable call.
    """
    if tokens > 0:
        cache.crop(-tokens)


def _refresh(full, strategy, cache, full_cache, sequences, attention_mask, last_pos, n: int) -> None:
    """Replace the KV of the last ``n`` decoder-written positions with the full model's.

    Those positions hold the tokens fed to the decoder since the last refresh, ``sequences[:, -n-1:-1]``
    (the newest token has not been fed yet). The full model processes them as one chunk on top of a
    cache holding everything before them (the mask covers exactly cache + chunk); its logits are
    discarded. Under ``shared_kv`` the full model writes straight into the shared cache once it is
    cropped back; otherwise it extends its own cache and the strategy maps the new entries over.
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
    full(
        input_ids=chunk,
        attention_mask=attention_mask,
        position_ids=positions,
        **with_cache(full, target),
        use_cache=True,
        **keep_last_logits(full),
    )
    if not strategy.shares_cache:
        crop_cache(cache, n)
        strategy.append_from_full(cache, full_cache, full_cache.get_seq_length() - n)
