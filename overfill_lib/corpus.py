"""Real English text that ships with Python, for the real-model presets: the language reference's help
topics (``pydoc_data.topics``, about 465 KB over 79 topics).

Topics are split whole into ``calibration`` and ``heldout`` (every fifth topic by size), so no
held-out passage shares a topic with the calibration windows. From them: token windows (importance
calibration, held-out perplexity), passages, and chat prompts over passages whose answers the full
model writes (the reference answers every pruned decoder is scored on).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from overfill_lib.io import read_json, weights_fingerprint, write_json

log = logging.getLogger(__name__)

SPLITS = ("calibration", "heldout")
HELDOUT_EVERY = 5
HELDOUT_WINDOWS, HELDOUT_SEQ_LEN = 16, 256  # the held-out perplexity every notebook reports: 4096 tokens
SUMMARY_INSTRUCTION = "Summarize the following passage from Python's documentation in one sentence."


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as pydoc_topics

    return dict(sorted(pydoc_topics.items()))


def topic_names(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose one of {', '.join(SPLITS)}")
    all_topics = topics()
    by_size = sorted(all_topics, key=lambda n: (-len(all_topics[n]), n))  # so the held-out fifth is a fifth of the text
    held = set(by_size[HELDOUT_EVERY - 1 :: HELDOUT_EVERY])
    return [n for n in all_topics if (n in held) == (split == "heldout")]


def texts(split: str) -> list[str]:
    all_topics = topics()
    return [all_topics[n] for n in topic_names(split)]


def fingerprint(split: str) -> str:
    """Digest of a split's text: the help topics change between Python versions, and results record which."""
    h = hashlib.sha256()
    for name, text in zip(topic_names(split), texts(split)):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()[:16]


def describe() -> dict:
    import sys

    return {"source": "pydoc_data.topics (Python's language reference help topics)",
            "python": sys.version.split()[0],
            **{split: {"topics": len(topic_names(split)), "characters": sum(map(len, texts(split))),
                       "fingerprint": fingerprint(split)} for split in SPLITS}}


def token_windows(texts: Iterable[str], tokenizer, samples: int, seq_len: int) -> list[list[int]]:
    """Consecutive ``seq_len``-token windows of the concatenated texts (blank texts skipped), ``samples`` of them."""
    need, stream, chunk = samples * seq_len, [], []
    for text in texts:
        if text and text.strip():
            chunk.append(text)
        if len(chunk) == 1000:  # tokenize in batches; stop as soon as there are enough tokens
            stream += itertools.chain.from_iterable(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
            chunk = []
            if len(stream) >= need:
                break
    if chunk and len(stream) < need:
        stream += itertools.chain.from_iterable(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    windows = [stream[i : i + seq_len] for i in range(0, min(len(stream), need) - seq_len + 1, seq_len)]
    if not windows:
        raise ValueError(f"the text holds fewer than seq_len={seq_len} tokens.")
    if len(windows) < samples:
        log.warning("the text gave %d windows of %d tokens, fewer than the %d asked for", len(windows), seq_len, samples)
    return windows


def heldout_windows(tokenizer, n: int = HELDOUT_WINDOWS, seq_len: int = HELDOUT_SEQ_LEN) -> list[list[int]]:
    """The held-out text's first ``n`` windows of ``seq_len`` tokens: what perplexity is measured on."""
    return token_windows(texts("heldout"), tokenizer, n, seq_len)


def passages(split: str, max_chars: int = 1200, min_chars: int = 400) -> list[dict]:
    """Runs of whole paragraphs from each topic of ``split``, between ``min_chars`` and ``max_chars`` long."""
    out = []
    for name, text in zip(topic_names(split), texts(split)):
        current = ""
        for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
            if not para or set(para) <= set("*=-~^ "):  # reST underlines are not prose
                continue
            if current and len(current) + len(para) + 2 > max_chars:
                if len(current) >= min_chars:
                    out.append({"topic": name, "text": current})
                current = ""
            if len(para) <= max_chars:
                current = f"{current}\n\n{para}" if current else para
        if len(current) >= min_chars:
            out.append({"topic": name, "text": current})
    return out


def summary_prompts(split: str = "heldout", n: int = 16, max_chars: int = 1200) -> list[list[dict]]:
    """``n`` chat prompts asking for a one-sentence summary of a passage, one passage per topic first, in order."""
    by_topic: dict[str, list[dict]] = {}
    for p in passages(split, max_chars=max_chars):
        by_topic.setdefault(p["topic"], []).append(p)
    # Round-robin over topics, so a few long topics do not fill the set.
    ordered = [p for group in itertools.zip_longest(*by_topic.values()) for p in group if p is not None]
    if len(ordered) < n:
        raise ValueError(f"the {split} split has {len(ordered)} passages, fewer than the {n} prompts asked for")
    return [[{"role": "user", "content": f"{SUMMARY_INSTRUCTION}\n\n{p['text']}"}] for p in ordered[:n]]


@torch.inference_mode()
def answer(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 64,
           batch_size: int = 8) -> list[dict]:
    """The model's greedy replies as records in the ``messages`` schema, with whether each reply ended (eos)."""
    from tqdm.auto import tqdm

    from overfill_lib.generation import encode_chat

    records = []
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    for i in tqdm(range(0, len(conversations), batch_size), desc="reference answers", unit="batch"):
        chunk = conversations[i : i + batch_size]
        enc = {k: v.to(model.device) for k, v in encode_chat(tokenizer, chunk).items()}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        for conv, row in zip(chunk, out[:, enc["input_ids"].shape[1] :].tolist()):
            ended = next((j for j, t in enumerate(row) if t in eos), None)
            text = tokenizer.decode(row[:ended], skip_special_tokens=True).strip()
            records.append({"messages": [*conv, {"role": "assistant", "content": text}], "ended": ended is not None})
    return records


def reference_answers(model, tokenizer, path: str | Path, *, n: int = 24, max_new_tokens: int = 128,
                      batch_size: int = 8) -> list[dict]:
    """The full model's greedy answers to :func:`summary_prompts`, cached at ``path`` (JSON) for these weights.

    Only answers that ended within ``max_new_tokens`` are returned: a cut answer has no true end to score.
    """
    request = {"model": weights_fingerprint(model), "n": n, "max_new_tokens": max_new_tokens,
               "heldout": fingerprint("heldout"), "instruction": SUMMARY_INSTRUCTION}
    path = Path(path)
    if path.is_file() and (cached := read_json(path)).get("request") == request:
        records = cached["records"]
    else:
        records = answer(model, tokenizer, summary_prompts("heldout", n), max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
        write_json(path, {"request": request, "records": records})
    done = [r for r in records if r["ended"]]
    if len(done) < len(records):
        log.info("%d of %d reference answers did not end within %d tokens and are left out", len(records) - len(done),
                 len(records), max_new_tokens)
    return done
