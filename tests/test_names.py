"""One name per thing: the model that prefills is the "full model" (preset section ``full_model``, module
``full_model``, results column ``full_model``), "teacher" is a distillation teacher only, and the narrower sibling
is the "smaller" model. Inputs written under the old names still load, with one message naming what to rename;
run folders keep the names they were created under (docs/names.md)."""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import yaml

from overfill_lib import ablation, config, pipeline, presets, runner
from overfill_lib.artifacts import PROJECT_ROOT

OLD_RESULTS = PROJECT_ROOT / "results" / "tiny" / "04_pruning_ratio_ablation.json"


def _old_style(name: str, tmp_path: Path) -> Path:
    """The shipped preset ``name`` as it was written before the rename (section ``teacher``, ``ablation.teachers``)."""
    text = (presets.PRESET_DIR / f"{name}.yaml").read_text()
    text = re.sub(r"^full_model:", "teacher:", text, flags=re.MULTILINE).replace("full_models:", "teachers:")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def test_an_old_preset_file_loads_as_the_new_one_with_the_rename_message(tmp_path, caplog):
    old = _old_style("tiny", tmp_path)
    with caplog.at_level(logging.WARNING, logger="overfill_lib.presets"):
        p = presets.load_preset(old)
    assert f"section `teacher` is now `full_model`; rename it in {old}" in caplog.text
    assert f"key `ablation.teachers` is now `ablation.full_models`; rename it in {old}" in caplog.text
    new = presets.load_preset("tiny")
    assert p.to_dict() == new.to_dict() and list(p.to_dict()) == list(new.to_dict())  # same sections, same order
    assert p.full_model == new.full_model and p.ablation.full_models == {"smaller": {
        "keep": [0.15, 0.25, 0.4], "seeds": [0], "objectives": ["overfill"]}}


def test_old_overrides_are_read_under_the_new_names(caplog):
    with caplog.at_level(logging.WARNING, logger="overfill_lib.presets"):
        p = presets.load_preset("tiny", {"teacher": {"train": {"steps": 7}},
                                         "ablation": {"teachers": {"smaller": {"keep": [0.5]}}}})
    assert p.full_model_config().steps == 7 and p.ablation.full_models["smaller"]["keep"] == [0.5]
    assert "section `teacher` is now `full_model`; rename it in the overrides" in caplog.text


def test_both_names_at_once_are_refused(tmp_path):
    f = tmp_path / "both.yaml"
    f.write_text("teacher: {id: a}\nfull_model: {id: b}\n")
    with pytest.raises(ValueError, match="gives both `teacher` and `full_model`.*keep only `full_model`"):
        presets.load_preset(f)


def test_old_ablation_records_are_read_under_the_new_names(caplog):
    """Notebook 04's committed tiny results (written with ``teacher`` columns) read through the shim: the table and
    the conclusion computed from its rows are the ones it recorded; the file is left as written."""
    before = OLD_RESULTS.read_bytes()
    with caplog.at_level(logging.WARNING, logger="overfill_lib.ablation"):
        found = ablation.read_results(OLD_RESULTS)
    assert caplog.text.count("column `teacher` is now `full_model`") == 1 and str(OLD_RESULTS) in caplog.text
    assert OLD_RESULTS.read_bytes() == before and b'"teacher"' in before
    assert {r["full_model"] for r in found["rows"]} == {"full_model", "smaller"}
    assert all("teacher" not in r and "teacher_parameters" not in r for r in found["rows"] + found["table"])
    assert set(found["size_rule"]["full_models"]) == {"full_model", "smaller"}
    assert "full_models" in found["ablation"] and "full_model" in found["preset"] and "teacher" not in found["preset"]
    table = ablation.aggregate(found["rows"])
    def by_point(rows):  # a reference's keep is NaN in the table, None in the JSON
        return {(r["full_model"], r["method"], r["keep"] if r["keep"] == r["keep"] else None): r["overall"] for r in rows}

    assert by_point(table.to_dict("records")) == by_point(found["table"])
    assert ablation.conclusion(table, found["ablation"]["retention"], label="exact match") == found["conclusion"]


def test_old_rows_aggregate_like_new_ones(caplog):
    found = ablation.read_results(OLD_RESULTS)
    old = json.loads(OLD_RESULTS.read_text())["rows"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="overfill_lib.ablation"):
        table = ablation.aggregate(old)
    assert caplog.text.count("column `teacher` is now `full_model`") == 1
    assert table.equals(ablation.aggregate(found["rows"]))
    assert ablation.families(old) == ablation.families(found["rows"])


def test_old_import_paths_and_names_still_work_with_a_deprecation_warning():
    from overfill_lib import full_model

    sys.modules.pop("overfill_lib.teacher", None)
    with pytest.warns(DeprecationWarning, match="overfill_lib.teacher is now overfill_lib.full_model"):
        teacher = importlib.import_module("overfill_lib.teacher")
    assert teacher.TeacherConfig is full_model.FullModelConfig and teacher.train_teacher is full_model.train_full_model
    assert teacher.build_tokenizer is full_model.build_tokenizer and callable(teacher.evaluate_exact_match)
    with pytest.warns(DeprecationWarning, match="config.TeacherSection is now config.FullModelSection"):
        assert config.TeacherSection is config.FullModelSection
    with pytest.warns(DeprecationWarning, match="pipeline.teacher_recipe is now pipeline.model_recipe"):
        assert pipeline.teacher_recipe is pipeline.model_recipe
    p = presets.load_preset("tiny")
    with pytest.warns(DeprecationWarning, match="Preset.teacher is now Preset.full_model"):
        assert p.teacher == p.full_model
    with pytest.warns(DeprecationWarning, match="Preset.teacher_config is now Preset.full_model_config"):
        assert p.teacher_config() == p.full_model_config()
    with pytest.raises(ValueError, match="model 'teacher' is now 'full_model'"):
        pipeline.model(p, "teacher")
    with pytest.raises(AttributeError):
        _ = p.no_such_attribute


def test_an_old_notebook_parameter_is_refused_naming_the_new_one():
    from overfill_lib import workbook

    with pytest.raises(ValueError, match="unknown parameter.*teachers.*; teachers is now full_models"):
        workbook.check_parameters("04_pruning_ratio_ablation", {"teachers": {}})
    workbook.check_parameters("04_pruning_ratio_ablation", {"full_models": {}})


def test_the_old_notebook_name_runs_the_renamed_notebook(caplog):
    with caplog.at_level(logging.WARNING, logger="overfill_lib.runner"):
        assert [n.stem for n in runner.notebooks(["00_teacher"])] == ["00_full_model"]
    assert "notebook 00_teacher is now 00_full_model" in caplog.text


def test_run_folders_keep_the_names_they_were_made_under():
    """Ablation decoders, runs and cached scores of the preset's own full model live under ``teacher-keep<k>`` and
    ``scores/teacher-...``: renaming those folders would re-prune, retrain and rescore everything."""
    assert config.Point(config.MAIN_FULL_MODEL, 0.5).slug == "teacher-keep0.5"
    assert config.Point("smaller", 0.25).slug == "smaller-keep0.25"
    assert config.Point("org/model-1B", 0.4).slug == "org_model-1B-keep0.4"
    assert ablation.score_cache_name(config.MAIN_FULL_MODEL, PROJECT_ROOT / "data" / "teacher-tiny", "k").startswith(
        "teacher-")


# Old identifiers for the model that prefills. Only the compatibility shims (and their tests) may still name them.
OLD_NAMES = re.compile(r"TeacherConfig|TeacherSection|MAIN_TEACHER|train_teacher\(|teacher_recipe|teacher_dir\b"
                       r"|\bteacher_id\b|ask_teacher|retention_by_teacher|teacher_config|is_offline_default"
                       r"|preset\.teacher\b|\.teacher\.(?:id|train|gguf)|\[\"teacher\"\]|00_teacher|overfill_lib\.teacher"
                       r"|import teacher|\bteachers\b|\bsibling\b|half-width sibling")
SHIMS = {"overfill_lib/teacher.py", "overfill_lib/config.py", "overfill_lib/pipeline.py", "overfill_lib/presets.py",
         "overfill_lib/ablation.py", "overfill_lib/runner.py", "overfill_lib/workbook.py"}


def test_the_library_notebooks_and_benchmarks_use_the_new_names():
    files = [*sorted((PROJECT_ROOT / "overfill_lib").glob("*.py")), *sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")),
             *sorted((PROJECT_ROOT / "benchmarks").glob("*.py"))]
    found = []
    for path in files:
        rel = path.relative_to(PROJECT_ROOT).as_posix()
        if rel in SHIMS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if OLD_NAMES.search(line) and not re.search(r"old name|deprecat", line, re.IGNORECASE):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "old names of the full model (see docs/names.md):\n" + "\n".join(found)
    for path in sorted(presets.PRESET_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert "full_model" in raw and "teacher" not in raw and "teachers" not in (raw.get("ablation") or {})
    assert pipeline.MODELS == ("full_model", "smaller") and "full_model" in presets.SECTIONS
    assert "teacher" not in presets.SECTIONS and "full_model" in ablation.ID_COLUMNS
    assert runner.notebooks()[0].stem == "00_full_model"


# The preset a notebook's results record, before the rename (tests/test_presets.py's RECIPE_DIGESTS before it), and
# the descriptions that called the full model a teacher.
BEFORE_RENAME = {"tiny": ("6dc09ab3fa3a", "offline default, a 3M-parameter Llama teacher trained on the synthetic suite (CPU)"),
                 "smoke": ("498d35f57ab7", "seconds-scale check of every step on a micro teacher (numbers are meaningless)"),
                 "smollm2-135m": ("bd9889718be7", None)}
# Later changes: the train split grew to 2,600 prompts; notebooks 02 and 04 score 100 held-out answers, and
# notebook 04 trains one seed per width and skips the untrained decoders, notebook 03 sweeps eagerly (make run under
# two hours). (A section or key set to None here was absent before.)
SINCE_RENAME = {"smollm2-135m": {"distill": {"train": [260, 80]}, "evaluation": None,
                                 "ablation": {"seeds": [0, 1], "untrained": None}, "latency": {"compile": None}}}


@pytest.mark.parametrize("name", sorted(BEFORE_RENAME))
def test_the_recorded_preset_changed_by_the_rename_only(name):
    import hashlib

    digest, description = BEFORE_RENAME[name]
    raw = presets.load_preset(name).to_dict()
    back = {("teacher" if k == "full_model" else k): v for k, v in raw.items()}
    back["ablation"] = {("teachers" if k == "full_models" else k): v for k, v in back["ablation"].items()}
    back["description"] = description or back["description"]
    for section, values in SINCE_RENAME.get(name, {}).items():  # later changes, undone
        merged = None if values is None else {**back[section], **values}
        back[section] = merged and {k: v for k, v in merged.items() if v is not None}
    assert hashlib.sha256(json.dumps(back).encode()).hexdigest()[:12] == digest
