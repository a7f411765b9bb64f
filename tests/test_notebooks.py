"""Every notebook of the series runs under papermill with the smoke preset, and is stored without outputs."""

import json

import pytest

from overfill_lib import runner

NOTEBOOKS = runner.notebooks()


def test_series_exists_and_is_numbered():
    names = [p.stem for p in NOTEBOOKS]
    assert names and names[0].startswith("00_")
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(len(names))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_and_parameterized(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} carries outputs"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert "preset =" in "".join(tagged[0]["source"])


@pytest.mark.notebook
@pytest.mark.xdist_group("notebooks")
def test_smoke_series_runs_end_to_end(smoke_run):
    run_dir = smoke_run
    index = (run_dir / "index.html").read_text()
    for nb in NOTEBOOKS:
        assert (run_dir / f"{nb.stem}.html").exists()
        assert nb.stem in index
    html = (run_dir / f"{NOTEBOOKS[0].stem}.html").read_text()
    assert "plotly" in html.lower()  # figures embedded, viewable offline


def test_runner_refuses_unknown_parameters(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter.*valid parameters"):
        runner.run_series("smoke", {"presett": "x"}, run_dir=tmp_path)


def test_runner_refuses_unknown_preset():
    with pytest.raises(SystemExit, match="unknown preset"):
        runner.main(["--preset", "nope", "--only", "00"])


@pytest.mark.parametrize("argv,message", [
    (["-p", "overrides", "[1]"], "overrides must be a mapping of preset sections .*got list"),
    (["-f", "LIST"], "LIST.yaml must be a YAML mapping of notebook parameters, got list"),
    (["-f", "missing.yaml"], "-f missing.yaml: no such file"),
    (["-y", "[1, 2]"], "-y .* must be a YAML mapping of notebook parameters, got list"),
    (["-y", "{a: &x 1, b: *x}"], "YAML alias \\*x refused"),
])
def test_runner_refuses_parameters_of_the_wrong_shape_before_any_kernel(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "LIST.yaml").write_text("- 1\n- 2\n")
    monkeypatch.setattr(runner, "run_series", lambda *a, **k: pytest.fail("a bad parameter reached the notebooks"))
    with pytest.raises(SystemExit, match=message):
        runner.main(["--preset", "smoke", "--only", "00", *[a.replace("LIST", "LIST.yaml") if a == "LIST" else a
                                                             for a in argv]])


def test_kernel_waits_poll_with_a_timeout():
    """A reply that arrives while an unbounded poll misses its wake-up is still picked up: the runner's client
    polls in bounded steps and keeps going until a message is there."""
    import asyncio

    from jupyter_client.channels import AsyncZMQSocketChannel

    runner.patient_kernel_waits()
    runner.patient_kernel_waits()  # idempotent
    polls = []

    class Socket:
        async def poll(self, timeout_ms):
            polls.append(timeout_ms)
            return len(polls) >= 3  # the message shows up on the third look

    class Channel:
        socket = Socket()

        async def _recv(self):
            return {"msg_type": "execute_reply"}

    msg = asyncio.run(AsyncZMQSocketChannel.get_msg(Channel(), timeout=None))
    assert msg == {"msg_type": "execute_reply"} and polls == [1000, 1000, 1000]
    assert asyncio.run(AsyncZMQSocketChannel.get_msg(Channel(), timeout=0.5)) == msg and polls[-1] == 500


@pytest.mark.xdist_group("notebooks")
def test_a_string_false_through_papermill_stops_at_setup_instead_of_retraining(tmp_path):
    """``papermill -p retrain false`` injects the string "false" (only False is read as a bool): the notebook's setup
    cell refuses it, before anything is trained or overwritten."""
    import papermill

    nb = next(p for p in NOTEBOOKS if p.stem.startswith("00_"))
    with pytest.raises(papermill.PapermillExecutionError, match="retrain expects bool"):
        papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters={"preset": "smoke", "retrain": "false"},
                                   kernel_name=runner.KERNEL, cwd=str(nb.parent), progress_bar=False)
    with pytest.raises(ValueError, match="retrain expects bool"):
        runner.run_series("smoke", {"retrain": "false"}, run_dir=tmp_path / "run")


def test_runner_command_line_reads_parameters_as_yaml(tmp_path, monkeypatch):
    seen = {}

    def fake_series(preset, params, only, force, run_dir, log_output):
        seen.update(preset=preset, params=params, only=only)
        return tmp_path, []

    monkeypatch.setattr(runner, "run_series", fake_series)
    assert runner.main(["--only", "00", "-p", "retrain", "false", "-y", "{seeds: [0, 1]}", "-p", "preset", "smoke"]) == 0
    assert seen == {"preset": "smoke", "params": {"retrain": False, "seeds": [0, 1]}, "only": ["00"]}
