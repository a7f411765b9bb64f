"""Generation in the stages gpt-fast names: prefill, decode one token, decode n tokens, speculative decode.

The stage functions are shared by the plain loop here (:func:`generate`: ``DynamicCache``, eager, sampling,
stop strings, prefill refresh) and the fast path (:mod:`overfill_lib.fast_decode`: static cache, compiled
step), so both compute one thing; an identity pair reproduces HF ``generate`` token for token. This module is
also the one home of the eos, pad and position rules.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import numbers
import reprlib
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


def through_first_eos(tokens: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """Boolean mask of each row's generated tokens up to and including its first eos (all True without eos ids)."""
    if not eos:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, torch.tensor(list(eos), device=tokens.device)).long()
    return (is_eos.cumsum(1) - is_eos) == 0


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


def check_positive_int(value, name: str) -> int:
    """``value`` as an ``int`` when it is a positive integer, a Python or a numpy one; bools, floats and strings are
    refused rather than read as 1/0, rounded or parsed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_new_tokens(max_new_tokens) -> int:
    return check_positive_int(max_new_tokens, "max_new_tokens")


def vocab_size_of(model) -> int | None:
    """The number of token ids ``model`` embeds: its input embedding's rows (what an id indexes), else its config's."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if rows is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def check_token_ids(ids, model, what: str = "input_ids") -> None:
    """Refuse token ids that the embedding would fail on cryptically (``IndexError: index out of range in self``) or
    that padding would silently truncate (``2.5`` -> 2): each must be an integer in [0, vocabulary size of ``model``).

    ``ids``: a tensor, or rows of ids (lists, tuples, numpy arrays or 1-d tensors), as the generation and scoring
    paths take them; ``what`` names them in the message.
    """
    if torch.is_tensor(ids):
        if not _integer_dtype(ids.dtype):
            raise ValueError(f"{what} is a {ids.dtype} tensor: token ids are integers; build it with dtype=torch.long "
                             "(as the tokenizer's return_tensors='pt' does)")
        rows = ids if ids.dim() > 1 else ids[None]
    else:
        rows = []
        for r, row in enumerate(ids):
            try:
                t = torch.as_tensor(row if torch.is_tensor(row) else list(row))
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{what} row {r} is {reprlib.repr(row)}, not a list of token ids ({e}); text goes "
                                 "through the tokenizer (prompts= or messages= in generate)") from e
            if t.numel() and not _integer_dtype(t.dtype):
                items = t.flatten().tolist() if torch.is_tensor(row) else list(row)
                bad = next(x for x in items if isinstance(x, bool) or not isinstance(x, numbers.Integral))
                raise ValueError(f"{what} row {r} holds {bad!r} ({type(bad).__name__}): token ids are integers; "
                                 "convert them with int() where they are whole numbers, else fix what made them")
            rows.append(t)
    if torch.is_tensor(rows):
        flat = rows.flatten()
    else:
        flat = torch.cat([t.flatten().long() for t in rows]) if rows else torch.zeros(0, dtype=torch.long)
    if not flat.numel():
        return
    vocab = vocab_size_of(model)
    low, high = int(flat.min()), int(flat.max())  # one host sync each, whatever the batch
    bad = low if low < 0 else high if vocab is not None and high >= vocab else None
    if bad is None:
        return
    r, row = next((r, row) for r, row in enumerate(rows) if bool((row == bad).any()))
    where = f"row {r}, position {int((row.flatten() == bad).nonzero()[0, 0])}"
    if bad < 0:
        raise ValueError(f"{what} hold token id {bad} ({where}): ids are >= 0. To pad, use the tokenizer's "
                         "pad_token_id and mark padding 0 in attention_mask (or pass ragged lists of ids)")
    raise ValueError(f"{what} hold token id {bad} ({where}), outside this model's vocabulary of {vocab} ids "
                     f"(0..{vocab - 1}): encode the text with the model's own tokenizer")


def _integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def prompt_batch(input_ids, attention_mask: torch.Tensor | None, pad_id: int,
                 model) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as a left-padded ``[batch, length]`` id tensor and its mask, as both generation paths take them:
    a tensor (``[length]`` is one prompt; the mask defaults to all ones) or lists of ids (ragged rows, left-padded
    here with ``pad_id``; one flat list of ints is one prompt). The ids are checked by :func:`check_token_ids`."""
    if torch.is_tensor(input_ids):
        check_token_ids(input_ids, model)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
        return input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if attention_mask is not None:
        # A mask beside ragged lists would be silently replaced by the one padding builds.
        raise ValueError("attention_mask is built here from the lengths of ragged lists of ids: pass it only with a "
                         "tensor of ids")
    rows = list(input_ids)
    if not rows:
        raise ValueError("no prompts to run: input_ids is an empty list")
    if isinstance(rows[0], numbers.Number):
        rows = [rows]  # one prompt as a flat list, like a 1-d tensor
    check_token_ids(rows, model)
    return pad_sequences(rows, pad_id, side="left")


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


def eos_ids(source, eos_token_id: int | Sequence[int] | str | None = "default") -> list[int]:
    """The stop ids of a generation, by the one rule that ``pair.generate``, ``FastGenerator.generate`` and through
    them the lm-eval model follow:

    - ``"default"`` (what every path uses when ``eos_token_id`` is not given): ``source``'s own, from a model's
      generation config, then its config; or a (generation) config's own;
    - ``None`` or ``[]``: never stop, always produce ``max_new_tokens`` (as ``eos_token_id=None`` given to Hugging
      Face ``generate``; benchmarks time fixed lengths this way);
    - an id (a Python or numpy integer) or a list, tuple or set of ids: those (an integer tensor counts as its list).

    Anything else is refused: another string (``"60"`` is neither the id 60 nor the ids 6 and 0), a bool, a float or a
    negative number. Returns a list of ints (empty: never stop).
    """
    given, origin = eos_token_id, ""
    if isinstance(eos_token_id, str):
        if eos_token_id != "default":
            hint = f" (the id {int(eos_token_id)}?)" if eos_token_id.strip().isdigit() else ""
            raise ValueError(f"eos_token_id={eos_token_id!r} is a string{hint}: pass an integer id, a list of ids, "
                             "'default' (the model's own) or None / [] (never stop)")
        configs = (getattr(source, "generation_config", None), getattr(source, "config", source))
        eos_token_id = next((c.eos_token_id for c in configs if getattr(c, "eos_token_id", None) is not None), None)
        origin = f" (the default of {type(source).__name__})"
    if eos_token_id is None:
        return []
    if torch.is_tensor(eos_token_id):
        eos_token_id = eos_token_id.tolist()
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple, set, frozenset)) else [eos_token_id]
    bad = [e for e in ids if isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < 0]
    if bad:
        raise ValueError(f"eos_token_id={eos_token_id if origin else given!r}{origin}: {bad[0]!r} is not a token "
                         "id (a non-negative integer); pass an integer id, a list of ids, 'default' (the model's own) "
                         "or None / [] (never stop)")
    return [int(e) for e in ids]


def pad_token_for(model, tokenizer=None, eos: Sequence[int] = (), pad_token_id: int | None = None) -> int:
    """The pad id (ragged prompts, rows that finished), as HF generate picks it: ``pad_token_id``, the generation
    config's, the first of this call's stop ids ``eos``; then the config's, the tokenizer's, the model's eos, 0."""
    gen = getattr(model, "generation_config", None)
    ids = (pad_token_id, getattr(gen, "pad_token_id", None), *eos[:1], getattr(model.config, "pad_token_id", None),
           getattr(tokenizer, "pad_token_id", None), *eos_ids(model)[:1], 0)
    return int(next(i for i in ids if i is not None))


class ContentNotText(ValueError):
    """A chat turn whose content is not text (see :func:`message_text`)."""


def message_text(content: Any, turn: str = "a turn") -> str:
    """A turn's content as the text a text-only chat template renders, by one rule for training data and generation.

    A string is itself. A list of parts (the OpenAI / Hugging Face multimodal shape, ``[{"type": "text", "text":
    "hi"}]``) is its text parts joined, as multimodal templates concatenate them. Anything else would otherwise be
    trained on as its Python repr, or become an empty turn (``0``, ``None``), so :class:`ContentNotText` names
    ``turn`` and the fix: a non-text part (an image), ``None``, a number, a dict.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = (f"a part of type {kind!r}" if isinstance(part, dict)
                        else f"the {type(part).__name__} {reprlib.repr(part)}")
                raise ContentNotText(
                    f"{turn}: content part {i} is {what}, not a text part ({{'type': 'text', 'text': ...}}); a text "
                    "model trains on text only: drop that part, or the conversation",
                )
            texts.append(part["text"])
        return "".join(texts)
    shown = "None (or missing)" if content is None else f"{reprlib.repr(content)} ({type(content).__name__})"
    raise ContentNotText(
        f"{turn}: content is {shown}, not text: give each turn's text as a string (\"0\", not 0) or a list of text "
        "parts",
    )


def encode_chat(tokenizer, conversations: Sequence[Sequence[dict]], **template_kwargs) -> dict[str, torch.Tensor]:
    """Apply the tokenizer's chat template (with the generation prompt) to a batch of conversations.

    Returns left-padded ``input_ids`` and ``attention_mask``. The template text already holds any
    BOS, so it is tokenized without adding special tokens again (as ``apply_chat_template`` does).
    Contents follow the training data's rule (:func:`message_text`): text parts are joined,
    and content that is not text (None, a number, an image part) is refused by conversation and turn.
    """
    texts = [
        tokenizer.apply_chat_template(
            [{**m, "content": message_text(m.get("content"), f"conversation {c}, turn {t} ({m.get('role')!r})")}
             for t, m in enumerate(messages)],
            add_generation_prompt=True, tokenize=False, **template_kwargs)
        for c, messages in enumerate(conversations)
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
# The plain loop
# --------------------------------------------------------------------------------------------------


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
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]  # checked too: a mismatched tokenizer
    return prompt_batch(input_ids, attention_mask, pad_token_for(pair.full, tokenizer), pair.full)


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
    ``refresh_every``: prefill refresh period N (0: never); see :func:`_refresh`.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(pair, "tokenizer", None)
    full, decoder, strategy = pair.full, pair.decoder, pair.strategy
    device = next(full.parameters()).device
    check_pairable(full, decoder, strategy)  # again: either may have been moved or cast since the pair was built
    input_ids, attention_mask = _prepare_inputs(
        pair, input_ids, attention_mask, prompts, messages, tokenizer, chat_template_kwargs
    )
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    check_padded(input_ids, attention_mask)  # positions: check_positions below, with the new tokens
    batch, prompt_length = input_ids.shape
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
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    pad = pad_token_for(full, tokenizer, eos, gc.pad_token_id)  # what finished rows emit
    processors = build_logits_processor(gc, prompt_length, device, logits_processor)
    stops = None
    if stop_strings:
        stops = StopStrings(tokenizer, [stop_strings] if isinstance(stop_strings, str) else stop_strings, skip_special_tokens)
    if streamer is not None and batch != 1:
        raise ValueError("streaming supports batch size 1 only (as in HF generate)")
    if gc.do_sample and generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
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

    def step(ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """A refresh when one is due, then one decoder step on a mask one column wider."""
        nonlocal attention_mask, pending
        if refresh_every and pending == refresh_every:
            r0 = time.perf_counter()
            _refresh(full, strategy, cache, full_cache, sequences, attention_mask, position - 1, pending)
            _sync(device)
            timings.refresh_s += time.perf_counter() - r0
            timings.refreshes += 1
            pending = 0
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=-1)
        pending += 1  # decoder-written positions since the last refresh
        timings.decode_steps += 1
        return advance(decode_one_token(decoder, ids, position, attention_mask, cache, choose))

    with torch.inference_mode():
        try:
            if streamer is not None:
                streamer.put(input_ids.cpu())
            _sync(device)
            t0 = time.perf_counter()
            first = prefill(full, input_ids, attention_mask)
            tokens = [advance(choose(first.logits))]
            cache = strategy.decoder_cache(first.cache)
            # Without refresh the full model's own cache is only needed when it is the decoder's.
            full_cache = first.cache if refresh_every else None
            position = first.position_ids[:, -1:]
            del first
            _sync(device)
            t1 = time.perf_counter()
            timings.prefill_s = t1 - t0
            pending = 0
            decode_n_tokens(step, tokens, position, limit - 1, stop=lambda i, tokens: not bool(unfinished.any()))
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


def _refresh(full, strategy, cache, full_cache, sequences, attention_mask, last_pos, n: int) -> None:
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
