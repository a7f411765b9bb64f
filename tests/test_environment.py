"""environment.yml (conda) installs the same dependency set as pyproject.toml (pip)."""

import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _names(requirements):
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | {r for extra in project["optional-dependencies"].values() for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])
    listed = {r for r in pip if not r.startswith("-e")}
    assert _names(listed) == _names(wanted)
    assert sorted(listed) == sorted(wanted), "pin specifiers differ between environment.yml and pyproject.toml"
    assert any(r.startswith("-e") for r in pip), "environment.yml should install the project itself"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_atomic_directory_swaps_in_one_step_and_cleans_what_a_crash_left(tmp_path, monkeypatch):
    from overfill_lib import artifacts

    target = tmp_path / "model"
    with artifacts.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with artifacts.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (target / "a.txt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # A crash between the fallback's two renames left only the previous version aside: it is restored.
    target.rename(tmp_path / ".model.old")
    dead = tmp_path / ".model.tmp-999999999-x"  # a temporary folder of a writer that is gone
    dead.mkdir()
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)  # the two-rename fallback (non-Linux)
    with artifacts.atomic_directory(target) as tmp:
        assert (target / "a.txt").read_text() == "two" and not dead.exists()
        (tmp / "a.txt").write_text("three")
    assert (target / "a.txt").read_text() == "three" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]



def test_atomic_directory_refuses_a_path_that_is_a_file(tmp_path):
    """The swap would set the file aside as a hidden temporary and put the folder in its place, silently."""
    from overfill_lib import artifacts

    target = tmp_path / "model"
    target.write_text("a file the user keeps")
    with pytest.raises(FileExistsError, match=f"{target} is a file, not a folder.*Move or delete"):
        with artifacts.atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("one")
    assert target.read_text() == "a file the user keeps" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

def test_figures_write_their_shared_plotly_js_whole(tmp_path):
    import plotly.graph_objects as go

    from overfill_lib import plots

    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4])).update_layout(width=1450, height=520)
    html = plots.save_figure(fig, tmp_path / "fig")
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    page = html.read_text()
    assert 'src="plotly.min.js"' in page and not list(tmp_path.glob(".*"))
    # The page fits its window (no fixed 1450-pixel width); the figure itself keeps its size for the PNG.
    assert '"responsive": true' in page and '"width":1450' not in page.replace(" ", "") and fig.layout.width == 1450
