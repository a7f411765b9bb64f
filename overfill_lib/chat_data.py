"""Chat datasets for decoder training: sources, schemas, the prompt/response split, length limits, collation.

An example is a conversation cut before its final assistant reply: the prompt is every turn before it through the
chat template (what the full model prefills), the response that reply and the end-of-turn token. Sources: the
suite, local JSONL/JSON files or saved datasets, hub names (a clear error offline); schemas ``messages`` and
``conversations`` (from/value), each turn's content a string or a list of text parts (:func:`message_text`). Too-long examples are dropped, never truncated, and every drop is counted.
"""

from __future__ import annotations

import json
import logging
import os
import numbers
import reprlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

SCHEMAS = ("messages", "conversations")
# Speaker names of the ``conversations`` schema (ShareGPT style) -> chat-template roles.
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Roles of the ``messages`` schema that chat templates know; another (a typo, "Assistant") would be rendered as a
# speaker of its own by most templates and trained on as such.
ROLES = ("system", "user", "assistant", "tool", "function", "ipython", "developer")
LAYOUTS = ("pair", "causal")
RECORD = "_record"  # each row's record number in the source, carried through `where` for errors naming the line


# --------------------------------------------------------------------------------------------------
# One conversation
# --------------------------------------------------------------------------------------------------


class InvalidConversation(ValueError):
    """A record that cannot become a (prompt, response) example; ``reason`` is a short key for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def message_text(content: Any, turn: str = "a turn") -> str:
    """A turn's content as text, by the one rule of :func:`overfill_lib.generation.message_text` (text parts joined;
    None, numbers and non-text parts refused), refused here as an ``InvalidConversation`` that ``skip_invalid`` counts."""
    from overfill_lib import generation

    try:
        return generation.message_text(content, turn)
    except generation.ContentNotText as e:
        raise InvalidConversation("content_not_text", str(e)) from None


def _turns(record: dict, schema: str) -> list:
    turns = record[schema]
    if not isinstance(turns, (list, tuple)):
        raise InvalidConversation("turns_not_a_list", f"{schema!r} is {type(turns).__name__} {reprlib.repr(turns)}, "
                                  "not a list of turns")
    bad = next((i for i, t in enumerate(turns) if not isinstance(t, dict)), None)
    if bad is not None:
        raise InvalidConversation("turn_not_a_mapping", f"turn {bad} of {schema!r} is {reprlib.repr(turns[bad])}, not "
                                  f"a mapping ({'{role, content}' if schema == 'messages' else '{from, value}'})")
    return list(turns)


def to_messages(record: dict) -> list[dict]:
    """The record's turns as ``[{"role", "content"}]``, from either schema; contents by :func:`message_text`."""
    if "messages" in record and record["messages"] is not None:
        turns = _turns(record, "messages")
        if not all("role" in t for t in turns):
            raise InvalidConversation("turn_without_role", "a turn without a 'role' (each turn: {role, content})")
        unknown = next((t["role"] for t in turns if t["role"] not in ROLES), None)
        if unknown is not None:
            raise InvalidConversation("unknown_role", f"unknown role {unknown!r}; roles: {', '.join(ROLES)}")
        return [{"role": t["role"], "content": message_text(t.get("content"), f"turn {i} ({t['role']!r})")}
                for i, t in enumerate(turns)]
    if "conversations" in record and record["conversations"] is not None:
        out = []
        for i, t in enumerate(_turns(record, "conversations")):
            speaker = str(t.get("from", "")).lower()
            if speaker not in ROLE_MAP:
                raise InvalidConversation(
                    "unknown_role",
                    f"unknown speaker {t.get('from')!r} in a 'conversations' record; known speakers: {sorted(ROLE_MAP)}",
                )
            out.append({"role": ROLE_MAP[speaker], "content": message_text(t.get("value"), f"turn {i} ({speaker!r})")})
        return out
    if set(record) & set(SCHEMAS):  # the column exists (another record has it) but this one has no turns
        raise InvalidConversation("no_turns", f"the record has no turns (its {'/'.join(sorted(set(record) & set(SCHEMAS)))} "
                                  "is null or missing)")
    raise ValueError(f"record has neither of the chat schemas {SCHEMAS}; its keys: {sorted(record)}")


def split_final_reply(messages: Sequence[dict]) -> list[dict]:
    """The conversation up to and including its final assistant turn (later turns dropped).

    Raises ``InvalidConversation`` when there is no assistant turn, or the final one is empty.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        roles = [m["role"] for m in messages]
        raise InvalidConversation(
            "no_assistant_turn",
            f"conversation has no assistant turn (roles: {roles}); training needs a final assistant reply to learn",
        )
    if not messages[last]["content"]:
        raise InvalidConversation("empty_response", "the final assistant reply is empty")
    return list(messages[: last + 1])


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("HF_DATASETS_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.lower() in {"1", "true", "yes", "on"}


def _load_json_file(path: Path):
    """A local JSON / JSONL file through the ``json`` builder; a file it cannot read gets an error naming the line.

    A JSONL file is checked around the builder, whose own errors name no line: bytes that are not UTF-8 (it takes them
    in and fails later, while tokenizing) and a record per line (a record with a key twice becomes two rows).
    """
    import datasets

    records = _scan_jsonl(path) if path.suffix == ".jsonl" else None
    if records == 0:
        raise ValueError(f"{path} is empty: it needs one JSON chat record per line")
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # the builder says "An error occurred while generating the dataset", or StopIteration
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        if not any(line.strip() for line in lines):
            raise ValueError(f"{path} is empty: it needs one JSON chat record per line") from e
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as bad:
                        raise ValueError(f"{path} line {number}: not valid JSON ({bad.msg} at column {bad.colno}); "
                                         "each line must be one complete JSON record") from e
                    if not isinstance(record, dict):
                        raise ValueError(f"{path} line {number}: a JSON {type(record).__name__}, not a record; each "
                                         "line must be one JSON object with 'messages' or 'conversations'") from e
            _refuse_duplicate_keys(path)
            blank = next((n for n, line in enumerate(lines[:-1], start=1) if not line.strip()), None)
            if blank is not None:
                raise ValueError(f"{path} could not be read ({type(e).__name__}: {e}); line {blank} is blank, which "
                                 "the json reader fails on when records mix types (e.g. string and list content): "
                                 "remove the blank lines") from e
        raise ValueError(f"{path} could not be read as JSON chat records ({type(e).__name__}: {e})") from e
    if records is not None and len(dataset) != records:
        _refuse_duplicate_keys(path)
        raise ValueError(f"{path}: {len(dataset)} records read from {records} non-blank lines; each line must hold "
                         "exactly one JSON record")
    return dataset


def _scan_jsonl(path: Path) -> int:
    """The records (non-blank lines) of a JSONL file, refusing one that is not UTF-8 by line and byte."""
    records = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.isascii():  # ASCII, the common case, is UTF-8 and fast to tell
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(
                        f"{path} line {number}: not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of "
                        f"the line); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > utf8.jsonl"
                    ) from None
            records += not _blank(line)  # the builder skips blank lines
    return records


def _blank(line: bytes) -> bool:
    return not line or line.isspace()  # not strip(): it copies a 30 MB line


def _refuse_duplicate_keys(path: Path) -> None:
    """Raise naming the first line whose JSON object repeats a key (JSON keeps one value, the Arrow reader two rows)."""

    def pairs(items):
        seen = set()
        for key, _ in items:
            if key in seen:
                raise ValueError(f"{path} line {number}: key {key!r} appears twice in one record; the reader would "
                                 "make two conversations of it: remove or rename one")
            seen.add(key)
        return dict(items)

    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    json.loads(line, object_pairs_hook=pairs)
                except json.JSONDecodeError:
                    continue  # read by the Arrow reader all the same; not what made the extra rows


def _json_typed(feature) -> bool:
    """Whether ``feature`` holds values that datasets stored as JSON text (a column whose values mix types)."""
    import datasets

    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, dict):
        return any(_json_typed(f) for f in feature.values())
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return inner is not None and _json_typed(inner)


def _exact_chat_columns(dataset, path: Path | None) -> tuple[Any, set[str]]:
    """The dataset with its chat columns of mixed types re-read from the JSONL file ``path``, as exact JSON text
    (decoded by ``_encode_batch``), and the names of the columns re-read.

    datasets stores a column whose values mix types (content a string in one turn and a list of text parts in
    another) as JSON text, but keeps a string that itself parses as JSON as it is: "31" would come back as 31 and
    "null" as None. The rows are the file's non-blank lines, one each (``_load_json_file`` checks it).
    """
    mixed = [c for c in SCHEMAS if c in dataset.column_names and _json_typed(dataset.features[c])]
    if not mixed or path is None or path.suffix != ".jsonl":
        return dataset, set()
    values: dict[str, list[str | None]] = {c: [] for c in mixed}
    with path.open("rb") as f:
        for line in f:
            if not _blank(line):
                record = json.loads(line)
                for c in mixed:
                    value = record.get(c)
                    values[c].append(None if value is None else json.dumps(value))
    for c in mixed:  # added before the old one goes: a table left with no column has no rows either
        dataset = dataset.add_column(f"{c}.exact", values[c]).remove_columns(c).rename_column(f"{c}.exact", c)
    return dataset, set(mixed)


def _source_file(source, split: str, suite_dir) -> Path | None:
    """The local file ``load_conversations`` reads ``source`` from, if it reads one."""
    if str(source) == "suite":
        path = Path(suite_dir) / f"{split}.jsonl"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / f"{split}.jsonl"
    return path if path.is_file() else None


def _line_of(path: Path | None, record: int) -> str:
    """Where record ``record`` (from 0) of a JSONL file is, as ``PATH line N``; '' for other sources."""
    if path is None or path.suffix != ".jsonl":
        return ""
    with path.open("rb") as f:
        seen = -1
        for number, line in enumerate(f, start=1):
            seen += not _blank(line)
            if seen == record:
                return f"{path} line {number}"
    return ""


def _content_sha256(source, split: str, suite_dir) -> str | None:
    """The ``artifacts.content_sha256`` of the local file ``load_conversations`` reads, if it reads one."""
    from overfill_lib.artifacts import content_sha256

    path = _source_file(source, split, suite_dir)
    return content_sha256(path.read_bytes()) if path is not None else None


def load_conversations(
    source: str | os.PathLike,
    split: str = "train",
    *,
    config: str | None = None,
    suite_dir: str | os.PathLike | None = None,
):
    """A ``datasets.Dataset`` of chat records from ``source`` (see the module docstring)."""
    import datasets

    text = str(source)
    if text == "suite":
        if suite_dir is None:
            raise ValueError("data source 'suite' needs the preset's suite_dir (this preset has no synthetic suite)")
        from overfill_lib import tasks

        return datasets.Dataset.from_list(tasks.load_split(suite_dir, split))
    path = Path(text)
    if path.is_dir():
        if (path / f"{split}.jsonl").is_file():
            return _load_json_file(path / f"{split}.jsonl")
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        raise ValueError(f"{path} is a directory without {split}.jsonl or a saved dataset (Dataset.save_to_disk)")
    if path.suffix in {".jsonl", ".json"}:
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist")
        return _load_json_file(path)
    if text.startswith((".", "/")) or text.count("/") != 1:
        raise ValueError(
            f"data source {text!r} is not 'suite', an existing .jsonl/.json file or directory, nor a hub dataset name "
            "('org/name')"
        )
    how = (
        f"load it where the hub is reachable (datasets.load_dataset({text!r}{', ' + repr(config) if config else ''}, "
        f"split={split!r})), save it with .to_json('conversations.jsonl') or .save_to_disk(DIR), copy it here and "
        "pass that path as the data source"
    )
    try:
        return datasets.load_dataset(text, config, split=split)
    except Exception as e:  # offline, missing, gated: one message with the way out
        if _offline():
            raise ValueError(f"dataset {text!r} is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1): {how}") from e
        raise ValueError(f"could not load dataset {text!r} ({type(e).__name__}: {e}); {how}") from e


def detect_schema(dataset) -> str:
    cols = set(dataset.column_names) - {RECORD}
    if set(SCHEMAS) <= cols:  # a JSONL file whose rows use both: each row has one of the columns empty
        uses = {s: [i for i, v in enumerate(dataset[s]) if v is not None] for s in SCHEMAS}
        if all(uses.values()):
            first = ", ".join(f"{s!r} (first at row {rows[0]})" for s, rows in uses.items())
            raise ValueError(f"the data mixes the two chat schemas: {first}; convert every record to one schema "
                             "(data.to_messages reads both)")
        return next(s for s in SCHEMAS if uses[s])
    for schema in SCHEMAS:
        if schema in cols:
            return schema
    raise ValueError(f"no chat column in the dataset: expected one of {SCHEMAS}, found columns {sorted(cols)}")


# --------------------------------------------------------------------------------------------------
# Tokenization with counted drops
# --------------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What became of the source records: kept, and dropped by reason."""

    source: str
    records: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    max_length: int | None = None
    prompt_tokens: int = 0
    response_tokens: int = 0
    content_sha256: str | None = None  # of the file the records came from (suite split or local file), when there is one

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        drops = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        return (f"{self.source}: kept {self.kept} of {self.records} conversations (dropped: {drops}); "
                f"{self.prompt_tokens} prompt + {self.response_tokens} response tokens")


def max_token_chars(tokenizer) -> int:
    """At least as many characters as any one token covers: twice the longest vocabulary entry. An entry spells the
    text it covers (byte-level BPE one character per byte, SentencePiece and character vocabularies the text itself);
    the factor 2 leaves room for a normalizer that composes characters."""
    return 2 * max(len(token) for token in tokenizer.get_vocab())


def _encode_batch(batch: dict, tokenizer, schema: str, max_length: int | None = None,
                  token_chars: int | None = None, json_text: bool = False) -> dict:
    from overfill_lib.tokens import encode_examples

    n = len(batch[schema])
    convs: list[list[dict] | None] = []
    reasons, details = [""] * n, [""] * n
    at_least: dict[int, int] = {}  # row -> a lower bound on its tokens, for rows certainly over max_length
    for i in range(n):
        value = batch[schema][i]
        if json_text and value is not None:  # re-read by _exact_chat_columns
            value = json.loads(value)
        try:
            conv = split_final_reply(to_messages({schema: value}))
        except InvalidConversation as e:
            convs.append(None)
            reasons[i], details[i] = e.reason, str(e)
            continue
        if max_length is not None and token_chars:
            # Counting characters is cheap; tokenizing a 30 MB line only to drop it took minutes.
            tokens = -(-sum(len(m["content"]) for m in conv) // token_chars)
            if tokens > max_length:
                at_least[i] = tokens
                conv = None
        convs.append(conv)
    valid = [c for c in convs if c is not None]
    encoded = iter(encode_examples(tokenizer, valid) if valid else [])
    prompt_ids, response_ids, lengths = [], [], []
    for i, c in enumerate(convs):
        if c is None:
            prompt_ids.append([])
            response_ids.append([])
            lengths.append(at_least.get(i, 0))
            continue
        ex = next(encoded)
        n_prompt = sum(1 for label in ex["labels"] if label == -100)
        prompt_ids.append(ex["input_ids"][:n_prompt])
        response_ids.append(ex["input_ids"][n_prompt:])
        lengths.append(len(ex["input_ids"]))
    return {
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "length": lengths,
        "invalid": reasons,
        "detail": details,
    }


def _check_tokenizer(tokenizer, max_length: int | None) -> None:
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; pass a chat model's tokenizer (or set tokenizer.chat_template)")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the response with (the end-of-turn token)")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length} is too small: a prompt and a response need at least 2 tokens")


def _first_records(dataset, limit: int | None):
    """The first ``limit`` records (all when ``limit`` is None)."""
    if limit is None:
        return dataset
    if isinstance(limit, bool) or not isinstance(limit, numbers.Integral):
        raise ValueError(f"limit={limit!r} is not a whole number of records; give a positive integer (or none for all)")
    if limit < 1:
        raise ValueError(f"limit={limit} keeps no records; give a positive number (or none for all)")
    return dataset.select(range(min(int(limit), len(dataset))))


def _check_where(where: Mapping[str, Any] | None, dataset) -> None:
    if where is not None and not isinstance(where, Mapping):
        raise ValueError(f"where={where!r} must be a mapping of column to value, e.g. {{'langdetect': 'en'}}")
    if where:
        missing = sorted(set(where) - set(dataset.column_names))
        if missing:
            raise ValueError(f"'where' names columns {missing} the dataset lacks; its columns: {dataset.column_names}")


def _filter_where(dataset, where: Mapping[str, Any], source, num_proc: int | None):
    """The records whose columns equal ``where``'s values, and how many were dropped; none kept is an error."""
    before = len(dataset)
    dataset = dataset.filter(lambda row: all(row[k] == v for k, v in where.items()), num_proc=num_proc)
    if len(dataset) == 0:
        raise ValueError(f"where={where} keeps none of the {before} records of {source!r}; check the column values "
                         "(e.g. with datasets.load_dataset(...).unique(COLUMN))")
    return dataset, before - len(dataset)


def _drop_invalid(dataset, source, path, skip_invalid: bool, num_proc: int | None):
    """The tokenized rows without the conversations :func:`_encode_batch` refused, and a count per reason; any such
    conversation is an error naming the first (and its line) unless ``skip_invalid``."""
    invalid = Counter(r for r in dataset["invalid"] if r)
    if invalid and not skip_invalid:
        first = dataset[next(i for i, r in enumerate(dataset["invalid"]) if r)]
        line = _line_of(path, first[RECORD])
        raise ValueError(
            f"{sum(invalid.values())} conversation(s) of {source!r} cannot be used ({dict(invalid)}; first at index "
            f"{first[RECORD]}{', ' + line if line else ''}: {first['detail']}). Each needs turns with a role and text "
            "content, and a final, non-empty assistant reply: fix the data or pass skip_invalid=True "
            "(training.skip_invalid) to drop and count them."
        )
    if invalid:
        dataset = dataset.filter(lambda row: not row["invalid"], num_proc=num_proc)
    return dataset, invalid


def prepare_chat_data(
    source: str | os.PathLike,
    tokenizer,
    *,
    split: str = "train",
    config: str | None = None,
    suite_dir: str | os.PathLike | None = None,
    max_length: int | None = None,
    limit: int | None = None,
    where: dict[str, Any] | None = None,
    skip_invalid: bool = False,
    num_proc: int | None = None,
):
    """Tokenize a chat source into ``prompt_ids`` / ``response_ids`` / ``length`` rows.

    ``where`` keeps records whose columns equal the given values (e.g. ``{"langdetect": "en"}`` for
    Infinity-Instruct's English part); ``limit`` keeps the first N records before anything else.
    A conversation with no assistant turn (or an empty final reply, an unknown speaker, content that is
    not text: :func:`message_text`) is an error naming its file and line unless ``skip_invalid``, in
    which case it is dropped and counted. One over ``max_length`` is dropped and counted as too long,
    without tokenizing it when its characters alone prove it (:func:`max_token_chars`). Returns the
    dataset and its ``DataStats``; an empty result is an error naming what removed the records.
    """
    _check_tokenizer(tokenizer, max_length)
    dataset = load_conversations(source, split, config=config, suite_dir=suite_dir)
    if len(dataset) == 0:
        raise ValueError(f"{source!r} ({split} split) holds no records")
    path = _source_file(source, split, suite_dir)
    dataset, json_text = _exact_chat_columns(dataset, path)
    dataset = _first_records(dataset, limit)
    records = len(dataset)
    dropped: Counter = Counter()
    _check_where(where, dataset)
    # Each row keeps its record number through filtering and tokenizing, so an error can name the file's line.
    dataset = dataset.add_column(RECORD, list(range(records)))
    if where:
        dataset, dropped["filtered_by_where"] = _filter_where(dataset, where, source, num_proc)
    schema = detect_schema(dataset)
    dataset = dataset.map(
        _encode_batch,
        fn_kwargs={"tokenizer": tokenizer, "schema": schema, "max_length": max_length,
                   "token_chars": max_token_chars(tokenizer) if max_length is not None else None,
                   "json_text": schema in json_text},
        batched=True,
        batch_size=1000,
        remove_columns=[c for c in dataset.column_names if c != RECORD],
        num_proc=num_proc,
        desc="tokenizing conversations",
    )
    dataset, invalid = _drop_invalid(dataset, source, path, skip_invalid, num_proc)
    dropped.update(invalid)
    if max_length is not None:
        before = len(dataset)
        dataset = dataset.filter(lambda row: row["length"] <= max_length, num_proc=num_proc)
        dropped["too_long"] = before - len(dataset)
    dataset = dataset.remove_columns(["invalid", "detail", RECORD])
    stats = DataStats(
        source=str(source), records=records, kept=len(dataset), dropped=dict(dropped), max_length=max_length,
        prompt_tokens=sum(len(p) for p in dataset["prompt_ids"]) if len(dataset) else 0,
        response_tokens=sum(len(r) for r in dataset["response_ids"]) if len(dataset) else 0,
        content_sha256=_content_sha256(source, split, suite_dir),
    )
    if not len(dataset):
        raise ValueError(
            f"no training examples left from {source!r} ({records} records; dropped {dict(dropped)}): "
            "raise training.max_length, loosen 'where', or check the data's schema"
        )
    log.info("%s", stats.summary())
    return dataset, stats


# --------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------


class ChatCollator:
    """Batches of tokenized examples for one of two layouts.

    ``pair`` (OverFill): ``context_ids``/``context_mask`` left-padded (the prompt, prefilled by the full
    model, positions from the mask as in generation) and ``continuation_ids``/``continuation_mask``
    right-padded (the response), the inputs of ``OverFillModel.forward_continuation``.

    ``causal`` (baselines): ``input_ids`` = prompt + response right-padded, ``attention_mask``, and
    ``labels`` = the response tokens (-100 on the prompt and padding), so the shifted causal-LM loss
    covers exactly the response tokens, the same tokens the pair layout scores.
    """

    def __init__(self, pad_token_id: int, layout: str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown collation layout {layout!r}; choose from {LAYOUTS}")
        self.pad_token_id = int(pad_token_id)
        self.layout = layout

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        from overfill_lib.generation import pad_sequences

        prompts = [list(f["prompt_ids"]) for f in features]
        responses = [list(f["response_ids"]) for f in features]
        if self.layout == "pair":
            ctx, ctx_mask = pad_sequences(prompts, self.pad_token_id, side="left")
            cont, cont_mask = pad_sequences(responses, self.pad_token_id, side="right")
            return {"context_ids": ctx, "context_mask": ctx_mask, "continuation_ids": cont, "continuation_mask": cont_mask}
        ids, mask = pad_sequences([p + r for p, r in zip(prompts, responses)], self.pad_token_id, side="right")
        labels = torch.full_like(ids, -100)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
