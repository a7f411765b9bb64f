import pytest

from overfill_lib import presets


def test_every_preset_loads():
    names = presets.available()
    assert {"smoke", "tiny", "llama-3.2-3b", "llama-3.1-8b", "qwen2.5-14b-3b", "qwen2.5-14b-7b"} <= set(names)
    for name in names:
        p = presets.load_preset(name)
        assert p.name == name
        assert p["teacher"]["id"]


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: .*tiny"):
        presets.load_preset("tinyy")


def test_unknown_section_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset section.*valid sections"):
        presets.load_preset("tiny", {"decodr": {}})


def test_unknown_nested_key_is_refused():
    with pytest.raises(ValueError, match="unknown teacher keys"):
        presets.load_preset("tiny", {"teacher": {"train": {"stepz": 3}}})


def test_overrides_merge_deeply():
    p = presets.load_preset("tiny", {"teacher": {"train": {"steps": 7}}})
    assert p.teacher_config().steps == 7
    assert p.teacher_config().hidden_size == presets.load_preset("tiny").teacher_config().hidden_size


def test_yaml_file_preset(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("teacher: {id: some/dir}\nsuite: null\n")
    assert presets.load_preset(str(f)).name == "mine"
    with pytest.raises(ValueError, match="does not exist"):
        presets.load_preset(str(tmp_path / "missing.yaml"))


def test_hub_model_offline_fails_fast_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="offline.*--local-dir"):
        presets.resolve_model("meta-llama/Llama-3.2-3B-Instruct")


def test_local_model_resolves(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert presets.resolve_model(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="not a local model directory"):
        presets.resolve_model(tmp_path / "nothing")
