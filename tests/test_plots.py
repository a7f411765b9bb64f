"""Figure export: HTML always; a PNG only when kaleido answers, and a stuck or failing exporter never hangs or
fails the run (it is skipped for the rest of the process)."""

from __future__ import annotations

import time

import plotly.graph_objects as go
import pytest

from overfill_lib import plots


@pytest.fixture
def exporter(monkeypatch):
    monkeypatch.setattr(plots, "_static_export_ok", None)
    monkeypatch.setattr(plots, "_chromium", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(plots, "PNG_TIMEOUT_S", 0.5)
    return monkeypatch


def _fig():
    return go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))


def test_png_written_when_the_exporter_answers(exporter, tmp_path):
    exporter.setattr(plots, "_write_png", lambda fig, path: path.write_bytes(b"\x89PNG"))
    html = plots.save_figure(_fig(), tmp_path / "a")
    assert "<html>" in html.read_text() and (tmp_path / "plotly.min.js").is_file()
    assert (tmp_path / "a.png").read_bytes() == b"\x89PNG" and plots._static_export_ok is True
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


@pytest.mark.parametrize("trouble", ["hangs", "fails"])
def test_stuck_or_failing_exporter_is_skipped_not_fatal(exporter, tmp_path, trouble):
    def export(fig, path):
        if trouble == "hangs":
            time.sleep(30)
        raise RuntimeError("no browser")

    exporter.setattr(plots, "_write_png", export)
    t0 = time.perf_counter()
    html = plots.save_figure(_fig(), tmp_path / "b")
    assert time.perf_counter() - t0 < 5 and html.is_file() and not (tmp_path / "b.png").exists()
    assert plots._static_export_ok is False
    plots.save_figure(_fig(), tmp_path / "c")  # later figures: HTML only, the exporter is not tried again
    assert (tmp_path / "c.html").is_file() and not (tmp_path / "c.png").exists()


def test_a_fast_failure_is_tried_once_more_a_hang_is_not(exporter, tmp_path):
    calls = []

    def flaky(fig, path):  # kaleido's page-load race fails the first export on a loaded machine, not the second
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
        path.write_bytes(b"\x89PNG")

    exporter.setattr(plots, "_write_png", flaky)
    plots.save_figure(_fig(), tmp_path / "d")
    assert len(calls) == 2 and (tmp_path / "d.png").is_file() and plots._static_export_ok is True

    calls.clear()
    exporter.setattr(plots, "_static_export_ok", None)
    exporter.setattr(plots, "_write_png", lambda fig, path: (calls.append(path), time.sleep(30)))
    t0 = time.perf_counter()
    plots.save_figure(_fig(), tmp_path / "e")
    assert len(calls) == 1 and time.perf_counter() - t0 < 5 and plots._static_export_ok is False
