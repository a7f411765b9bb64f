"""Token ids in and out, by one set of rules for every path that generates or scores.

Ids are checked before a model embeds them (a bad id fails there as a cryptic ``IndexError``, and padding would
silently truncate a float); ragged rows are padded on the side each path expects; text and chat conversations are
encoded the one way training data is; and the eos and pad ids of a generation are resolved here, so that the plain
loop (:mod:`overfill_lib.generation`), the fast path (:mod:`overfill_lib.fast_decode`) and the lm-eval model stop
and pad alike. The callers import these names from :mod:`overfill_lib.generation`, where they lived first.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Sequence
from typing import Any

import torch

# --------------------------------------------------------------------------------------------------
# Token ids
# --------------------------------------------------------------------------------------------------


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


def check_positive_int(value, name: str) -> int:
    """``value`` as an ``int`` when it is a positive integer, a Python or a numpy one; bools, floats and strings are
    refused rather than read as 1/0, rounded or parsed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_new_tokens(max_new_tokens) -> int:
    return check_positive_int(max_new_tokens, "max_new_tokens")


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Stop and pad ids
# --------------------------------------------------------------------------------------------------


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


def through_first_eos(tokens: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """Boolean mask of each row's generated tokens up to and including its first eos (all True without eos ids)."""
    if not eos:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_eos = torch.isin(tokens, torch.tensor(list(eos), device=tokens.device)).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def pad_token_for(model, tokenizer=None, eos: Sequence[int] = (), pad_token_id: int | None = None) -> int:
    """The pad id (ragged prompts, rows that finished), as HF generate picks it: ``pad_token_id``, the generation
    config's, the first of this call's stop ids ``eos``; then the config's, the tokenizer's, the model's eos, 0."""
    gen = getattr(model, "generation_config", None)
    ids = (pad_token_id, getattr(gen, "pad_token_id", None), *eos[:1], getattr(model.config, "pad_token_id", None),
           getattr(tokenizer, "pad_token_id", None), *eos_ids(model)[:1], 0)
    return int(next(i for i in ids if i is not None))


# --------------------------------------------------------------------------------------------------
# Text and chat
# --------------------------------------------------------------------------------------------------


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


def encode_examples(tokenizer, conversations: list[list[dict]]) -> list[dict]:
    """Training's encoding of chat examples: prompt = every turn before the final assistant reply (through the chat
    template, with the generation prompt); labels only on reply + end-of-turn. Tokenized in one batched call."""
    prompts = tokenizer.apply_chat_template([c[:-1] for c in conversations], add_generation_prompt=True, tokenize=False)
    replies = [c[-1]["content"] for c in conversations]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(replies, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [
        {"input_ids": p + r + [eos], "labels": [-100] * len(p) + r + [eos]} for p, r in zip(prompt_ids, reply_ids)
    ]
