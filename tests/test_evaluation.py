"""Evaluation through lm-eval: the ``overfill`` model against lm-eval's ``hf`` model, an upstream task
format on a local file, the synthetic-suite tasks against the project's own scorer, result tables.

Models: tiny random-weight char-level Llamas (the project's tokenizer) saved to a temporary folder,
and the smoke preset's full model. Everything runs offline on CPU in well under a minute.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from overfill_lib import evaluation, tasks
from overfill_lib.evaluation import OverFillLM
from overfill_lib.full_model import build_tokenizer
from overfill_lib.scoring import greedy_answers
from tests.tiny_models import tiny_model

torch.set_num_threads(1)
FIXTURES = Path(__file__).parent / "fixtures"
MAX_LENGTH = 48  # small, so the left-truncation path is exercised


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def _save(model, tok, path: Path) -> Path:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A full model and a narrower decoder with the same layers / KV heads / head_dim (shared_kv pairs)."""
    tok = build_tokenizer()
    special = dict(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, max_position_embeddings=4096,
    )
    root = tmp_path_factory.mktemp("eval_models")
    full = tiny_model("llama", **special)
    decoder = tiny_model("llama", hidden_size=32, intermediate_size=48, seed=1, **special)
    return {"tok": tok, "full": full, "full_dir": _save(full, tok, root / "full"),
            "decoder_dir": _save(decoder, tok, root / "decoder")}


def _requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _hf(models, batch_size=2):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=models["full"], tokenizer=models["tok"], batch_size=batch_size, max_length=MAX_LENGTH)


def _assert_close(ours, theirs):
    assert len(ours) == len(theirs)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, theirs):
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy


# --------------------------------------------------------------------------------------------------
# The lm-eval model against lm-eval's hf model
# --------------------------------------------------------------------------------------------------


def test_identity_pair_equals_lm_eval_hf_model(models):
    hf = _hf(models)
    # Two loaded copies of one model, paired through shared_kv: the real two-stage code path.
    pair = OverFillLM(full=str(models["full_dir"]), decoder=str(models["full_dir"]), batch_size=3,
                      max_length=MAX_LENGTH, device="cpu")
    assert pair.role == "overfill" and pair.pair.full is not pair.pair.decoder
    alone = OverFillLM(full=str(models["full_dir"]), batch_size=4, max_length=MAX_LENGTH, device="cpu")
    assert alone.role == "full" and alone.pair.full is alone.pair.decoder

    # A continuation the model itself prefers, so is_greedy is True at least once.
    prompt = "Q: count to three\nA:"
    (greedy_text,) = hf.generate_until(_requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 6})]))
    assert greedy_text
    chat = pair.apply_chat_template([{"role": "system", "content": "add"}, {"role": "user", "content": "12+34"}])
    assert chat == hf.apply_chat_template([{"role": "system", "content": "add"}, {"role": "user", "content": "12+34"}])
    ll = _requests("loglikelihood", [
        ("", "hello"),  # empty context: the prefix (BOS) token stands in
        ("The cat ", "sat on"),  # trailing space moves into the continuation
        ("abc", "d"), ("abc", "e"),  # one context, several single-token continuations
        ("x" * 80, "yz w"),  # longer than max_length: left-truncated like hf
        (chat, "46"),
        (prompt, greedy_text),
    ])
    reference = hf.loglikelihood(ll)
    _assert_close(pair.loglikelihood(ll), reference)
    _assert_close(alone.loglikelihood(ll), reference)
    assert reference[-1][1] and not all(g for _, g in reference)
    # After a closing line break (chat templates end with one), hf scores the line break too; the pair leaves it
    # in the prompt (the full model reads it, as in generation), so the two differ by exactly its log-prob.
    (with_break, _), (line_break, _) = hf.loglikelihood(_requests("loglikelihood", [("Q: 1+1\n", "2"), ("Q: 1+1", "\n")]))
    for lm in (pair, alone):
        (ours, _), = lm.loglikelihood(_requests("loglikelihood", [("Q: 1+1\n", "2")]))
        assert ours == pytest.approx(with_break - line_break, abs=1e-4) and line_break < -1e-3

    rolling = _requests("loglikelihood_rolling", [("short text",), ("a longer text that needs several windows " * 3,)])
    for ours, theirs in zip(pair.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling)):
        assert ours == pytest.approx(theirs, abs=1e-4)

    # Greedy generation, with stop strings taken from the unstopped outputs so that they do fire.
    contexts = ["hello", "The answer is", "zz", chat]
    free = hf.generate_until(_requests("generate_until", [(c, {"until": [], "max_gen_toks": 12}) for c in contexts]))
    stops = [text[len(text) // 2] for text in free]
    gen = _requests("generate_until", [(c, {"until": [s], "max_gen_toks": 12, "do_sample": False}) for c, s in zip(contexts, stops)]
                    + [(c, {"until": ["\n"], "max_gen_toks": 7, "temperature": 0.0}) for c in contexts])
    expected = hf.generate_until(gen)
    assert pair.generate_until(gen) == expected
    assert alone.generate_until(gen) == expected
    assert any(len(e) < len(f) for e, f in zip(expected, free))  # the stop strings cut something


def test_pair_scores_first_token_with_full_model_and_rest_with_decoder(models):
    hf = _hf(models)
    pair = OverFillLM(full=str(models["full_dir"]), decoder=str(models["decoder_dir"]), batch_size=4,
                      max_length=MAX_LENGTH, device="cpu")
    assert pair.role == "overfill" and pair.pair.strategy_name == "shared_kv"
    single = _requests("loglikelihood", [("abc", "d"), ("hello wor", "l")])
    _assert_close(pair.loglikelihood(single), hf.loglikelihood(single))
    multi = _requests("loglikelihood", [("abc", "defg"), ("hello", " world")])
    for (lp, _), (ref, _) in zip(pair.loglikelihood(multi), hf.loglikelihood(multi)):
        assert abs(lp - ref) > 1e-3  # the decoder scored tokens 2..n
    gen = _requests("generate_until", [(c, {"until": [], "max_gen_toks": 8}) for c in ("hello", "The answer is")])
    for ours, full_alone in zip(pair.generate_until(gen), hf.generate_until(gen)):
        assert ours[0] == full_alone[0] and ours != full_alone  # first token: full model; the rest: decoder
    refreshed = OverFillLM(pretrained=pair.pair, batch_size=4, max_length=MAX_LENGTH, refresh_every=2)
    assert refreshed.role == "overfill" and refreshed.refresh_every == 2
    for ours, full_alone in zip(refreshed.generate_until(gen), hf.generate_until(gen)):
        assert ours[0] == full_alone[0]
    info = pair.get_model_info()["overfill"]
    assert info["decoder_parameters"] < info["full_parameters"] and info["role"] == "overfill"


def test_generation_kwargs_eos_token_id_follows_the_one_rule(models):
    """A task's eos_token_id means what it means in pair.generate and FastGenerator (generation.eos_ids): None never
    stops, as in lm-eval's hf model; 'default' (or none given) is the model's own eos; a string id is refused."""
    alone = OverFillLM(full=str(models["full_dir"]), batch_size=2, max_length=MAX_LENGTH, device="cpu")
    hf = _hf(models)

    def run(lm, **gen_kwargs):
        args = [(c, {"until": [], "max_gen_toks": 8, **gen_kwargs}) for c in ("hello", "The answer is")]
        return lm.generate_until(_requests("generate_until", args))

    free = run(alone, eos_token_id=None)
    assert free == run(hf, eos_token_id=None) == run(alone, eos_token_id=[])
    (eos,) = models["tok"](free[0][3], add_special_tokens=False)["input_ids"]  # a token the model does emit
    stopped = run(hf, eos_token_id=eos)
    assert run(alone, eos_token_id=eos) == stopped and len(stopped[0]) < len(free[0])
    alone.pair.full.generation_config.eos_token_id = eos  # now the model's own
    assert run(alone) == run(alone, eos_token_id="default") == stopped
    with pytest.raises(ValueError, match=r"eos_token_id='60' is a string \(the id 60\?\)"):
        run(alone, eos_token_id="60")


def test_model_arguments_are_validated_before_loading():
    cases = [
        ({}, "nothing to evaluate"),
        ({"pretrained": "a", "full": "b"}, "not both"),
        ({"full": "x", "batch_size": "auto"}, "batch_size=16"),
        ({"full": "x", "batch_size": 0}, "positive integer"),
        ({"full": "x", "parallelize": True}, "unknown overfill model argument"),
        ({"full": "x", "trust_remote_code": True}, "trust_remote_code"),
        ({"full": "x", "refresh_every": -1}, "refresh_every"),
        ({"full": "x", "dtype": "float13"}, "unknown dtype"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            OverFillLM(**kwargs)


# --------------------------------------------------------------------------------------------------
# An upstream task format on a local file
# --------------------------------------------------------------------------------------------------


def test_gsm8k_cot_llama_format_end_to_end_on_a_local_file(models, tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "gsm8k_local.jsonl").read_text().splitlines()]
    yaml_path = evaluation.local_task("gsm8k_cot_llama", FIXTURES / "gsm8k_local.jsonl", tmp_path / "tasks")
    out = tmp_path / "out" / "gsm8k.json"
    res = evaluation.evaluate(
        {"full": str(models["full_dir"]), "decoder": str(models["decoder_dir"]), "max_length": 4096},
        ["gsm8k_cot_llama_local"], include_path=yaml_path.parent, limit=3, batch_size=3, device="cpu",
        gen_kwargs={"max_gen_toks": 24}, log_samples=True, output_path=out,
    )
    task = res["results"]["gsm8k_cot_llama_local"]
    for filt in ("strict-match", "flexible-extract"):  # the upstream filter pipelines ran
        assert 0.0 <= task[f"exact_match,{filt}"] <= 1.0
    assert res["n-shot"]["gsm8k_cot_llama_local"] == 8
    assert res["config"]["overfill"]["role"] == "overfill"
    samples = res["samples"]["gsm8k_cot_llama_local"]  # one per document and filter
    assert sorted((s["doc_id"], s["filter"]) for s in samples) == [
        (i, f) for i in range(3) for f in ("flexible-extract", "strict-match")]
    for sample in samples:
        record = records[sample["doc_id"]]
        prompt, gen_kwargs = sample["arguments"][0]
        # The upstream prompt and 8 few-shot turns in the char model's chat template, the doc's question last.
        assert prompt.startswith("<s><|user|>Given the following problem") and prompt.endswith("<|assistant|>")
        assert prompt.count("<|user|>") == 9 and record["question"] in prompt.rsplit("<|user|>", 1)[1]
        assert "Q:" in gen_kwargs["until"] and gen_kwargs["max_gen_toks"] == 24
        assert sample["target"] == record["answer"].split("####")[-1].strip()
        assert len(sample["filtered_resps"]) == 1  # regex + take_first applied to the generation
    # lm-eval's output format, written atomically, and the per-task samples beside it.
    written = json.loads(out.read_text())
    assert written["results"]["gsm8k_cot_llama_local"]["alias"] == "gsm8k_cot_llama_local"
    assert {"configs", "versions", "n-shot", "n-samples", "config", "task_hashes"} <= set(written)
    assert written["task_hashes"]["gsm8k_cot_llama_local"]
    lines = (out.parent / "gsm8k_samples_gsm8k_cot_llama_local.jsonl").read_text().splitlines()
    assert len(lines) == len(samples)
    assert not list(out.parent.glob(".*tmp"))


def test_local_task_errors_name_the_fix(tmp_path):
    import lm_eval.tasks

    upstream = Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k-cot-llama.yaml"  # no search needed
    with pytest.raises(ValueError, match="not found"):
        evaluation.local_task(upstream, tmp_path / "missing.jsonl", tmp_path)
    with pytest.raises(ValueError, match="data_files=\\{'test'"):
        evaluation.local_task(upstream, {"train": FIXTURES / "gsm8k_local.jsonl"}, tmp_path)
    with pytest.raises(ValueError, match="no task file"):
        evaluation.local_task(tmp_path / "missing.yaml", FIXTURES / "gsm8k_local.jsonl", tmp_path)


# --------------------------------------------------------------------------------------------------
# The synthetic suite as lm-eval tasks
# --------------------------------------------------------------------------------------------------


def _lm_eval_predictions(res: dict) -> dict[str, list[str]]:
    return {task.rsplit("_", 1)[1]: [s["resps"][0][0] for s in sorted(rows, key=lambda s: s["doc_id"])]
            for task, rows in res["samples"].items()}


def _assert_same_scores(res: dict, expected: dict):
    for family, value in expected.items():
        if family != "overall":
            assert res["results"][f"overfill_suite_{family}"]["exact_match,none"] == pytest.approx(value, abs=1e-12)
    assert res["groups"]["overfill_suite"]["exact_match,none"] == pytest.approx(expected["overall"], abs=1e-12)


@pytest.fixture(scope="module")
def full_model_run(tmp_path_factory):
    from overfill_lib.artifacts import load_model
    from overfill_lib.pipeline import full_model
    from overfill_lib.presets import load_preset

    preset = load_preset("smoke")
    full_dir, _ = full_model(preset)  # reused when present (trains in seconds otherwise)
    out = tmp_path_factory.mktemp("suite_run") / "full_model.json"
    res = evaluation.evaluate({"full": str(full_dir)}, ["overfill_suite"], suite_dir=preset.suite_dir,
                              limit=20, batch_size=16, device="cpu", log_samples=True, output_path=out)
    model, tok = load_model(full_dir)
    records = tasks.first_per_family(tasks.load_split(preset.suite_dir, "test"), 20)
    return {"res": res, "path": out, "records": records, "answers": greedy_answers(model, tok, records),
            "full_dir": full_dir, "suite_dir": preset.suite_dir}


def test_suite_tasks_match_the_project_scorer_on_the_smoke_full_model(full_model_run):
    res, records, answers = full_model_run["res"], full_model_run["records"], full_model_run["answers"]
    _assert_same_scores(res, tasks.score(records, answers))
    # Same prompts, same greedy answers, record by record.
    ours = _lm_eval_predictions(res)
    for family in tasks.SuiteConfig().families:
        expected = [a for r, a in zip(records, answers) if r["family"] == family]
        assert ours[family] == expected
    sample = res["samples"]["overfill_suite_reverse"][0]
    record = next(r for r in records if r["family"] == "reverse")
    assert sample["arguments"][0][0] == f"<s><|system|>reverse<|end|><|user|>{record['messages'][1]['content']}<|end|><|assistant|>"


def test_suite_tasks_match_the_project_scorer_with_nontrivial_scores(models, tmp_path):
    """A random model's own greedy answers made the reference for two records in three, with families of
    unequal size: lm-eval must reproduce per-family and size-weighted overall exact match exactly."""
    from overfill_lib.tasks import SuiteConfig, generate_suite

    splits = generate_suite(SuiteConfig(seed=3, n_train=1, n_validation=10, n_test=40))
    rng = random.Random(0)
    test = [r for r in splits["test"] if not (r["family"] in ("sort", "count") and rng.random() < 0.5)]
    tok, model = models["tok"], models["full"]
    predictions = greedy_answers(model, tok, test)
    for i, (record, pred) in enumerate(zip(test, predictions)):
        record["messages"][-1]["content"] = f" {pred} " if i % 3 else pred + "x"  # strip-insensitive match
    suite = tmp_path / "suite"
    suite.mkdir()
    for split, rows in (("test", test), ("validation", splits["validation"])):
        (suite / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = tasks.score(test, predictions)
    assert 0.3 < expected["overall"] < 0.9
    res = evaluation.evaluate({"full": str(models["full_dir"])}, "overfill_suite", suite_dir=suite,
                              batch_size=8, device="cpu", log_samples=True)
    _assert_same_scores(res, expected)
    sizes = {f: sum(r["family"] == f for r in test) for f in tasks.SuiteConfig().families}
    assert res["n-samples"]["overfill_suite_sort"]["effective"] == sizes["sort"] != sizes["reverse"]


def test_opt_in_mul_task_matches_the_project_scorer(models, tmp_path):
    """``overfill_suite_mul`` (outside the group, for suites that opt into ``mul``) scores like ``tasks.score``."""
    from overfill_lib.tasks import SuiteConfig, generate_suite

    splits = generate_suite(SuiteConfig(families=("reverse", "mul"), seed=1, n_train=1, n_validation=4, n_test=12))
    test = [r for r in splits["test"] if r["family"] == "mul"]
    predictions = greedy_answers(models["full"], models["tok"], test)
    for i, (record, pred) in enumerate(zip(test, predictions)):
        record["messages"][-1]["content"] = pred if i % 2 else pred + "x"
    suite = tmp_path / "suite"
    suite.mkdir()
    for split, rows in (("test", splits["test"]), ("validation", splits["validation"])):
        rows = test + [r for r in rows if r["family"] != "mul"] if split == "test" else rows
        (suite / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluation.evaluate({"full": str(models["full_dir"])}, "overfill_suite_mul", suite_dir=suite,
                              batch_size=8, device="cpu")
    assert res["n-samples"]["overfill_suite_mul"]["effective"] == len(test) == 6
    assert res["results"]["overfill_suite_mul"]["exact_match,none"] == pytest.approx(tasks.score(test, predictions)["overall"])
    assert 0 < tasks.score(test, predictions)["overall"] < 1


def test_suite_dir_resolution(tmp_path, monkeypatch):
    suite = tmp_path / "s"
    suite.mkdir()
    (suite / "test.jsonl").write_text("")
    monkeypatch.chdir(tmp_path.parent)  # any cwd
    monkeypatch.setenv(evaluation.SUITE_ENV, str(suite))
    assert evaluation.resolve_suite_dir() == suite.resolve()
    # Relative paths are taken from the project root, not from the cwd.
    with pytest.raises(ValueError, match=re.escape(str(evaluation.PROJECT_ROOT / "no/such/suite"))):
        evaluation.resolve_suite_dir("no/such/suite")
    with pytest.raises(ValueError, match="write_suite"):
        evaluation.resolve_suite_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no synthetic suite"):
        evaluation.resolve_suite_dir(preset="llama-3.2-3b")


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    """A tiny BPE-tokenized chat model, a narrower decoder with the same layout, and held-out answers: half the
    model's own greedy answers (at least one reproduced exactly, so ``exact`` is not trivially 0), half other text."""
    from overfill_lib.fast_decode import FastGenerator
    from overfill_lib.generation import encode_chat
    from tests.gguf_files import bpe_tokenizer

    tok = bpe_tokenizer()
    root = tmp_path_factory.mktemp("chat_models")
    special = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    full = tiny_model("llama", **special)
    decoder = tiny_model("llama", hidden_size=32, intermediate_size=48, seed=1, **special)
    chats = [[{"role": "user", "content": f"Name a fox {i}."}] for i in range(6)]
    chats[1] = [{"role": "system", "content": "Be brief."}, *chats[1]]
    enc = encode_chat(tok, chats)
    # Swap the output rows of the end-of-turn token and the first prompt's greedy first token: that prompt's greedy
    # answer is then empty (just the end-of-turn token), which its record reproduces exactly.
    with torch.no_grad():
        first = int(full(**enc).logits[0, -1].argmax())
        rows = torch.tensor([first, tok.eos_token_id])
        full.lm_head.weight[rows] = full.lm_head.weight[rows.flip(0)].clone()
    out = FastGenerator(full=full, compile=False).generate(enc["input_ids"], enc["attention_mask"], method="full",
                                                           max_new_tokens=5, eos_token_id=tok.eos_token_id)
    greedy = [tok.decode([t for t in row if t != tok.eos_token_id]) for row in out.new_tokens.tolist()]
    answers = [g if i % 2 == 0 else "The quick brown fox." for i, g in enumerate(greedy)]
    records = [{"messages": [*c, {"role": "assistant", "content": a}]} for c, a in zip(chats, answers)]
    data = root / "data"
    data.mkdir()
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"tok": tok, "full": full, "decoder": decoder, "records": records, "data_dir": data,
            "full_dir": _save(full, tok, root / "full"), "decoder_dir": _save(decoder, tok, root / "decoder")}


@pytest.mark.parametrize("role", ["identity", "pair"])
def test_chat_task_over_local_files_matches_the_project_fidelity(chat_models, role):
    """``overfill_chat`` (lm-eval, local test.jsonl, chat template) gives ``scoring.answer_fidelity``'s per-token
    NLL and exact-reproduction rate, for a model alone (the identity pair) and for a real pair."""
    from overfill_lib import scoring
    from overfill_lib.pair import OverFillModel

    m = chat_models
    args = {"full": str(m["full_dir"])} | ({"decoder": str(m["decoder_dir"])} if role == "pair" else {})
    lm = OverFillLM(**args, batch_size=4, device="cpu", dtype="float32")
    found = evaluation.evaluate(lm, [evaluation.CHAT_TASK], metadata={"data_dir": str(m["data_dir"])})
    scores = found["results"][evaluation.CHAT_TASK]
    model = m["full"] if role == "identity" else OverFillModel(m["full"], m["decoder"])
    ours = scoring.answer_fidelity(model, m["tok"], m["records"], batch_size=2)
    assert scores["nll,none"] == pytest.approx(ours["nll"], rel=1e-4)
    assert scores["exact,none"] == pytest.approx(ours["exact"])
    if role == "identity":
        assert 0 < ours["exact"] < 1  # the greedy answers are reproduced, the others are not


def test_chat_task_errors_name_the_fix(chat_models, tmp_path):
    with pytest.raises(ValueError, match="data_dir=DIR"):
        evaluation.resolve_chat_dir()
    with pytest.raises(ValueError, match="overfill_lib.pipeline distill"):
        evaluation.resolve_chat_dir(tmp_path)
    with pytest.raises(ValueError, match="pretrained= or full="):
        evaluation.load_chat_dataset(str(chat_models["data_dir"]))
    (tmp_path / "test.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="single-turn"):
        evaluation.load_chat_dataset(str(tmp_path), tokenizer=str(chat_models["full_dir"]))


# --------------------------------------------------------------------------------------------------
# Tables, plot, command line
# --------------------------------------------------------------------------------------------------


def test_results_table_compare_and_plot(full_model_run):
    from overfill_lib.plots import bar_eval_results

    runs = {"full model (dict)": full_model_run["res"], "full model (file)": full_model_run["path"]}
    table = evaluation.results_table(runs)
    assert list(table.columns) == evaluation.TABLE_COLUMNS
    assert set(table["run"]) == set(runs)
    assert set(table["task"]) == {"overfill_suite", *(f"overfill_suite_{f}" for f in tasks.SuiteConfig().families)}
    assert table.loc[table["task"] == "overfill_suite", "is_group"].all()
    wide = evaluation.compare_runs(table, metric="exact_match")
    assert list(wide.columns) == list(runs)
    assert (wide["full model (dict)"] == wide["full model (file)"]).all()  # the JSON file holds the same numbers
    counts = table[table["run"] == "full model (dict)"].set_index("task")["samples"]
    assert counts["overfill_suite_add"] == len([r for r in full_model_run["records"] if r["family"] == "add"])
    assert all(math.isfinite(v) for v in table["value"])
    fig = bar_eval_results(table, "exact match", metric="exact_match")
    assert [t.name for t in fig.data] == list(runs)
    assert len(fig.data[0].x) == len(wide)


def test_command_line_registers_the_model_and_adds_our_tasks():
    from lm_eval.api.registry import get_model

    from overfill_lib.evaluation import with_our_tasks

    assert get_model("overfill") is OverFillLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models still resolve
    ours = str(evaluation.LM_TASKS_DIR)
    assert with_our_tasks(["--model", "overfill", "--tasks", "x"])[-2:] == ["--include_path", ours]
    assert with_our_tasks(["run", "--tasks", "x"])[-1] == ours
    assert with_our_tasks(["ls", "tasks"])[-1] == ours
    assert with_our_tasks(["run", "--include_path", "/mine", "--tasks", "x"]) == ["run", "--include_path", "/mine", "--tasks", "x"]


def test_command_line_end_to_end(full_model_run, tmp_path, monkeypatch):
    """`python -m overfill_lib.evaluation` is lm-eval's CLI: the overfill model, our tasks, its output files."""
    import lm_eval.tasks

    from overfill_lib.evaluation import main

    class OursOnly(lm_eval.tasks.TaskManager):  # skip indexing lm-eval's thousands of built-in task files
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OursOnly)
    main(["--model", "overfill", "--model_args", f"full={full_model_run['full_dir']}", "--tasks", "overfill_suite_count",
          "--metadata", f"suite_dir={full_model_run['suite_dir']}", "--apply_chat_template", "--limit", "3",
          "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path)])
    (path,) = tmp_path.rglob("results_*.json")
    written = json.loads(path.read_text())
    count = [r for r in full_model_run["records"] if r["family"] == "count"][:3]
    answers = [a for r, a in zip(full_model_run["records"], full_model_run["answers"]) if r["family"] == "count"][:3]
    assert written["results"]["overfill_suite_count"]["exact_match,none"] == tasks.score(count, answers)["overall"]
    assert written["config"]["model"] == "overfill" and written["config"]["overfill"]["role"] == "full"
