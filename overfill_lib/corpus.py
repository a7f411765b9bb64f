"""Real English text that ships with Python, for the real-model presets: the language reference's help
topics (``pydoc_data.topics``, about 465 KB over 79 topics).

Topics are split whole into ``calibration`` and ``heldout`` (every fifth topic by size), so no
held-out passage shares a topic with the calibration windows. From them: token windows (importance
calibration, held-out perplexity), passages, and chat prompts over passages whose answers the full
model writes (the reference answers every pruned decoder is scored on).

The self-distilled chat data (:func:`build_distilled_data`) draws its passages from these topics and from the
standard library's docstrings (``stdlib_corpus``), test prompts only from held-out topics and test modules.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
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


def _runs(paragraphs: Iterable[str], max_chars: int, min_chars: int) -> list[str]:
    """Runs of whole consecutive paragraphs between ``min_chars`` and ``max_chars`` long (a longer paragraph is
    skipped, and ends the run before it)."""
    runs, current = [], ""
    for para in paragraphs:
        if current and len(current) + len(para) + 2 > max_chars:
            if len(current) >= min_chars:
                runs.append(current)
            current = ""
        if len(para) <= max_chars:
            current = f"{current}\n\n{para}" if current else para
    if len(current) >= min_chars:
        runs.append(current)
    return runs


def passages(split: str, max_chars: int = 1200, min_chars: int = 400) -> list[dict]:
    """Runs of whole paragraphs from each topic of ``split``, between ``min_chars`` and ``max_chars`` long."""
    out = []
    for name, text in zip(topic_names(split), texts(split)):
        paragraphs = (p.strip() for p in re.split(r"\n\s*\n", text))
        # reST underlines are not prose
        prose = (p for p in paragraphs if p and not set(p) <= set("*=-~^ "))
        out += [{"topic": name, "text": run} for run in _runs(prose, max_chars, min_chars)]
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


def answer_batches(tokenizer, conversations: list[list[dict]], batch_size: int) -> list[list[int]]:
    """Indices of ``conversations`` in batches of ``batch_size``, by prompt length (ties by index): prompts of
    similar length share a batch, so little of it is padding. The same conversations always give the same batches."""
    lengths = [len(tokenizer(tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"]) for c in conversations]
    order = sorted(range(len(conversations)), key=lambda i: (lengths[i], i))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def _pad_left(enc: dict, multiple: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch padded further on the left to a width that is a multiple of ``multiple``."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    extra = -ids.shape[1] % multiple
    if extra:
        ids = torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], 1)
        mask = torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], 1)
    return ids, mask


@torch.inference_mode()
def answer(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 64,
           batch_size: int = 8, desc: str = "answers", compile: bool | str = False, pad_to: int = 1,
           done: dict[int, dict] | None = None, on_batch=None) -> list[dict]:
    """The model's greedy replies (on the fast path: one static cache per batch) as records in the ``messages``
    schema, each with whether it ended with an eos token within ``max_new_tokens`` and how many tokens it took
    (``new_tokens``, the eos included) and its share of its batch's seconds, in the order of ``conversations``.

    Batches hold prompts of similar length (:func:`answer_batches`); ``pad_to`` pads each batch's prompt width to a
    multiple, so a compiled decode step (``compile``, see :class:`~overfill_lib.fast_decode.FastGenerator`) is built
    once per width rather than once per batch. ``done`` maps indices already answered to their records (a resumed
    run, or answers reused from an earlier build): only the other prompts are batched, the same way, so a run
    resumed after whole batches asks exactly the batches an uninterrupted run would have asked next.
    ``on_batch(indices, records, info)`` is called after each batch with ``info = {"seconds", "path", "width"}``.
    """
    import time

    from tqdm.auto import tqdm

    from overfill_lib.fast_decode import FastGenerator
    from overfill_lib.generation import encode_chat, eos_ids

    records = dict(done or {})
    left = [i for i in range(len(conversations)) if i not in records]
    todo = [[left[k] for k in b] for b in answer_batches(tokenizer, [conversations[i] for i in left], batch_size)]
    if not todo:
        return [records[i] for i in range(len(conversations))]
    fast = FastGenerator(full=model, compile=compile)
    eos = set(eos_ids(model, "default"))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    bar = tqdm(total=len(conversations), initial=len(conversations) - sum(map(len, todo)), desc=desc, unit="answer")
    tokens, seconds = 0, 0.0
    for batch in todo:
        chunk = [conversations[i] for i in batch]
        ids, mask = _pad_left(encode_chat(tokenizer, chunk), pad_to, pad_id)
        start = time.perf_counter()
        out = fast.generate(ids, mask, method="full", max_new_tokens=max_new_tokens)
        took = time.perf_counter() - start
        new = []
        for i, conv, row, reason in zip(batch, chunk, out.new_tokens.tolist(), out.finish_reasons):
            n = next((k + 1 for k, t in enumerate(row) if t in eos), len(row)) if reason == "eos" else len(row)
            text = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            records[i] = {"messages": [*conv, {"role": "assistant", "content": text}], "ended": reason == "eos",
                          "new_tokens": n, "seconds": took / len(batch)}
            new.append(records[i])
        if on_batch is not None:
            on_batch(batch, new, {"seconds": took, "path": out.path, "width": ids.shape[1]})
        tokens += sum(r["new_tokens"] for r in new)
        seconds += took
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{tokens / seconds:.1f}", ended=f"{sum(r['ended'] for r in new)}/{len(new)}")
    bar.close()
    return [records[i] for i in range(len(conversations))]


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
#
# Passages come from two sources: the help topics above and the standard library's docstrings
# (stdlib_corpus.py). Train and validation draw from the calibration topics (every tenth passage to
# validation) and the stdlib's train / validation modules; test only from the held-out topics and the stdlib's
# test modules, so no test passage shares a topic or module with anything trained or validated on.

DATA_SPLITS = ("train", "validation", "test")
SOURCES = ("help", "stdlib")
# Short answers by construction. SmolLM2-135M-Instruct reads an instruction put before a long passage loosely: asked
# to explain or list (no length given) it talks past any budget (19% of 48 train prompts ended within 96 tokens), and
# asked for one sentence it often goes on anyway or loops. So the instruction comes after the passage and asks for
# a short form (one sentence, one question). Lists loop: on 64 train prompts (16 per kind, greedy, 96 new tokens)
# "List three keywords" ended 4 of 16 where "Write one short question" ended 16 of 16; all four kinds below ended
# 57 of 64 (89%), the set with the keywords 42 of 64.
# Each is a template over the passage (``{passage}``) and, for ``question``, a name from it (``{term}``).
_LEAD = "Here is a passage from Python's documentation:\n\n{passage}\n\n"
INSTRUCTIONS = {
    "summarize": _LEAD + "Summarize the passage above in one short sentence.",
    "explain": _LEAD + "In one sentence, explain to a beginner what the passage above is about.",
    "question": _LEAD + "What does the passage above say about {term}? Answer in one short sentence.",
    "ask": _LEAD + "Write one short question that the passage above answers.",
}
VALIDATION_EVERY = 10  # every tenth calibration-topic passage is a validation prompt; test prompts are held out
STDLIB_HEADINGS = frozenset({"NAME", "DESCRIPTION", "CLASSES", "FUNCTIONS", "DATA"})
_SIGNATURE = re.compile(r"^(class\s+)?[\w.]+\s*\(.*\)\s*(->.*)?:?$")
MIN_PROSE_SHARE = 0.6  # a stdlib run with less of its text in prose lines (signatures, doctests, tables) is skipped
PAD_TO = 32  # prompt widths are padded to a multiple of this: one compiled decode graph per width, not per batch


def stdlib_paragraphs(text: str, module: str = "") -> list[str]:
    """A module's pydoc rendering (stdlib_corpus.render_module) as plain paragraphs: indentation and the class
    bodies' "|" rails removed, so a blank rail separates paragraphs; headings and the module's name dropped."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(\|\s*)?", "", line).rstrip()
        lines.append("" if line.startswith("Help on module ") or line in STDLIB_HEADINGS else line)
    return [p for p in (p.strip() for p in "\n".join(lines).split("\n\n")) if p and p != module]


def _is_prose(line: str) -> bool:
    line = line.strip()
    if line.startswith((">>>", "...", "$ ", "%")) or _SIGNATURE.match(line):
        return False
    return len(line.split()) >= 3 and sum(c.isalpha() or c.isspace() for c in line) >= 0.75 * len(line)


def prose_share(text: str) -> float:
    """The share of a text's characters in prose lines: not signatures, doctests or symbol-heavy (code, tables)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    total = sum(map(len, lines))
    return sum(len(line) for line in lines if _is_prose(line)) / total if total else 0.0


def stdlib_passages(split: str, max_chars: int = 1200, min_chars: int = 400) -> list[dict]:
    """Runs of whole paragraphs of the stdlib docstrings of ``split`` (stdlib_corpus: train, validation, test),
    between ``min_chars`` and ``max_chars`` long, as :func:`passages` cuts the help topics; runs that are mostly
    signatures or code (:func:`prose_share` below ``MIN_PROSE_SHARE``) are skipped. ``topic`` is the module."""
    from overfill_lib import stdlib_corpus

    out = []
    for doc in stdlib_corpus.documents(split):
        for run in _runs(stdlib_paragraphs(doc["text"], doc["module"]), max_chars, min_chars):
            if prose_share(run) >= MIN_PROSE_SHARE:
                out.append({"topic": doc["module"], "text": run})
    return out


def _source_passages(split: str, max_chars: int) -> list[dict]:
    help_pool = passages("heldout" if split == "test" else "calibration", max_chars=max_chars)
    if split != "test":
        help_pool = [p for i, p in enumerate(help_pool)
                     if (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == (split == "validation")]
    return ([{"source": "help", **p} for p in help_pool]
            + [{"source": "stdlib", **p} for p in stdlib_passages(split, max_chars=max_chars)])


def _long_paragraphs(text: str, min_chars: int = 80) -> set[str]:
    return {key for key in (" ".join(p.split()) for p in text.split("\n\n")) if len(key) >= min_chars}


def distill_passages(split: str, max_chars: int = 1200) -> list[dict]:
    """The passages a data split's prompts are drawn from, each ``{"source", "topic", "text"}``: help topics
    (calibration topics for train and validation, every tenth passage to validation; held-out topics for test) and
    the stdlib docstrings of the same split.

    Some text occurs twice: the help topics repeat sections (``compound`` holds ``class``), docstrings are copied
    between modules. So a train or validation passage with a paragraph (80 characters or more) of a test passage is
    left out, as is a train passage with one of a validation passage: no held-out text is trained on. A text that
    occurs twice in a split is kept once.
    """
    if split not in DATA_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(DATA_SPLITS)}")
    pool = _source_passages(split, max_chars)
    later = DATA_SPLITS[DATA_SPLITS.index(split) + 1 :]  # train gives way to validation and test, validation to test
    held = set().union(*(_long_paragraphs(p["text"]) for s in later for p in distill_passages(s, max_chars)))
    texts = set()
    return [p for p in pool if not _long_paragraphs(p["text"]) & held
            and not (p["text"] in texts or texts.add(p["text"]))]  # each text once


def _term(text: str, rng) -> str:
    """A quoted name from the passage (the help topics quote identifiers "like_this", docstrings 'so' or `so`, or
    name calls like_this()), else its first words."""
    quoted = set(re.findall(r'"([A-Za-z_][\w.]{2,30})"', text)) | set(re.findall(r"[`']([A-Za-z_][\w.]{2,30})[`']", text))
    called = set(re.findall(r"\b([A-Za-z_][\w.]{2,30})\(\)", text))
    if quoted:
        return f'"{rng.choice(sorted(quoted))}"'
    return f"{rng.choice(sorted(called))}()" if called else " ".join(text.split()[:4])


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
    """Prompts of one split: ``n_passage`` instructions over passages and ``n_family`` suite-family questions, each
    ``{"kind", "source", "topic", "messages"}``.

    Passages (:func:`distill_passages`: help topics and stdlib docstrings, test only from held-out topics and
    modules) are shuffled together, so the sources mix in proportion to their passages; instruction kinds go in
    turn. Asked for more prompts than there are passages, the pool is gone through again with each passage under
    the next kind (never the same instruction over the same passage twice). Family questions are seeded per split.
    """
    import random

    if split not in DATA_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(DATA_SPLITS)}")
    rng = random.Random(f"{seed}-{split}")
    pool = distill_passages(split, max_chars=max_chars)
    rng.shuffle(pool)
    kinds = list(INSTRUCTIONS)
    if n_passage > len(pool) * len(kinds):
        raise ValueError(f"the {split} split has {len(pool)} passages: at most {len(pool) * len(kinds)} passage "
                         f"prompts ({len(kinds)} kinds each), not {n_passage}")
    if n_passage > len(pool):
        log.info("%s: %d passage prompts over %d passages; some passages are asked under two or more kinds", split,
                 n_passage, len(pool))
    out = []
    for i in range(n_passage):
        turn, j = divmod(i, len(pool))
        p = pool[j]
        kind = kinds[(j + turn) % len(kinds)]
        content = INSTRUCTIONS[kind].format(term=_term(p["text"], rng), passage=p["text"])
        out.append({"kind": kind, "source": p["source"], "topic": p["topic"],
                    "messages": [{"role": "user", "content": content}]})
    families = ("reverse", "sort", "lookup", "add", "count")
    for i in range(n_family):
        family = families[i % len(families)]
        out.append({"kind": f"family:{family}", "source": "family", "topic": None,
                    "messages": [{"role": "user", "content": _family_prompt(family, rng)}]})
    seen, unique = set(), []
    for r in out:  # deduplicated by prompt text
        key = r["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def _digest(obj) -> str:
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _read_partial(path: Path, key: str) -> dict[int, dict]:
    """The answers a partial file holds for request ``key`` (index -> record). A file written under another
    request is discarded (logged), never mixed in; a line cut short by a kill ends what is read, and the file is
    rewritten without it so later batches append after whole lines."""
    import json

    if not path.is_file():
        return {}
    done, lines = {}, path.read_text().splitlines(keepends=True)
    good = 0
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n"):
            break
        if row.get("fingerprint") != key:
            log.warning("%s was written under another request (fingerprint %s, this one %s): discarded, not mixed in",
                        path, row.get("fingerprint"), key)
            path.unlink()
            return {}
        done[row["index"]] = {k: row[k] for k in ("messages", "ended", "new_tokens", "seconds")}
        good += 1
    if good < len(lines):
        from overfill_lib.artifacts import atomic_write_text

        log.info("%s: %d whole lines kept, the cut tail dropped", path, good)
        atomic_write_text(path, "".join(lines[:good]))
    if done:
        log.info("%s: resuming with %d answers done", path, len(done))
    return done


def build_distilled_data(model, tokenizer, out_dir: str | Path, *, sizes: dict, max_new_tokens: int = 96,
                         batch_size: int = 16, seed: int = 0, source: dict | None = None,
                         compile: bool | str = False, pad_to: int = PAD_TO,
                         splits: Sequence[str] = DATA_SPLITS) -> Path:
    """Answer :func:`distill_prompts` with ``model`` (greedy) into ``out_dir/<split>.jsonl`` in the ``messages``
    schema, plus ``record.json`` (model fingerprint, decoding, seed, text fingerprints, counts, timings).

    ``sizes`` maps each split to ``(passage prompts, family prompts)``. Answers that do not end within
    ``max_new_tokens`` are dropped (and counted). Each split is written atomically and kept when a rerun asks
    the same of it. Within a split, every finished batch is appended to ``<split>.partial.jsonl`` (each line the
    prompt's index and the request's fingerprint), so an interrupted build resumes at the batch it was on; a partial
    file of another request (model, prompts, decoding, batching) is discarded. A split made again (the corpus, the
    instructions or the counts changed) reuses the earlier build's answers to prompts asked again by the same model
    with the same token budget, and asks only the rest. ``compile``: the fast path's decode
    step, off by default: over passages (prompts of 130-420 tokens, one graph per padded width) the compiles cost
    more than they save on a CPU (SmolLM2-135M, 2 threads, batch 16: 5.1 s an answer compiled, 1.9 s eager).
    ``splits``: the splits to write or complete (default all); the others' files and records are left as they are.
    """
    out_dir = Path(out_dir)
    fingerprint = weights_fingerprint(model)
    record_path = out_dir / "record.json"
    record = read_json(record_path) if record_path.is_file() else {}
    unknown = [s for s in splits if s not in DATA_SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; choose from {', '.join(DATA_SPLITS)}")
    built = splits
    splits = dict(record.get("splits", {}))
    decoding = {"greedy": True, "max_new_tokens": max_new_tokens, "chat_template": "the model's own",
                "batch_size": batch_size, "batching": "by prompt length", "pad_to": pad_to, "compile": compile}
    for split in (s for s in DATA_SPLITS if s in built):
        prompts = distill_prompts(split, *sizes[split], seed)
        request = split_request(split, sizes[split], prompts, fingerprint, seed=seed, max_new_tokens=max_new_tokens)
        if splits.get(split, {}).get("request") == request and (out_dir / f"{split}.jsonl").is_file():
            continue
        reused = _reusable_answers(out_dir / f"{split}.jsonl", splits.get(split, {}).get("request"), request, prompts)
        splits[split] = _answer_split(model, tokenizer, out_dir, split, prompts, request, decoding, reused)
        write_json(record_path, _distill_record(fingerprint, source, decoding, seed, splits))
    return out_dir


def _reusable_answers(path: Path, made: dict | None, request: dict, prompts: list[dict]) -> dict[int, dict]:
    """Answers in an earlier build of a split (``path``, made under request ``made``) to prompts asked again (index
    -> record): an answer depends only on the model, the prompt and the decoding, so when those are unchanged
    (a new corpus rendering, more prompts, other instructions) only the prompts not answered before are asked.
    Answers dropped before (unfinished) are not stored and are asked again. A reused answer's ``new_tokens`` and
    ``seconds`` are not stored either (None, 0): the record counts tokens over the answers a build makes."""
    import json

    if not made or not path.is_file() or any(made.get(k) != request[k] for k in ("model", "max_new_tokens")):
        return {}
    earlier = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        earlier[json.dumps(row["messages"][:-1])] = row["messages"][-1]["content"]
    reused = {}
    for i, p in enumerate(prompts):
        if (content := earlier.get(json.dumps(p["messages"]))) is not None:
            reused[i] = {"messages": [*p["messages"], {"role": "assistant", "content": content}], "ended": True,
                         "new_tokens": None, "seconds": 0.0, "reused": True}
    if reused:
        log.info("%s: %d of %d prompts were answered in the earlier build (same model and decoding): reused", path,
                 len(reused), len(prompts))
    return reused


def split_request(split: str, size: tuple[int, int], prompts: list[dict], model_fingerprint: str, *, seed: int,
                  max_new_tokens: int) -> dict:
    """What a split of self-distilled data was asked for (``record.json``'s ``request``): a committed split is kept
    only while the preset and the code still ask exactly this (model, prompt counts, instructions, corpus text, the
    prompts themselves and decoding), and made again otherwise."""
    n_passage, n_family = size
    return {"model": model_fingerprint, "n_passage": n_passage, "n_family": n_family, "seed": seed,
            "max_new_tokens": max_new_tokens, "instructions": INSTRUCTIONS, "text": fingerprint_of_split(split),
            "prompts": _digest([p["messages"] for p in prompts])}


class _PartialFile:
    """``answer``'s ``on_batch`` for one split: each finished batch is appended to ``<split>.partial.jsonl`` and synced
    (a kill loses at most the batch being written), each line tagged with the request's ``key``; the decode paths
    that made the answers are noted for the record."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self.paths = path, key, set()

    def __call__(self, indices, records, info) -> None:
        import json
        import os

        self.paths.add(info["path"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write("".join(json.dumps({"fingerprint": self.key, "index": i, **r}) + "\n"
                            for i, r in zip(indices, records)))
            f.flush()
            os.fsync(f.fileno())


def _answer_split(model, tokenizer, out_dir: Path, split: str, prompts: list[dict], request: dict,
                  decoding: dict, reused: dict[int, dict] | None = None) -> dict:
    """Answer one split's prompts (resuming from its partial file; ``reused``: answers of an earlier build, see
    :func:`_reusable_answers`), write ``<split>.jsonl`` atomically with the answers that ended, and return the
    split's entry of ``record.json``."""
    import json

    from overfill_lib.artifacts import atomic_write_text

    batch_size, pad_to = decoding["batch_size"], decoding["pad_to"]
    key = _digest({**request, "batch_size": batch_size, "pad_to": pad_to})
    partial = _PartialFile(out_dir / f"{split}.partial.jsonl", key)
    reused = reused or {}
    done = {**reused, **_read_partial(partial.path, key)}
    answered = answer(model, tokenizer, [p["messages"] for p in prompts], max_new_tokens=decoding["max_new_tokens"],
                      batch_size=batch_size, desc=f"{split} answers", compile=decoding["compile"], pad_to=pad_to,
                      done=done, on_batch=partial)
    rows = [{"kind": p["kind"], "source": p["source"], "topic": p["topic"], "messages": a["messages"]}
            for p, a in zip(prompts, answered) if a["ended"] and a["messages"][-1]["content"]]
    atomic_write_text(out_dir / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    partial.path.unlink(missing_ok=True)
    # The batch timings of this run and of the run(s) it resumed (read back from the partial file); reused answers
    # were made by an earlier build and are counted apart.
    made = [a for a in answered if not a.get("reused")]
    seconds = sum(a["seconds"] for a in made)
    new_tokens = sum(a["new_tokens"] for a in made)
    log.info("%s: %d of %d answers kept in %s (%.0f s)", split, len(rows), len(prompts), out_dir / f"{split}.jsonl",
             seconds)
    return {
        "request": request, "prompts": len(prompts), "kept": len(rows),
        "dropped_unfinished": sum(not a["ended"] for a in answered),
        "dropped_empty": sum(a["ended"] and not a["messages"][-1]["content"] for a in answered),
        "ended_share": round(sum(a["ended"] for a in answered) / max(1, len(answered)), 4),
        "kinds": dict(Counter(r["kind"] for r in rows)), "sources": dict(Counter(r["source"] for r in rows)),
        "prompt_kinds": dict(Counter(p["kind"] for p in prompts)),
        "prompt_sources": dict(Counter(p["source"] for p in prompts)),
        # Over the answers made by this build and the runs it resumed: a reused answer's token count is not stored.
        "answer_tokens": {"mean": round(new_tokens / max(1, len(made)), 1),
                          "mean_kept": round(sum(a["new_tokens"] for a in made if a["ended"])
                                             / max(1, sum(a["ended"] for a in made)), 1), "counted": len(made)},
        "generation": {"seconds": round(seconds, 1), "new_tokens": new_tokens,
                       "tokens_per_s": round(new_tokens / seconds, 1) if seconds else None,
                       "resumed_answers": len(done) - len(reused), "reused_answers": len(reused),
                       "paths": sorted(partial.paths), "batches": -(-(len(prompts) - len(reused)) // batch_size)},
    }


def _distill_record(fingerprint: str, source: dict | None, decoding: dict, seed: int, splits: dict) -> dict:
    """``record.json``: the model, decoding, text sources and passage rule behind every split, and the splits."""
    from overfill_lib.artifacts import environment_record
    from overfill_lib.stdlib_corpus import record as stdlib_record

    stdlib = stdlib_record()
    return {"model_fingerprint": fingerprint, "model_source": source, "decoding": dict(decoding),
            "seed": seed, "corpus": describe(),
            "stdlib_corpus": {k: stdlib[k] for k in ("source", "python", "split_rule", "splits", "fingerprint")},
            "passage_rule": {"max_chars": 1200, "min_chars": 400, "stdlib_min_prose_share": MIN_PROSE_SHARE,
                             "validation_every": VALIDATION_EVERY},
            "splits": splits, "environment": environment_record("cpu", seed)}


def fingerprint_of_split(split: str) -> dict:
    """The corpus text a data split's prompts are drawn from: help topics and stdlib docstrings."""
    from overfill_lib.stdlib_corpus import record as stdlib_record

    return {"help": fingerprint("heldout" if split == "test" else "calibration"),
            "stdlib": stdlib_record()["splits"][split]["fingerprint"]}


def check_distill_section(section: dict) -> dict:
    """A preset's ``distill`` section, checked (``config.DistillSection``), as a plain dict."""
    from overfill_lib.config import DistillSection, values

    return values(DistillSection, section, "distill")
