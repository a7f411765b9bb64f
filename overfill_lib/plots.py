"""Plotly set-up and figure export shared by the notebooks.

Under papermill plotly's default renderer stores only the figure JSON, which nbconvert's HTML
does not draw; the ``notebook`` renderer embeds plotly.js (once) so rendered notebooks work
offline. Static PNG export goes through kaleido and needs a Chromium; without one it is skipped
with a log line, never failing the run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
_static_export_ok: bool | None = None


def configure_plotly() -> None:
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"
    pio.templates.default = "plotly_white"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def save_figure(fig, stem: Path) -> Path:
    """Write ``stem.html`` (plotly.min.js shared in the same folder) and ``stem.png`` when possible."""
    global _static_export_ok
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html_path = stem.with_suffix(".html")
    tmp = html_path.with_name(f".{html_path.name}.tmp")
    fig.write_html(tmp, include_plotlyjs="directory", full_html=True)
    os.replace(tmp, html_path)
    if _static_export_ok is not False:
        browser = _chromium()
        if browser is None:
            if _static_export_ok is None:
                log.info("no Chromium found: static PNG export skipped (HTML figures are written)")
            _static_export_ok = False
        else:
            os.environ.setdefault("BROWSER_PATH", browser)
            try:
                png = stem.with_suffix(".png")
                tmp_png = png.with_name(f".{png.name}.tmp.png")
                fig.write_image(tmp_png, width=900, height=500, scale=1.5)
                os.replace(tmp_png, png)
                _static_export_ok = True
            except Exception as e:  # kaleido/Chromium trouble must not fail a run
                log.info("static PNG export skipped (%s: %s)", type(e).__name__, e)
                _static_export_ok = False
    return html_path


def bar_by_family(scores: dict[str, dict[str, float]], title: str, yaxis: str = "exact match"):
    """Grouped bars: one group per task family (plus overall), one bar per model/run."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, per_family in scores.items():
        keys = list(per_family)
        fig.add_bar(name=name, x=keys, y=[per_family[k] for k in keys], text=[f"{per_family[k]:.2f}" for k in keys])
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis, yaxis_range=[0, 1.05])
    return fig


def loss_curves(histories: dict[str, list[dict]], title: str, key: str = "loss"):
    """Line per run from Trainer ``log_history`` lists (entries with ``step`` and ``key``)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, history in histories.items():
        points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        fig.add_scatter(name=name, x=[p[0] for p in points], y=[p[1] for p in points], mode="lines")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=key)
    return fig
