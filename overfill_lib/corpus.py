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
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from overfill_lib.artifacts import read_json, weights_fingerprint, write_json

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
           batch_size: int = 8, desc: str = "answers") -> list[dict]:
    """The model's greedy replies (on the fast path: one static cache per batch) as records in the ``messages``
    schema, each with whether it ended with an eos token within ``max_new_tokens``."""
    from tqdm.auto import tqdm

    from overfill_lib.fast_decode import FastGenerator
    from overfill_lib.generation import encode_chat

    fast = FastGenerator(full=model, compile=False)
    records = []
    for i in tqdm(range(0, len(conversations), batch_size), desc=desc, unit="batch"):
        chunk = conversations[i : i + batch_size]
        enc = encode_chat(tokenizer, chunk)
        out = fast.generate(enc["input_ids"], enc["attention_mask"], method="full", max_new_tokens=max_new_tokens)
        for conv, row, reason in zip(chunk, out.new_tokens.tolist(), out.finish_reasons):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            records.append({"messages": [*conv, {"role": "assistant", "content": text}], "ended": reason == "eos"})
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


# ----------------------------------------------------------------------------------------------
# Self-distilled chat data: prompts over real text (and the suite's families in plain words), answered by
# the full model. A drop-in decoder should continue as the full model would, so its answers are the targets.

DATA_SPLITS = ("train", "validation", "test")
INSTRUCTIONS = {
    "summarize": SUMMARY_INSTRUCTION,
    "explain": "Explain the following passage from Python's documentation to a beginner in two or three sentences.",
    "question": "Read the following passage from Python's documentation, then answer in one or two sentences: "
                "what does it say about {term}?",
    "list": "List the three most important points of the following passage from Python's documentation, "
            "one short line each.",
}
VALIDATION_EVERY = 10  # every tenth calibration-topic passage is a validation prompt; test prompts are held out


def _term(text: str, rng) -> str:
    """A quoted name from the passage (the help topics quote identifiers "like_this"), else its first words."""
    quoted = sorted(set(re.findall(r'"([A-Za-z_][\w.]{2,30})"', text)))
    return f'"{rng.choice(quoted)}"' if quoted else " ".join(text.split()[:4])


def _family_prompt(family: str, rng) -> str:
    """The suite's families (tasks.FAMILIES) asked in plain words."""
    import string

    if family == "reverse":
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
        return f"Reverse the letters of the word '{word}'. Reply with the reversed word only."
    if family == "sort":
        digits = " ".join(rng.choice(string.digits) for _ in range(rng.randint(4, 8)))
        return f"Sort these digits in ascending order: {digits}. Reply with the sorted digits only."
    if family == "lookup":
        keys = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
        pairs = ", ".join(f"{k} = {rng.randrange(100)}" for k in keys)
        return f"Here are some variables: {pairs}. What is the value of {rng.choice(keys)}? Reply with the number only."
    if family == "add":
        return f"What is {rng.randrange(1000)} + {rng.randrange(1000)}? Reply with the number only."
    if family == "count":
        letters = "".join(rng.choice("abcd") for _ in range(rng.randint(5, 10)))
        return f"How many times does the letter '{rng.choice('abcd')}' appear in '{letters}'? Reply with the number only."
    raise ValueError(f"no plain-words template for family {family!r}")


def distill_prompts(split: str, n_passage: int, n_family: int, seed: int = 0, max_chars: int = 1200) -> list[dict]:
    """Prompts of one split: ``n_passage`` instructions over passages (kinds in turn) and ``n_family`` suite-family
    questions, each ``{"kind", "topic", "messages"}``. Train and validation passages come from the calibration topics
    (every tenth passage to validation), test passages from the held-out topics; family questions are seeded per split."""
    import random

    if split not in DATA_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(DATA_SPLITS)}")
    rng = random.Random(f"{seed}-{split}")
    pool = passages("heldout" if split == "test" else "calibration", max_chars=max_chars)
    if split != "test":
        pool = [p for i, p in enumerate(pool) if (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == (split == "validation")]
    rng.shuffle(pool)
    kinds = list(INSTRUCTIONS)
    out = []
    for i, p in enumerate(pool[:n_passage]):
        kind = kinds[i % len(kinds)]
        instruction = INSTRUCTIONS[kind].format(term=_term(p["text"], rng))
        out.append({"kind": kind, "topic": p["topic"],
                    "messages": [{"role": "user", "content": f"{instruction}\n\n{p['text']}"}]})
    families = ("reverse", "sort", "lookup", "add", "count")
    for i in range(n_family):
        family = families[i % len(families)]
        out.append({"kind": f"family:{family}", "topic": None,
                    "messages": [{"role": "user", "content": _family_prompt(family, rng)}]})
    seen, unique = set(), []
    for r in out:  # deduplicated by prompt text
        key = r["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def build_distilled_data(model, tokenizer, out_dir: str | Path, *, sizes: dict, max_new_tokens: int = 96,
                         batch_size: int = 16, seed: int = 0, source: dict | None = None) -> Path:
    """Answer :func:`distill_prompts` with ``model`` (greedy) into ``out_dir/<split>.jsonl`` in the ``messages``
    schema, plus ``record.json`` (model fingerprint, decoding, seed, text fingerprints, counts).

    ``sizes`` maps each split to ``(passage prompts, family prompts)``. Answers that do not end within
    ``max_new_tokens`` are dropped (and counted). Each split is written atomically and kept when a rerun asks
    the same of it, so an interrupted build resumes at the split it was on.
    """
    import json

    from overfill_lib.artifacts import atomic_write_text, environment_record

    out_dir = Path(out_dir)
    fingerprint = weights_fingerprint(model)
    record_path = out_dir / "record.json"
    record = read_json(record_path) if record_path.is_file() else {}
    splits = dict(record.get("splits", {}))
    for split in DATA_SPLITS:
        n_passage, n_family = sizes[split]
        request = {"model": fingerprint, "n_passage": n_passage, "n_family": n_family, "seed": seed,
                   "max_new_tokens": max_new_tokens, "instructions": INSTRUCTIONS,
                   "text": fingerprint_of_split(split)}
        if splits.get(split, {}).get("request") == request and (out_dir / f"{split}.jsonl").is_file():
            continue
        prompts = distill_prompts(split, n_passage, n_family, seed)
        answered = answer(model, tokenizer, [p["messages"] for p in prompts], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, desc=f"{split} answers")
        rows = [{"kind": p["kind"], "topic": p["topic"], "messages": a["messages"]}
                for p, a in zip(prompts, answered) if a["ended"] and a["messages"][-1]["content"]]
        atomic_write_text(out_dir / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        splits[split] = {"request": request, "prompts": len(prompts), "kept": len(rows),
                         "dropped_unfinished": len(prompts) - len(rows),
                         "kinds": dict(Counter(r["kind"] for r in rows))}
        record = {"model_fingerprint": fingerprint, "model_source": source, "decoding": {
                      "greedy": True, "max_new_tokens": max_new_tokens, "chat_template": "the model's own"},
                  "seed": seed, "corpus": describe(), "splits": splits, "environment": environment_record("cpu", seed)}
        write_json(record_path, record)
        log.info("%s: %d of %d answers kept in %s", split, len(rows), len(prompts), out_dir / f"{split}.jsonl")
    return out_dir


def fingerprint_of_split(split: str) -> str:
    """The corpus text a data split's prompts are drawn from."""
    return fingerprint("heldout" if split == "test" else "calibration")


def check_distill_section(section: dict) -> dict:
    """A preset's ``distill`` section, checked (``config.DistillSection``), as a plain dict."""
    from overfill_lib.config import DistillSection, values

    return values(DistillSection, section, "distill")
