"""The synthetic instruction suite: the offline default's training and test data.

Families of chat records (``messages`` schema) whose answers depend on reading the whole prompt: ``reverse``,
``sort``, ``lookup`` (a key among distractors), ``add`` (digits least-significant first), ``count``, and opt-in
``mul``. Deterministic from a seed; the splits are regenerated (under a second) and compared by content on every
write, so a file from another generator or config is never reused.
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from overfill_lib import scoring

SPLITS = ("train", "validation", "test")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes and difficulty of the suite. Lengths are inclusive ranges."""

    seed: int = 0
    families: tuple[str, ...] = ("reverse", "sort", "lookup", "add", "count")  # ``mul`` is opt-in
    n_train: int = 20000
    n_validation: int = 500
    n_test: int = 1000
    reverse_len: tuple[int, int] = (4, 10)
    sort_len: tuple[int, int] = (4, 10)
    lookup_pairs: tuple[int, int] = (3, 6)
    add_digits: tuple[int, int] = (1, 4)
    count_len: tuple[int, int] = (5, 12)
    mul_digits: tuple[int, int] = (1, 3)
    # Relative share of each family in the train split (default 1); validation and test stay balanced.
    train_weights: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"unknown task families {unknown}; choose from {sorted(FAMILIES)}")
        stray = sorted(set(self.train_weights) - set(self.families))
        if stray:
            raise ValueError(f"train_weights names families {stray} that the suite does not use; use {list(self.families)}")
        bad = {f: w for f, w in self.train_weights.items() if not isinstance(w, int) or w < 1}
        if bad:
            raise ValueError(f"train_weights must be whole numbers >= 1, got {bad}")
        for name in ("n_train", "n_validation", "n_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> SuiteConfig:
        from overfill_lib.config import parse

        return parse(cls, d, "suite")

    def to_dict(self) -> dict:
        """The config, less knobs that cannot change the records (so suites written before they existed keep
        their fingerprint): ``mul_digits`` without a ``mul`` family, and empty ``train_weights``."""
        d = asdict(self)
        if "mul" not in self.families:
            del d["mul_digits"]
        if not self.train_weights:
            del d["train_weights"]
        return d


def _letters(rng: random.Random, n: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _reverse(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    s = _letters(rng, rng.randint(*cfg.reverse_len))
    return s, s[::-1]


def _sort(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    s = _letters(rng, rng.randint(*cfg.sort_len), string.digits)
    return s, "".join(sorted(s))


def _lookup(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    keys = rng.sample(string.ascii_lowercase, rng.randint(*cfg.lookup_pairs))
    values = [f"{rng.randrange(100):02d}" for _ in keys]
    query = rng.randrange(len(keys))
    pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
    # The query comes first: each pair can then be checked against it as it is read.
    return f"?{keys[query]} {pairs}", values[query]


def _add(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** rng.randint(*cfg.add_digits)) for _ in range(2))
    return f"{str(a)[::-1]}+{str(b)[::-1]}", str(a + b)[::-1]


def _count(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    s = _letters(rng, rng.randint(*cfg.count_len), "abcd")
    target = rng.choice("abcd")
    return f"{target}?{s}", str(s.count(target))


def _mul(rng: random.Random, cfg: SuiteConfig) -> tuple[str, str]:
    a, b = rng.randrange(10 ** rng.randint(*cfg.mul_digits)), rng.randint(2, 9)
    return f"{str(a)[::-1]}*{b}", str(a * b)[::-1]


@dataclass(frozen=True)
class Family:
    name: str
    instruction: str  # the system turn
    make: Callable[[random.Random, SuiteConfig], tuple[str, str]]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("reverse", "reverse", _reverse),
        Family("sort", "sort", _sort),
        Family("lookup", "lookup", _lookup),
        Family("add", "add", _add),
        Family("count", "count", _count),
        Family("mul", "multiply", _mul),
    )
}


def make_record(family: str, rng: random.Random, cfg: SuiteConfig) -> dict:
    fam = FAMILIES[family]
    user, answer = fam.make(rng, cfg)
    return {
        "family": family,
        "messages": [
            {"role": "system", "content": fam.instruction},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ],
    }


def _prompt_key(record: dict) -> tuple[str, str]:
    return record["family"], record["messages"][1]["content"]


def generate_suite(cfg: SuiteConfig) -> dict[str, list[dict]]:
    """Build the three splits. Test and validation prompts never appear in train, and each other."""
    rng = random.Random(cfg.seed)
    held_out: set[tuple[str, str]] = set()
    splits: dict[str, list[dict]] = {}
    # Held-out splits are drawn first; train may repeat itself but never a held-out prompt.
    weighted = [f for f in cfg.families for _ in range(cfg.train_weights.get(f, 1))]
    for split, n in (("test", cfg.n_test), ("validation", cfg.n_validation), ("train", cfg.n_train)):
        cycle = weighted if split == "train" else cfg.families
        records: list[dict] = []
        attempts = 0
        while len(records) < n:
            attempts += 1
            if attempts > 50 * n:
                raise ValueError(f"cannot draw {n} distinct {split} prompts; widen the difficulty ranges")
            family = cycle[len(records) % len(cycle)]
            record = make_record(family, rng, cfg)
            key = _prompt_key(record)
            if key in held_out:
                continue
            if split != "train":
                held_out.add(key)
            records.append({"id": f"{split}-{len(records)}", **record})
        splits[split] = records
    return splits


def _split_files(cfg: SuiteConfig) -> dict[str, bytes]:
    """Each split as the bytes of its JSONL file."""
    return {split: "".join(json.dumps(r) + "\n" for r in records).encode()
            for split, records in generate_suite(cfg).items()}


def content_hashes(cfg: SuiteConfig) -> dict[str, str]:
    """The ``artifacts.content_sha256`` of each split file the generator writes for ``cfg``."""
    from overfill_lib.artifacts import content_sha256

    return {split: content_sha256(data) for split, data in _split_files(cfg).items()}


def write_suite(cfg: SuiteConfig, directory: str | Path) -> Path:
    """Write ``{split}.jsonl`` and ``suite.json`` (config, content hashes, sizes) atomically.

    The splits are generated on every call (about a second for 100k records) and a file is rewritten
    only when its bytes differ: a split left by an older generator or another config is never reused.
    """
    from overfill_lib.artifacts import atomic_write_text, content_sha256, read_json

    directory = Path(directory)
    files = _split_files(cfg)
    hashes = {split: content_sha256(data) for split, data in files.items()}
    for split, data in files.items():
        path = directory / f"{split}.jsonl"
        if path.exists() and content_sha256(path.read_bytes()) == hashes[split]:
            continue
        if path.exists():
            log.warning("%s is not what the generator makes from this config; rewriting it", path)
        atomic_write_text(path, data.decode())
    # The fingerprint hashes the contents, so a change to the generator changes it as a config change does.
    meta = {"fingerprint": content_sha256(json.dumps(hashes, sort_keys=True).encode()), "content_sha256": hashes,
            "config": cfg.to_dict(), "sizes": {s: data.count(b"\n") for s, data in files.items()}}
    meta_path = directory / "suite.json"
    if not meta_path.exists() or read_json(meta_path) != meta:
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return directory


def load_split(directory: str | Path, split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    path = Path(directory) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; create it with overfill_lib.tasks.write_suite")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


# The exact-match rule lives in scoring.py with every other measure; these names stay for the tests that use them.
normalize_answer, exact_match, score = scoring.normalize_answer, scoring.answer_matches, scoring.exact_match_scores


def first_per_family(records: list[dict], n: int) -> list[dict]:
    counts: dict[str, int] = {}
    picked = []
    for r in records:
        if counts.get(r["family"], 0) < n:
            counts[r["family"]] = counts.get(r["family"], 0) + 1
            picked.append(r)
    return picked


def examples_table(records: list[dict], predictions: list[str] | None = None):
    """A DataFrame of records: family, system, user, answer (and prediction with its exact match)."""
    import pandas as pd

    rows = []
    for i, r in enumerate(records):
        row = {"family": r["family"], "system": r["messages"][0]["content"], "user": r["messages"][1]["content"],
               "answer": r["messages"][-1]["content"]}
        if predictions is not None:
            row["prediction"] = predictions[i]
            row["exact"] = exact_match(predictions[i], row["answer"])
        rows.append(row)
    return pd.DataFrame(rows)
