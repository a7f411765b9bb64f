"""Real text that ships with Python (corpus): topic splits, prompts, windows, the self-distilled chat data, and
how faithfully a model continues the full model's answers (fidelity)."""

import copy
import json

import pytest

from overfill_lib import corpus, stdlib_corpus
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.generation import encode_chat
from overfill_lib.presets import load_preset
from tests.gguf_files import bpe_tokenizer
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def test_topic_splits_are_disjoint_and_prompts_come_from_held_out_topics(tokenizer):
    calibration, heldout = corpus.topic_names("calibration"), corpus.topic_names("heldout")
    assert not set(calibration) & set(heldout) and sorted(calibration + heldout) == sorted(corpus.topics())
    share = sum(map(len, corpus.texts("heldout"))) / sum(map(len, corpus.topics().values()))
    assert 0.1 < share < 0.3
    prompts = corpus.summary_prompts("heldout", 8)
    assert len(prompts) == 8 and all(p[0]["content"].startswith(corpus.SUMMARY_INSTRUCTION) for p in prompts)
    held_text = "\n".join(corpus.texts("heldout"))
    assert all(p[0]["content"].split("\n\n", 1)[1].split("\n\n")[0] in held_text for p in prompts)
    windows = corpus.token_windows(corpus.texts("calibration"), tokenizer, 3, 64)
    assert [len(w) for w in windows] == [64, 64, 64]


def test_distill_prompts_split_by_topic_and_module_and_are_unique():
    from overfill_lib import stdlib_corpus

    train, validation, test = (corpus.distill_prompts(s, 400, 20) for s in corpus.DATA_SPLITS)
    texts = [[r["messages"][0]["content"] for r in split] for split in (train, validation, test)]
    assert all(len(t) == len(set(t)) for t in texts) and not set(texts[0]) & set(texts[1])
    by_source = lambda rows, source: {r["topic"] for r in rows if r["source"] == source}  # noqa: E731
    assert by_source(test, "help") <= set(corpus.topic_names("heldout"))
    assert by_source(train + validation, "help") <= set(corpus.topic_names("calibration"))
    for split, rows in zip(corpus.DATA_SPLITS, (train, validation, test)):
        assert by_source(rows, "stdlib") and {stdlib_corpus.split_of(m) for m in by_source(rows, "stdlib")} == {split}
    assert {r["source"] for r in train} == {"help", "stdlib", "family"}
    kinds = {r["kind"] for r in train}
    assert set(corpus.INSTRUCTIONS) <= kinds and {"family:lookup", "family:add"} <= kinds
    assert corpus.distill_prompts("train", 5, 5, seed=1) != corpus.distill_prompts("train", 5, 5, seed=0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus.distill_prompts("dev", 1, 1)


def test_test_passages_share_no_text_with_train_or_validation():
    """Held out means held out: no paragraph of a test passage occurs in a train or validation passage, and asked
    for more prompts than passages, a passage comes back under another instruction, never the same one."""
    pools = {s: corpus.distill_passages(s) for s in corpus.DATA_SPLITS}
    seen = {" ".join(para.split()) for s in ("train", "validation") for p in pools[s] for para in p["text"].split("\n\n")}
    test_paragraphs = [" ".join(para.split()) for p in pools["test"] for para in p["text"].split("\n\n")]
    assert len(test_paragraphs) > 500 and not [t for t in test_paragraphs if len(t) >= 80 and t in seen]
    assert all(400 <= len(p["text"]) <= 1200 for pool in pools.values() for p in pool)
    assert all(corpus.prose_share(p["text"]) >= corpus.MIN_PROSE_SHARE for p in pools["test"] if p["source"] == "stdlib")
    n = len(pools["test"]) + 20
    prompts = corpus.distill_prompts("test", n, 0)
    assert len(prompts) == n
    pairs = [(r["kind"], next(p["text"] for p in pools["test"] if p["text"] in r["messages"][0]["content"]))
             for r in prompts]
    assert len(set(pairs)) == n and len({text for _, text in pairs}) == n - 20
    with pytest.raises(ValueError, match="at most"):
        corpus.distill_prompts("test", len(pools["test"]) * len(corpus.INSTRUCTIONS) + 1, 0)


def test_stdlib_passages_are_prose_without_pydoc_layout():
    text = ("Help on module spam:\n\nNAME\n    spam\n\nDESCRIPTION\n    Spam does eggs.\n\nCLASSES\n"
            "    class Can(size)\n     |  A can of spam.\n     |\n     |  open(self, key=None)\n"
            "     |      Open the can with the key.\n     |\n")
    assert corpus.stdlib_paragraphs(text, "spam") == ["Spam does eggs.", "class Can(size)\nA can of spam.",
                                                      "open(self, key=None)\nOpen the can with the key."]
    code = "spam(a, b=1)\n>>> spam(1, 2)\n3\nham(x) -> int\neggs(*args, **kw)"
    prose = "The can is opened with the key that came with it, and the spam is served cold."
    assert corpus.prose_share(code) == 0.0 and corpus.prose_share(prose) == 1.0


def test_answers_are_the_models_greedy_tokens_and_say_whether_they_ended(tokenizer):
    model = tiny_model("llama", tied=True, vocab_size=len(tokenizer)).eval()
    chats = [[{"role": "user", "content": "Name a fox."}], [{"role": "user", "content": "Reverse 'abc'."}]]
    records = corpus.answer(model, tokenizer, chats, max_new_tokens=5, batch_size=1)
    enc = encode_chat(tokenizer, chats)
    out = FastGenerator(full=model, compile=False).generate(enc["input_ids"], enc["attention_mask"], method="full",
                                                            max_new_tokens=5)
    for record, row, reason in zip(records, out.new_tokens.tolist(), out.finish_reasons):
        assert record["messages"][-1] == {"role": "assistant",
                                          "content": tokenizer.decode(row, skip_special_tokens=True).strip()}
        assert record["ended"] == (reason == "eos")


def test_distilled_data_keeps_finished_answers_records_how_and_resumes(tmp_path, tokenizer, monkeypatch):
    model = tiny_model("llama", tied=True, vocab_size=len(tokenizer)).eval()
    calls = []

    def fake_answer(model, tokenizer, conversations, **kw):  # every third answer runs out of tokens
        calls.append(len(conversations))
        return [{"messages": [*c, {"role": "assistant", "content": f"answer {i}"}], "ended": i % 3 != 2,
                 "new_tokens": 3, "seconds": 0.5} for i, c in enumerate(conversations)]

    monkeypatch.setattr(corpus, "answer", fake_answer)
    sizes = {"train": (6, 3), "validation": (2, 1), "test": (3, 0)}
    out = corpus.build_distilled_data(model, tokenizer, tmp_path / "d", sizes=sizes, max_new_tokens=8)
    record = json.loads((out / "record.json").read_text())
    for split, (n_passage, n_family) in sizes.items():
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        asked = n_passage + n_family
        assert len(rows) == record["splits"][split]["kept"] == asked - asked // 3
        assert record["splits"][split]["dropped_unfinished"] == asked // 3
        assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user" for r in rows)
    assert record["model_fingerprint"] and record["decoding"]["max_new_tokens"] == 8
    assert record["corpus"]["heldout"]["fingerprint"] == corpus.fingerprint("heldout")
    assert record["splits"]["test"]["request"]["text"] == corpus.fingerprint_of_split("test")
    assert record["stdlib_corpus"]["splits"]["test"]["fingerprint"] == corpus.fingerprint_of_split("test")["stdlib"]
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    corpus.build_distilled_data(model, tokenizer, out, sizes={**sizes, "test": (2, 0)}, max_new_tokens=8)
    assert calls[3:] == [2] and (out / "train.jsonl").stat().st_mtime_ns == stamp  # only the changed split reran


def _small_prompts(split, n_passage, n_family, seed=0, max_chars=1200):
    """Short prompts of several lengths, so the tiny model answers them in a blink."""
    return [{"kind": "summarize" if i < n_passage else "family:add", "source": "help", "topic": f"{split}-{i}",
             "messages": [{"role": "user", "content": f"Name a fox of {split}, number {i}." + " Now." * (i % 4)}]}
            for i in range(n_passage + n_family)]


def _ending_model(tokenizer):
    """A tiny model (untied: the tied one repeats one token) that ends some answers within a few tokens and not
    others: every sixth token id is an eos."""
    model = tiny_model("llama", vocab_size=len(tokenizer)).eval()
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *range(3, len(tokenizer), 6)]
    return model


def _files(out):
    return {p.name: p.read_text() for p in sorted(out.iterdir()) if p.name != "record.json"}


def test_distilled_data_resumes_an_interrupted_split_to_the_same_file(tmp_path, tokenizer, monkeypatch):
    """Killed after two batches of train (simulated by raising), a rerun answers only the batches left and writes
    the same files as an uninterrupted run; the partial file is gone when the split is written."""
    monkeypatch.setattr(corpus, "distill_prompts", _small_prompts)
    model = _ending_model(tokenizer)
    kw = dict(sizes={"train": (7, 2), "validation": (2, 1), "test": (3, 1)}, max_new_tokens=6, batch_size=2,
              compile=False)
    whole = corpus.build_distilled_data(model, tokenizer, tmp_path / "whole", **kw)
    record = json.loads((whole / "record.json").read_text())
    assert 0 < record["splits"]["train"]["kept"] < 9 and record["splits"]["train"]["generation"]["resumed_answers"] == 0

    real, calls = FastGenerator.generate, []

    def dies_after_two(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        if len(calls) > 2:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FastGenerator, "generate", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        corpus.build_distilled_data(model, tokenizer, tmp_path / "cut", **kw)
    partial = tmp_path / "cut" / "train.partial.jsonl"
    lines = partial.read_text().splitlines()
    assert len(lines) == 4 and not (tmp_path / "cut" / "train.jsonl").exists()
    with partial.open("a") as f:  # a kill mid-write leaves half a line
        f.write(lines[0][: len(lines[0]) // 2])
    calls.clear()
    monkeypatch.setattr(FastGenerator, "generate", lambda self, *a, **k: (calls.append(a[0].shape[0]), real(self, *a, **k))[1])
    corpus.build_distilled_data(model, tokenizer, tmp_path / "cut", **kw)
    assert sum(calls) == 9 - 4 + 3 + 4  # train's last five, then validation and test
    assert _files(tmp_path / "cut") == _files(whole) and not partial.exists()
    resumed = json.loads((tmp_path / "cut" / "record.json").read_text())
    assert resumed["splits"]["train"]["generation"]["resumed_answers"] == 4
    strip = lambda s: {k: v for k, v in s.items() if k != "generation"}  # noqa: E731
    assert all(strip(resumed["splits"][s]) == strip(record["splits"][s]) for s in corpus.DATA_SPLITS)


def test_a_split_made_again_reuses_the_answers_to_prompts_asked_again(tmp_path, tokenizer, monkeypatch):
    """After the prompts change (here: every third reworded), a rebuild asks only the prompts not answered before
    (the changed ones and those dropped unfinished) and writes what a build from nothing writes."""
    model = _ending_model(tokenizer)
    kw = dict(sizes={"train": (9, 3), "validation": (1, 0), "test": (1, 0)}, max_new_tokens=6, batch_size=2,
              compile=False)
    monkeypatch.setattr(corpus, "distill_prompts", _small_prompts)
    first = corpus.build_distilled_data(model, tokenizer, tmp_path / "d", **kw)
    kept = {json.dumps(json.loads(line)["messages"][:-1]) for line in (first / "train.jsonl").read_text().splitlines()}

    def reworded(split, n_passage, n_family, seed=0, max_chars=1200):
        prompts = _small_prompts(split, n_passage, n_family, seed, max_chars)
        for p in prompts[::3] if split == "train" else []:
            p["messages"] = [{"role": "user", "content": p["messages"][0]["content"] + " Again."}]
        return prompts

    monkeypatch.setattr(corpus, "distill_prompts", reworded)
    new = reworded("train", 9, 3)
    expected = [i for i, p in enumerate(new) if json.dumps(p["messages"]) not in kept]
    assert 0 < len(expected) < len(new)
    real, asked = FastGenerator.generate, []
    monkeypatch.setattr(FastGenerator, "generate", lambda self, *a, **k: (asked.append(a[0].shape[0]), real(self, *a, **k))[1])
    again = corpus.build_distilled_data(model, tokenizer, first, **kw)
    assert sum(asked) == len(expected)  # validation and test are unchanged and kept
    generation = json.loads((again / "record.json").read_text())["splits"]["train"]["generation"]
    assert generation["reused_answers"] == len(new) - len(expected) and generation["resumed_answers"] == 0
    fresh = corpus.build_distilled_data(model, tokenizer, tmp_path / "fresh", **kw)
    assert (again / "train.jsonl").read_text() == (fresh / "train.jsonl").read_text()
    made = json.loads((again / "record.json").read_text())["splits"]["train"]
    assert made["answer_tokens"]["counted"] == len(expected)  # token counts over the answers this build made
    assert made["answer_tokens"]["mean"] == round(made["generation"]["new_tokens"] / len(expected), 1)


def test_a_partial_file_of_another_request_is_discarded(tmp_path, tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(corpus, "distill_prompts", _small_prompts)
    model = _ending_model(tokenizer)
    out = tmp_path / "d"
    out.mkdir()
    foreign = {"fingerprint": "0123456789abcdef", "index": 0, "ended": True, "new_tokens": 1, "seconds": 0.1,
               "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "FOREIGN"}]}
    for split in corpus.DATA_SPLITS:
        (out / f"{split}.partial.jsonl").write_text(json.dumps(foreign) + "\n")
    with caplog.at_level("WARNING", logger="overfill_lib.corpus"):
        corpus.build_distilled_data(model, tokenizer, out, sizes={"train": (3, 1), "validation": (1, 0),
                                    "test": (2, 0)}, max_new_tokens=6, batch_size=2, compile=False)
    assert sum("another request" in r.message for r in caplog.records) == 3
    assert not list(out.glob("*.partial.jsonl")) and "FOREIGN" not in "".join(_files(out).values())
    record = json.loads((out / "record.json").read_text())
    assert all(record["splits"][s]["generation"]["resumed_answers"] == 0 for s in corpus.DATA_SPLITS)


def test_fidelity_of_a_model_on_its_own_greedy_answers(tokenizer):
    """Scored on its own greedy answers, a model agrees everywhere and reproduces every answer; a different
    decoder does not; alone and as an identity pair the numbers are the same."""
    from overfill_lib import pruning, scoring
    from overfill_lib.pair import OverFillModel

    model = tiny_model("llama", tied=True, vocab_size=len(tokenizer)).eval()
    other = copy.deepcopy(model)
    other.model.norm.weight.data.neg_()  # every logit flips sign: its greedy choice is the model's least likely token
    chats = [[{"role": "user", "content": "Name a fox."}], [{"role": "user", "content": "Reverse 'abcdef' now."}]]
    enc = encode_chat(tokenizer, chats)
    eos = tokenizer.eos_token_id
    out = FastGenerator(full=model, compile=False).generate(enc["input_ids"], enc["attention_mask"], method="full",
                                                            max_new_tokens=6, eos_token_id=None)
    # Records whose answers are the greedy tokens, then the end-of-turn token the encoding appends.
    records = [{"messages": [*c, {"role": "assistant", "content": tokenizer.decode(row)}]}
               for c, row in zip(chats, out.new_tokens.tolist()) if eos not in row]
    contexts, answers = scoring.split_records(tokenizer, records)
    assert all(a[:-1] == row for a, row in zip(answers, out.new_tokens.tolist())) and all(a[-1] == eos for a in answers)
    alone = scoring.answer_fidelity(model, tokenizer, records, batch_size=1)
    # Every generated position agrees; the appended end-of-turn token was not the model's choice.
    assert alone["agreement"] == pytest.approx(6 / 7) and alone["exact"] == 0.0
    assert scoring.answer_fidelity(OverFillModel(model, model), tokenizer, records) == pytest.approx(alone)
    assert alone["nll"] == pytest.approx(pruning.reply_loss(model, tokenizer, records), rel=1e-5)
    stranger = scoring.answer_fidelity(other, tokenizer, records)
    assert stranger["nll"] > alone["nll"] and stranger["agreement"] < 1 / 7
    windows = [tokenizer(t)["input_ids"][:12] for t in ("The quick brown fox jumps over it all.", "A decoder reads the cache.")]
    ppl = scoring.split_perplexity(model, windows, prefix=4)
    assert ppl == pytest.approx(scoring.split_perplexity(OverFillModel(model, model), windows, prefix=4), rel=1e-5)
    assert scoring.split_perplexity(OverFillModel(model, other), windows, prefix=4) != pytest.approx(ppl)


def test_the_committed_smollm2_data_is_what_its_preset_asks_for():
    """Every split in data/distill-smollm2-135m was made for the request the preset and this code make now, so
    `make run PRESET=smollm2-135m` reuses it instead of spending CPU-hours making it again (the model's own
    fingerprint needs the converted model; the GGUF file it came from is checked by digest).

    The standard library's text and the prompts drawn from it are compared where this Python is the one the data
    was made under (its docstrings are the corpus); under another Python those two fields are left out, and the
    check covers counts, seed, decoding, instructions and the help topics."""
    preset = load_preset("smollm2-135m")
    section = preset.distill
    data = preset.path(section.dir)
    record = json.loads((data / "record.json").read_text())
    assert record["model_source"]["gguf_sha256"] == preset.full_model.gguf.sha256
    same_python = stdlib_corpus.record()["python"] == record["stdlib_corpus"]["python"]
    for split in corpus.DATA_SPLITS:
        size = tuple(getattr(section, split))
        prompts = corpus.distill_prompts(split, *size, section.seed)
        asked = corpus.split_request(split, size, prompts, record["model_fingerprint"], seed=section.seed,
                                     max_new_tokens=section.max_new_tokens)
        made = record["splits"][split]
        if not same_python:
            asked = {**asked, "text": {**asked["text"], "stdlib": made["request"]["text"]["stdlib"]},
                     "prompts": made["request"]["prompts"]}
        assert made["request"] == asked, f"{split}: {[k for k in asked if made['request'].get(k) != asked[k]]} differ"
        lines = (data / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == made["kept"] and made["prompts"] == len(prompts)


def test_the_stdlib_rendering_is_the_same_in_another_process():
    import subprocess
    import sys

    code = ("import importlib, json; from overfill_lib.stdlib_corpus import render_module; "
            "print(json.dumps([render_module(importlib.import_module(m)) for m in ('difflib', 'platform', 'cgi')]))")
    # Two processes with different environments, as two machines (or two shells) have.
    runs = [subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True,
                           env={"PATH": "/usr/bin:/bin", "RUN_MARKER": f"run-{i}", "PYTHONHASHSEED": str(i)}).stdout
            for i in range(2)]
    assert runs[0] == runs[1]
    assert "run-0" not in runs[0] and " at 0x" not in runs[0] and sys.executable not in runs[0]
    assert "environ=os.environ" in runs[0] and "<function IS_CHARACTER_JUNK>" in runs[0]  # defaults still shown


def test_a_default_is_shown_the_same_in_every_process():
    import os
    import sys

    from overfill_lib.stdlib_corpus import default_text

    assert default_text(frozenset({"b", "a", "c"})) == "frozenset({'a', 'b', 'c'})" and default_text(set()) == "set()"
    assert default_text(object()) == "<object object>" and default_text(os.environ) == "os.environ"
    assert default_text((sys.executable, 1)) == "('<sys.executable>', 1)" and default_text(("x",)) == "('x',)"
    assert default_text({"k": [None, 2.5, b"x"]}) == repr({"k": [None, 2.5, b"x"]})
