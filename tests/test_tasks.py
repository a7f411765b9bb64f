import pytest

from overfill_lib import tasks

CFG = tasks.SuiteConfig(n_train=300, n_validation=50, n_test=60)


def test_deterministic_from_seed():
    assert tasks.generate_suite(CFG) == tasks.generate_suite(CFG)
    other = tasks.generate_suite(tasks.SuiteConfig(seed=1, n_train=300, n_validation=50, n_test=60))
    assert other["test"] != tasks.generate_suite(CFG)["test"]


def test_held_out_prompts_never_in_train():
    s = tasks.generate_suite(CFG)
    key = lambda r: (r["family"], r["messages"][1]["content"])  # noqa: E731
    held = {key(r) for r in s["test"] + s["validation"]}
    assert len(held) == len(s["test"]) + len(s["validation"])
    assert not held & {key(r) for r in s["train"]}


@pytest.mark.parametrize("family", sorted(tasks.FAMILIES))
def test_answers_are_correct(family):
    s = tasks.generate_suite(tasks.SuiteConfig(families=(family,), n_train=50, n_validation=5, n_test=5))
    for r in s["train"]:
        system, user, answer = (m["content"] for m in r["messages"])
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        if family == "reverse":
            assert answer == user[::-1]
        elif family == "sort":
            assert answer == "".join(sorted(user))
        elif family == "lookup":
            query, pairs = user[1:].split(" ", 1)
            assert dict(p.split(":") for p in pairs.split())[query] == answer
        elif family == "add":
            a, b = user.split("+")
            assert int(answer[::-1]) == int(a[::-1]) + int(b[::-1])
        elif family == "count":
            target, text = user.split("?")
            assert int(answer) == text.count(target)
        elif family == "mul":
            a, b = user.split("*")
            assert int(answer[::-1]) == int(a[::-1]) * int(b) and 2 <= int(b) <= 9


def test_train_weights_oversample_train_only():
    families = ("reverse", "sort", "lookup", "add", "count", "mul")
    cfg = tasks.SuiteConfig(families=families, n_train=900, n_validation=60, n_test=60, train_weights={"lookup": 3, "mul": 2})
    s = tasks.generate_suite(cfg)
    share = lambda split, fam: sum(r["family"] == fam for r in s[split]) / len(s[split])  # noqa: E731
    assert share("train", "lookup") == pytest.approx(3 / 9) and share("train", "mul") == pytest.approx(2 / 9)
    assert share("train", "sort") == pytest.approx(1 / 9)
    assert all(share(split, f) == pytest.approx(1 / 6) for split in ("test", "validation") for f in cfg.families)
    assert tasks.content_hashes(cfg) != tasks.content_hashes(tasks.SuiteConfig(families=families, n_train=900,
                                                                              n_validation=60, n_test=60))
    # Knobs that cannot change the records stay out of the recorded config.
    assert "mul_digits" not in CFG.to_dict() and "train_weights" not in CFG.to_dict()


@pytest.mark.parametrize("weights", [{"nope": 2}, {"lookup": 0}, {"lookup": 1.5}])
def test_bad_train_weights_name_the_fix(weights):
    with pytest.raises(ValueError, match="train_weights"):
        tasks.SuiteConfig(train_weights=weights)


def test_write_and_load_roundtrip(tmp_path):
    d = tasks.write_suite(CFG, tmp_path / "suite")
    assert {p.name for p in d.iterdir()} == {"train.jsonl", "validation.jsonl", "test.jsonl", "suite.json"}
    assert tasks.load_split(d, "test") == tasks.generate_suite(CFG)["test"]
    mtime = (d / "train.jsonl").stat().st_mtime_ns
    tasks.write_suite(CFG, d)  # same config: reused, not rewritten
    assert (d / "train.jsonl").stat().st_mtime_ns == mtime


def test_scoring_per_family():
    recs = tasks.generate_suite(CFG)["test"][:10]
    preds = [r["messages"][-1]["content"] for r in recs]
    preds[0] = preds[0] + "x"
    s = tasks.score(recs, preds)
    assert s["overall"] == pytest.approx(0.9)
    assert s[recs[0]["family"]] < 1.0
    assert tasks.exact_match(" 42 ", "42")


def test_bad_input():
    with pytest.raises(ValueError, match="unknown task families"):
        tasks.SuiteConfig(families=("nope",))
    with pytest.raises(ValueError, match="valid keys"):
        tasks.SuiteConfig.from_dict({"n_trian": 3})
    with pytest.raises(ValueError, match="unknown split"):
        tasks.load_split(".", "dev")
    with pytest.raises(ValueError, match="no records"):
        tasks.score([], [])


def test_committed_tiny_suite_matches_its_config():
    from overfill_lib.presets import load_preset

    p = load_preset("tiny")
    meta = __import__("json").loads((p.suite_dir / "suite.json").read_text())
    assert meta["content_sha256"] == tasks.content_hashes(p.suite_config())


def test_a_stale_split_is_rewritten_and_a_current_one_left_alone(tmp_path, caplog):
    cfg = tasks.SuiteConfig(n_train=50, n_validation=10, n_test=10)
    tasks.write_suite(cfg, tmp_path)
    test_file, train_file = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    before = test_file.stat().st_mtime_ns
    # What an older generator left behind, under a suite.json that still names this config.
    train_file.write_text(train_file.read_text().replace("reverse", "reverse ", 1))
    with caplog.at_level("WARNING", logger="overfill_lib.tasks"):
        tasks.write_suite(cfg, tmp_path)
    assert "train.jsonl is not what the generator makes" in caplog.text
    assert tasks.load_split(tmp_path, "train") == tasks.generate_suite(cfg)["train"]
    assert test_file.stat().st_mtime_ns == before  # unchanged files are not rewritten
    meta = __import__("json").loads((tmp_path / "suite.json").read_text())
    assert meta["content_sha256"] == tasks.content_hashes(cfg)


def test_the_committed_tiny_models_and_results_come_from_the_split_a_fresh_clone_generates():
    """The full model, the smaller model and notebook 02's runs were trained on exactly the train split this generator writes
    (content hash and token counts), so a fresh clone's `make run` trains on the same data."""
    from transformers import AutoTokenizer

    from overfill_lib import pipeline, training
    from overfill_lib.artifacts import read_json
    from overfill_lib.presets import load_preset

    p = load_preset("tiny")
    hashes = tasks.content_hashes(p.suite_config())
    for model in pipeline.MODELS:
        record = read_json(p.path(getattr(p, model).id) / "training_record.json")
        assert record["suite"]["content_sha256"] == hashes, f"the committed {model} was trained on another suite"
    committed = read_json(p.path("results/tiny/02_decoder_training.json"))["data"]
    assert committed["content_sha256"] == hashes["train"]
    _, stats = pipeline.training_data(p, training.TrainingConfig.from_preset(p),
                                      AutoTokenizer.from_pretrained(p.path(p.full_model.id)))
    assert (stats.prompt_tokens, stats.response_tokens) == (committed["prompt_tokens"], committed["response_tokens"])
