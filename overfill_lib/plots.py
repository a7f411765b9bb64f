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
import threading
from pathlib import Path

from overfill_lib.artifacts import atomic_write_text
from overfill_lib.config import MAIN_FULL_MODEL

log = logging.getLogger(__name__)
_static_export_ok: bool | None = None
PNG_TIMEOUT_S = 60  # one export starts a headless Chromium: ~2 s on an idle machine


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


def _write_png(fig, path: Path) -> None:
    # A fresh headless Chromium per figure (~2 s). kaleido's long-lived sync server is faster (~0.2 s) but keeps a
    # Chromium alive in every kernel, and it was running in two hung test runs (cause not pinned down; a third hang
    # was nbclient's, see runner.patient_kernel_waits), so the plain path is used.
    fig.write_image(path, width=fig.layout.width or 900, height=fig.layout.height or 500, scale=1.5)


def _static_png(fig, png: Path, attempts: int = 2) -> None:
    """Export ``png`` through kaleido, once more if the first try fails fast: on a loaded machine kaleido can run
    its script before its own page has loaded (``ReferenceError: kaleido_scopes is not defined``), which a second
    Chromium does not repeat. A hang is not retried."""
    for attempt in range(1, attempts + 1):
        try:
            return _static_png_once(fig, png)
        except TimeoutError:
            raise
        except Exception as e:
            if attempt == attempts:
                raise
            log.debug("PNG export failed (%s: %s); trying again", type(e).__name__, e)


def _static_png_once(fig, png: Path) -> None:
    """Export ``png`` through kaleido in a daemon thread, giving up after ``PNG_TIMEOUT_S``: a Chromium that
    stops answering must not hang a batch run (a daemon thread left behind does not block the exit)."""
    tmp = png.with_name(f".{png.name}.tmp.png")
    failure: list[BaseException] = []

    def work():
        try:
            _write_png(fig, tmp)
        except BaseException as e:  # reported to the caller below
            failure.append(e)

    worker = threading.Thread(target=work, name="png-export", daemon=True)
    worker.start()
    worker.join(PNG_TIMEOUT_S)
    if worker.is_alive():
        raise TimeoutError(f"no PNG after {PNG_TIMEOUT_S} s")
    if failure:
        tmp.unlink(missing_ok=True)
        raise failure[0]
    os.replace(tmp, png)


def save_figure(fig, stem: Path) -> Path:
    """Write ``stem.html`` (plotly.min.js shared in the same folder) and ``stem.png`` when possible.

    The HTML page fits its window (a fixed 1450-pixel figure cut its legend off on a laptop screen); the PNG keeps
    the figure's own size."""
    global _static_export_ok
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html_path = stem.with_suffix(".html")
    shared_js = stem.parent / "plotly.min.js"  # one copy per folder, written whole before any page points to it
    if not shared_js.is_file():
        from plotly.offline import get_plotlyjs

        atomic_write_text(shared_js, get_plotlyjs())
    import plotly.graph_objects as go

    page = go.Figure(fig).update_layout(width=None, autosize=True)
    atomic_write_text(html_path, page.to_html(include_plotlyjs=shared_js.name, full_html=True, default_width="100%",
                                              default_height=f"{fig.layout.height or 500}px",
                                              config={"responsive": True}))
    if _static_export_ok is not False:
        browser = _chromium()
        if browser is None:
            if _static_export_ok is None:
                log.info("no Chromium found: static PNG export skipped (HTML figures are written)")
            _static_export_ok = False
        else:
            os.environ.setdefault("BROWSER_PATH", browser)
            try:
                _static_png(fig, stem.with_suffix(".png"))
                _static_export_ok = True
            except Exception as e:  # kaleido/Chromium trouble must not fail (or hang) a run
                reason = str(e).splitlines()[0][:200] if str(e) else ""
                log.info("static PNG export skipped from here on (%s: %s)", type(e).__name__, reason)
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


def _log_relative(scores):
    """log10(score / the row's median): how far each unit stands above or below a typical one of its layer."""
    scores = scores.double().clamp(min=1e-30)
    return (scores / scores.median(dim=-1, keepdim=True).values).log10().numpy()


def importance_heatmaps(importance, title: str):
    """Per-layer heatmaps of hidden channels, MLP neurons and query heads (colour: log10 of score / layer median)."""
    from plotly.subplots import make_subplots

    panels = [("hidden channels", importance.hidden_per_layer), ("MLP neurons", importance.intermediate),
              ("query heads", importance.heads)]
    panels = [(name, s) for name, s in panels if s is not None]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[n for n, _ in panels], horizontal_spacing=0.06,
                        column_widths=[max(s.shape[1], 40) ** 0.5 for _, s in panels])
    for col, (name, scores) in enumerate(panels, start=1):
        fig.add_heatmap(z=_log_relative(scores), coloraxis="coloraxis", name=name, row=1, col=col,
                        hovertemplate="layer %{y}, unit %{x}: log10(score/median) %{z:.2f}<extra>" + name + "</extra>")
        fig.update_xaxes(title_text="unit index", row=1, col=col)
    fig.update_yaxes(title_text="layer", autorange="reversed")
    fig.update_layout(title=title, coloraxis={"colorscale": "RdBu_r", "cmid": 0,
                                              "colorbar": {"title": "log10(score /<br>layer median)"}})
    return fig


def importance_distributions(importances: dict, title: str):
    """Box plots per criterion of log10(score / layer median) for hidden channels, MLP neurons and query heads."""
    from plotly.subplots import make_subplots

    dims = [("hidden channels", "hidden"), ("MLP neurons", "intermediate"), ("query heads", "heads")]
    fig = make_subplots(rows=1, cols=len(dims), subplot_titles=[d for d, _ in dims])
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for i, (criterion, imp) in enumerate(importances.items()):
        for col, (_, attr) in enumerate(dims, start=1):
            values = _log_relative(getattr(imp, attr)).ravel()
            fig.add_box(y=values, name=criterion, legendgroup=criterion, showlegend=col == 1, boxpoints=False,
                        marker_color=colors[i % len(colors)], row=1, col=col)
    fig.update_yaxes(title_text="log10(score / layer median)", row=1, col=1)
    fig.update_layout(title=title)
    return fig


def layer_scores(importance, title: str):
    """Bars per layer: Block Influence (1 - cos(in, out)) and, when measured, the loss increase when skipped."""
    from plotly.subplots import make_subplots

    panels = [("block influence: 1 - cos(input, output)", importance.layers)]
    if importance.layers_skip_loss is not None:
        panels.append(("loss increase when the layer is skipped (nats/token)", importance.layers_skip_loss))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[n for n, _ in panels])
    for col, (name, scores) in enumerate(panels, start=1):
        fig.add_bar(x=list(range(len(scores))), y=scores.tolist(), name=name, showlegend=False, row=1, col=col)
        fig.update_xaxes(title_text="layer", dtick=1, row=1, col=col)
    fig.update_layout(title=title)
    return fig


def metrics_vs_ratio(table, metrics: list[str], title: str, reference: dict | None = None,
                     x: str = "ratio", color: str = "criterion", log_metrics=()):
    """One panel per metric: a line per ``color`` value over ``x``; ``reference`` values drawn as dashed lines;
    the panels of ``log_metrics`` on a log axis."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    for i, (name, group) in enumerate(table.groupby(color, sort=False)):
        group = group.sort_values(x)
        for col, metric in enumerate(metrics, start=1):
            fig.add_scatter(x=group[x], y=group[metric], name=str(name), legendgroup=str(name), showlegend=col == 1,
                            mode="lines+markers", line_color=colors[i % len(colors)], row=1, col=col)
    for col, metric in enumerate(metrics, start=1):
        if reference and metric in reference:
            # plotly places annotations on a log axis in log10 units, which would stretch the axis: line only there.
            label = {} if metric in log_metrics else {"annotation_text": "unpruned", "annotation_position": "top left"}
            fig.add_hline(y=reference[metric], line_dash="dash", line_color="gray", row=1, col=col, **label)
        fig.update_xaxes(title_text=x, row=1, col=col)
        if metric in log_metrics:
            fig.update_yaxes(type="log", row=1, col=col)
    fig.update_layout(title=title)
    return fig


def bar_eval_results(table, title: str, metric: str | None = None, filter: str | None = None):
    """Grouped bars from ``evaluation.results_table``: one group per task (and filter), one bar per run,
    with lm-eval's standard errors as error bars."""
    import plotly.graph_objects as go

    if metric is not None:
        table = table[table["metric"] == metric]
    if filter is not None:
        table = table[table["filter"] == filter]
    several_filters = table["filter"].nunique() > 1
    fig = go.Figure()
    for run, rows in table.groupby("run", sort=False):
        x = [f"{t} ({f})" if several_filters else t for t, f in zip(rows["task"], rows["filter"])]
        fig.add_bar(
            name=str(run),
            x=x,
            y=rows["value"],
            error_y={"type": "data", "array": rows["stderr"].fillna(0).tolist()},
            text=[f"{v:.2f}" for v in rows["value"]],
        )
    metrics = sorted(table["metric"].unique())
    fig.update_layout(barmode="group", title=title, yaxis_title=", ".join(metrics) or "value")
    return fig


# -- latency (notebook 03) -------------------------------------------------------------------------

_LATENCY_DASH = ["solid", "dash", "dot", "dashdot"]


def _ok_fast(results: dict, sweep: str) -> list[dict]:
    return [r for r in results["records"] if r.get("status") == "ok" and sweep in r.get("sweeps", [])]


def _ms(stat: dict | None) -> tuple[float | None, float | None, float | None]:
    if not stat or stat.get("median") is None:
        return None, None, None
    med = 1000 * stat["median"]
    lo = None if stat.get("p10") is None else med - 1000 * stat["p10"]
    hi = None if stat.get("p90") is None else 1000 * stat["p90"] - med
    return med, lo, hi


def _latency_lines(fig, results: dict, sweep: str, x: str, stat: str, methods=None, row=None, col=None) -> None:
    """One line per (pair, method, path) over ``x``, medians with p10-p90 error bars."""
    pairs = list(results.get("pairs", {}))
    groups: dict[tuple, list[dict]] = {}
    for r in _ok_fast(results, sweep):
        if methods is None or r["method"] in methods:
            groups.setdefault((r["pair"], r["method"], r["path"]), []).append(r)
    for (pair, method, path), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r[x])
        vals = [_ms(r.get(stat)) for r in rows]
        kw = {"row": row, "col": col} if row is not None else {}
        fig.add_scatter(
            x=[r[x] for r in rows], y=[v[0] for v in vals], mode="lines+markers",
            name=f"{pair} · {method} ({path})", legendgroup=f"{pair}-{method}",
            line={"dash": _LATENCY_DASH[pairs.index(pair) % len(_LATENCY_DASH)] if pair in pairs else "solid"},
            error_y={"type": "data", "symmetric": False, "array": [v[2] for v in vals], "arrayminus": [v[1] for v in vals]},
            **kw,
        )


def latency_figures(results: dict) -> dict:
    """The latency figures of a :func:`overfill_lib.latency.run_suite` results dict (a CPU run or a committed GPU JSON).

    Keys: ``latency_vs_output_length``, ``ttft_vs_prompt_length``, ``measured_vs_roofline``,
    ``throughput_vs_batch``, ``overfill_vs_speculative``. Legends name each line's ``path``.
    """
    env = results.get("environment", {})
    where = f"{env.get('device_name') or env.get('device')} · {results.get('label', '')}"
    return {name: figure(results, where) for name, figure in LATENCY_FIGURES.items()}


def headline_figure(results: dict):
    """Per-token decode time at batch 1 on the fast path, full model, decoder and OverFill, one group per pair, from
    a GPU headline results JSON (:mod:`overfill_lib.headline`); bars labelled with their share of the device's copy
    bandwidth."""
    import plotly.graph_objects as go

    from overfill_lib import headline

    points = [r for r in headline.rows(results) if r["kind"] == "fast" and r["batch"] == 1 and r["status"] == "ok"
              and r["new tokens"] == headline.NEW_TOKENS]
    fig = go.Figure()
    for method, color in (("full", "#9e9e9e"), ("decoder", "#6baed6"), ("overfill", "#08519c")):
        mine = [r for r in points if r["method"] == method]
        fig.add_trace(go.Bar(x=[r["pair"] for r in mine], y=[r["ms per token"] for r in mine], name=method,
                             marker_color=color, textposition="outside",
                             text=[f"{r['share of copy bandwidth']:.0%}" if r["share of copy bandwidth"] else ""
                                   for r in mine]))
    env = results.get("environment", {})
    fig.update_layout(barmode="group", yaxis_title="ms per token", height=420,
                      title=f"Decode at batch 1, fast path (bars: share of copy bandwidth)<br><sup>"
                            f"{env.get('device_name')} · torch {env.get('torch')} · commit {env.get('commit')}</sup>")
    return fig


def _latency_vs_output_length(results: dict, where: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    _latency_lines(fig, results, "output", "new_tokens", "e2e_s")
    fig.update_layout(title=f"End-to-end latency vs output length (batch 1)<br><sup>{where}</sup>",
                      xaxis_title="new tokens", yaxis_title="end-to-end ms (median, p10-p90)", xaxis_type="log",
                      yaxis_type="log")
    return fig


def _ttft_vs_prompt_length(results: dict, where: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    _latency_lines(fig, results, "prompt", "prompt", "ttft_s", methods=("full", "decoder", "overfill"))
    fig.update_layout(title=f"Time to first token vs prompt length (batch 1)<br><sup>{where}</sup>",
                      xaxis_title="prompt tokens", yaxis_title="TTFT ms (median, p10-p90)", xaxis_type="log",
                      yaxis_type="log")
    return fig


def _measured_vs_roofline(results: dict, where: str):
    """Per-token time of the fast path at batch 1 beside the bandwidth bound (bytes per step / copy bandwidth)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for pair, info in results.get("pairs", {}).items():
        for role, rows in info.get("roofline", {}).items():
            rows = sorted((r for r in rows if r["batch"] == 1), key=lambda r: r["context"])
            fig.add_scatter(x=[r["context"] for r in rows], y=[1000 * r["seconds_per_step"] for r in rows],
                            mode="lines", line={"dash": "dot"}, name=f"{pair} · {role} roofline (bytes / copy bandwidth)")
        measured = [r for r in results["records"] if r.get("pair") == pair and r.get("status") == "ok"
                    and r.get("batch") == 1 and r.get("per_token_s") and r.get("path", "").startswith("fast")
                    and r["method"] in ("full", "decoder", "overfill") and ("prompt" in r["sweeps"] or "output" in r["sweeps"])]
        for method in ("full", "decoder", "overfill"):
            rows = sorted((r for r in measured if r["method"] == method), key=lambda r: r["max_cache_len"])
            if rows:
                fig.add_scatter(x=[r["max_cache_len"] for r in rows], y=[1000 * r["per_token_s"]["median"] for r in rows],
                                mode="markers", name=f"{pair} · {method} measured ({rows[0]['path']})")
    fig.update_layout(title=f"Per-token time vs context: measured and the bandwidth bound (batch 1)<br><sup>{where}</sup>",
                      xaxis_title="context (static cache positions)", yaxis_title="ms per token", xaxis_type="log",
                      yaxis_type="log")
    return fig


def _throughput_vs_batch(results: dict, where: str):
    """Decode tokens/s and memory over the batch sweep, with each model's roofline at the base point's context."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode tokens/s", "memory (GB)"))
    groups: dict[tuple, list[dict]] = {}
    for r in _ok_fast(results, "batch"):
        groups.setdefault((r["pair"], r["method"], r["path"]), []).append(r)
    for (pair, method, path), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["batch"])
        name = f"{pair} · {method} ({path})"
        fig.add_scatter(x=[r["batch"] for r in rows], y=[r.get("decode_tokens_per_s") for r in rows], mode="lines+markers",
                        name=name, legendgroup=name, row=1, col=1)
        memory = [(r.get("peak_memory_bytes") or r.get("memory_estimate_bytes") or 0) / 1e9 for r in rows]
        fig.add_scatter(x=[r["batch"] for r in rows], y=memory, mode="lines+markers",
                        name=name, legendgroup=name, showlegend=False, row=1, col=2)
    settings = results.get("settings", {})
    context = settings.get("base_prompt", 0) + settings.get("base_new_tokens", 0)
    for pair, info in results.get("pairs", {}).items():
        for role, rows in info.get("roofline", {}).items():
            near = {}
            for r in rows:  # the roofline context closest to the measured cache length, per batch
                if r["batch"] not in near or abs(r["context"] - context) < abs(near[r["batch"]]["context"] - context):
                    near[r["batch"]] = r
            pts = sorted(near.values(), key=lambda r: r["batch"])
            fig.add_scatter(x=[r["batch"] for r in pts], y=[r["tokens_per_s"] for r in pts], mode="lines",
                            line={"dash": "dot"}, name=f"{pair} · {role} roofline", row=1, col=1)
    fig.update_xaxes(type="log", title_text="batch size")
    fig.update_yaxes(type="log", row=1, col=1)
    mem_note = "peak allocated" if any(r.get("peak_memory_bytes") for r in results["records"]) else "estimate: weights + static caches"
    fig.update_layout(title=f"Throughput and memory vs batch size ({mem_note})<br><sup>{where}</sup>")
    return fig


def _base_point_record(results: dict, pair: str, method: str, base: dict) -> dict | None:
    """The fast path's measured record of ``method`` at the base point, if the run has one."""
    return next((r for r in results["records"] if r.get("pair") == pair and r.get("method") == method
                 and r.get("status") == "ok" and r.get("path", "").startswith("fast")
                 and all(r.get(k) == v for k, v in base.items())), None)


def _overfill_vs_speculative(results: dict, where: str):
    """Modelled speculative decoding (best gamma per acceptance rate) against the measured OverFill, full and
    decoder lines at the base point, with a measured speculative run and the measured acceptance where there are."""
    import plotly.graph_objects as go

    fig = go.Figure()
    settings = results.get("settings", {})
    base = {"batch": 1, "prompt": settings.get("base_prompt"), "new_tokens": settings.get("base_new_tokens")}
    for pair, info in results.get("pairs", {}).items():
        rows = [r for r in results.get("speculative_model", []) if r["pair"] == pair
                and all(r.get(k) == v for k, v in base.items())]
        best: dict[float, dict] = {}
        for r in rows:
            if r["alpha"] not in best or r["per_token_s"] < best[r["alpha"]]["per_token_s"]:
                best[r["alpha"]] = r
        pts = sorted(best.values(), key=lambda r: r["alpha"])
        if pts:
            fig.add_scatter(x=[r["alpha"] for r in pts], y=[1000 * r["per_token_s"] for r in pts], mode="lines+markers",
                            text=[f"gamma={r['gamma']}" for r in pts],
                            name=f"{pair} · speculative, best gamma (modelled from {pts[0]['source_path']} costs)")
        for method in ("overfill", "full", "decoder"):
            r = _base_point_record(results, pair, method, base)
            if r and r.get("per_token_s"):
                fig.add_scatter(x=[0, 1], y=[1000 * r["per_token_s"]["median"]] * 2, mode="lines",
                                line={"dash": "dash" if method != "overfill" else "solid"},
                                name=f"{pair} · {method} measured ({r['path']})")
        spec = _base_point_record(results, pair, "speculative", base)
        if spec and spec.get("per_token_s") and spec.get("acceptance"):
            fig.add_scatter(x=[spec["acceptance"]["median"]], y=[1000 * spec["per_token_s"]["median"]], mode="markers",
                            marker={"size": 12, "symbol": "star"},
                            name=f"{pair} · speculative measured, gamma={spec.get('draft_tokens')} ({spec['path']})")
        alpha = (info.get("acceptance") or {}).get("alpha")
        if alpha is not None:
            fig.add_vline(x=alpha, line_dash="dot", annotation_text=f"{pair}: measured alpha {alpha:.2f}")
    fig.update_layout(title=f"OverFill vs speculative decoding, per output token (batch 1)<br><sup>{where}</sup>",
                      xaxis_title="per-token acceptance rate alpha", yaxis_title="ms per output token", xaxis_range=[0, 1])
    return fig


# The figures of :func:`latency_figures`, in the order the notebook shows them.
LATENCY_FIGURES = {
    "latency_vs_output_length": _latency_vs_output_length,
    "ttft_vs_prompt_length": _ttft_vs_prompt_length,
    "measured_vs_roofline": _measured_vs_roofline,
    "throughput_vs_batch": _throughput_vs_batch,
    "overfill_vs_speculative": _overfill_vs_speculative,
}


# -- decoder training (notebook 02) ----------------------------------------------------------------


def cpu_decode_figure(results: dict):
    """Per-token decode time by path (plain ``generate``, fast eager, fast compiled) for the full model, the decoder
    and OverFill, one panel per preset and dtype, from a ``benchmarks/cpu_decode.py`` results JSON; the compiled
    bars are labelled with their achieved fraction of the read bandwidth measured in the same run."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    presets = list(results["presets"])
    dtypes = list(dict.fromkeys(d for p in results["presets"].values() for d in p["dtypes"]))
    fig = make_subplots(rows=len(presets), cols=len(dtypes), vertical_spacing=0.12,
                        subplot_titles=[f"{p} · {d}" for p in presets for d in dtypes])
    colors = {"plain": "#9e9e9e", "eager": "#6baed6", "compiled": "#08519c"}
    for row, preset in enumerate(presets, start=1):
        for col, dtype in enumerate(dtypes, start=1):
            r = results["presets"][preset]["dtypes"].get(dtype)
            if r is None:
                continue
            methods = list(r["methods"])
            for path, color in colors.items():
                if any(path not in r["methods"][m] for m in methods):  # --paths may leave the eager path out
                    continue
                ms = [r["methods"][m][path]["ms_per_token"] for m in methods]
                text = ([f"{r['methods'][m][path]['fraction_of_read_bandwidth']:.0%}" for m in methods]
                        if path == "compiled" else None)
                fig.add_trace(go.Bar(x=methods, y=ms, name=path, marker_color=color, text=text, textposition="outside",
                                     legendgroup=path, showlegend=row == col == 1), row=row, col=col)
            fig.update_yaxes(title_text="ms per token" if col == 1 else None, row=row, col=col)
    env = results.get("environment", {})
    fig.update_layout(barmode="group", height=380 * len(presets) + 120,
                      title=f"CPU decode, batch 1: plain generate vs the fast path (compiled bars: share of read "
                            f"bandwidth)<br><sup>{env.get('device_name')} · {env.get('cpu_threads')} threads · torch "
                            f"{env.get('torch')} · commit {env.get('commit')}</sup>")
    return fig


def cpu_batched_figure(results: dict):
    """Decode tokens per second against the batch size, one panel per preset, from a ``benchmarks/cpu_decode.py``
    results JSON run with ``--batch`` (:func:`overfill_lib.llama_cpp.batched_rows`): the workbook's compiled full
    model, decoder and OverFill per dtype (solid) and llama.cpp's full model per precision (dashed); a marker per
    precision, a colour per model."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from overfill_lib import llama_cpp

    rows = llama_cpp.batched_rows(results)
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    symbols = dict(zip(llama_cpp.PRECISIONS, ("circle", "diamond", "square", "triangle-up")))
    fig = make_subplots(rows=1, cols=max(1, len(presets)), subplot_titles=presets)
    for col, preset in enumerate(presets, start=1):
        lines: dict[tuple, list[dict]] = {}
        for r in (r for r in rows if r["preset"] == preset):
            lines.setdefault((r["precision"], r["engine"], r["model"]), []).append(r)
        for (precision, engine, model), mine in lines.items():
            fig.add_trace(go.Scatter(
                x=[r["batch"] for r in mine], y=[r["tokens per s"] for r in mine], mode="lines+markers",
                name=f"{engine}: {model} · {precision}", legendgroup=f"{engine} {model} {precision}",
                showlegend=col == 1, line={"color": llama_cpp.COLORS.get((engine, model)),
                                           "dash": "dash" if engine == "llama.cpp" else "solid"},
                marker={"symbol": symbols.get(precision.split(" / ")[0], "circle"), "size": 8}), row=1, col=col)
        batches = sorted({r["batch"] for r in rows if r["preset"] == preset})
        fig.update_xaxes(type="log", tickvals=batches, title_text="batch size", row=1, col=col)
        fig.update_yaxes(type="log", title_text="decode tokens per s" if col == 1 else None, row=1, col=col)
    env = results.get("environment", {})
    fig.update_layout(height=500, title=f"CPU decode throughput against the batch size: the workbook's compiled fast "
                                        f"path (solid) and llama.cpp's full model (dashed)<br><sup>"
                                        f"{env.get('device_name')} · {results.get('threads')} threads · torch "
                                        f"{env.get('torch')} · commit {env.get('commit')}</sup>")
    return fig


def bar_by_family_spread(mean: dict[str, dict[str, float]], spread: dict[str, dict[str, float]], title: str,
                         yaxis: str = "exact match", note: str = "error bars: std over seeds"):
    """Grouped bars per task family (plus overall), one bar per model: the mean, with ``spread`` as error bars."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, per_family in mean.items():
        keys = list(per_family)
        fig.add_bar(name=name, x=keys, y=[per_family[k] for k in keys], text=[f"{per_family[k]:.2f}" for k in keys],
                    error_y={"type": "data", "array": [spread.get(name, {}).get(k, 0.0) for k in keys]})
    fig.update_layout(barmode="group", title=f"{title}<br><sup>{note}</sup>", yaxis_title=yaxis, yaxis_range=[0, 1.1])
    return fig


def exact_match_during_training(history: list[dict], title: str):
    """Validation exact match per family against step, from ``val_exact_match`` entries of a log history."""
    import plotly.graph_objects as go

    points = [h for h in history if "val_exact_match" in h]
    fig = go.Figure()
    for family in points[0]["val_exact_match"] if points else []:
        fig.add_scatter(name=family, x=[p["step"] for p in points], y=[p["val_exact_match"][family] for p in points],
                        mode="lines+markers", line={"width": 3 if family == "overall" else 1.5})
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="validation exact match", yaxis_range=[0, 1.05])
    return fig


# -- pruning-ratio ablation (notebook 04) ----------------------------------------------------------

METHOD_COLORS = {"OverFill": "#1f77b4", "pruned": "#ff7f0e", "from scratch": "#2ca02c",
                 "OverFill (untrained)": "#9ecae1", "pruned (untrained)": "#fdd0a2",
                 "full model": "#444444", "smaller fine-tuned": "#d62728"}
DASHES = ["solid", "dot", "dashdot", "longdash"]  # one per full model, or per width


def _trace_name(method: str, full_model: str, main: str) -> str:
    return method if full_model == main else f"{method} · {full_model}"


def pareto(table, costs: dict[str, str], title: str, score: str = "overall",
           methods: tuple[str, ...] = ("OverFill", "pruned", "from scratch"), main: str = MAIN_FULL_MODEL,
           log_x: bool = True, y_title: str | None = None):
    """Score against cost, one panel per ``costs`` column (``{column: axis title}``).

    A line per (method, full model) over decoder widths, error bars = std over seeds, each point labelled with
    its keep fraction; the full models and the smaller fine-tuned model as reference points with dashed
    horizontal lines; the Pareto frontier over every trained decoder and reference (lower cost, higher score)
    as a dotted step line. Rows come from ``ablation.aggregate``.
    """
    from plotly.subplots import make_subplots

    from overfill_lib import ablation

    fig = make_subplots(rows=1, cols=len(costs), subplot_titles=list(costs.values()), shared_yaxes=True)
    full_models = list(dict.fromkeys(table["full_model"]))
    refs = table[table["method"].isin([ablation.FULL, ablation.SMALLER])]
    for col, cost in enumerate(costs, start=1):
        for method in methods:
            for t_index, full_model in enumerate(full_models):
                rows = table[(table["method"] == method) & (table["full_model"] == full_model)].sort_values(cost)
                if rows.empty:
                    continue
                name = _trace_name(method, full_model, main)
                fig.add_scatter(
                    x=rows[cost], y=rows[score], error_y={"type": "data", "array": rows[f"{score}_std"]},
                    mode="lines+markers+text", text=[f"{k:.0%}" for k in rows["keep"]], textposition="top center",
                    textfont={"size": 9}, name=name, legendgroup=name, showlegend=col == 1,
                    line={"color": METHOD_COLORS.get(method), "dash": DASHES[t_index % len(DASHES)]},
                    hovertemplate=f"{name}<br>keep %{{text}}<br>{cost} %{{x:.4g}}<br>{score} %{{y:.3f}}<extra></extra>",
                    row=1, col=col,
                )
        for _, ref in refs.iterrows():
            name = ref["method"] if ref["method"] != ablation.FULL else _trace_name("full model", ref["full_model"], main)
            fig.add_scatter(x=[ref[cost]], y=[ref[score]], mode="markers", marker={"symbol": "star", "size": 12,
                            "color": METHOD_COLORS.get(ref["method"])}, name=name, legendgroup=name,
                            showlegend=col == 1, row=1, col=col)
            fig.add_hline(y=ref[score], line_dash="dash", line_width=1, line_color=METHOD_COLORS.get(ref["method"]),
                          row=1, col=col)
        candidates = list(methods) + [ablation.FULL, ablation.SMALLER]
        front = table[ablation.pareto_front(table, cost, score, methods=candidates)].sort_values(cost)
        fig.add_scatter(x=front[cost], y=front[score], mode="lines", line={"shape": "hv", "dash": "dot", "color": "black"},
                        name="Pareto frontier", legendgroup="front", showlegend=col == 1, row=1, col=col)
        fig.update_xaxes(title_text=costs[cost], type="log" if log_x else None, row=1, col=col)
    fig.update_yaxes(title_text=y_title or (f"{score} exact match" if score == "overall" else score), row=1, col=1)
    fig.update_layout(title=title, width=400 * len(costs) + 250, height=520)
    return fig


def recovery_curves(curves, title: str, full_model: str = MAIN_FULL_MODEL):
    """Validation agreement (left) and answer NLL (right) against training tokens, from ``ablation.recovery_curves``:
    a line per (method, kept fraction), mean over seeds; colour = method, dash = width."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["agreement with the full model (higher is better)",
                                                        "answer NLL per token (lower is better)"])
    t = curves[curves["full_model"] == full_model]
    keeps = sorted(t["keep"].unique(), reverse=True)
    for method, by_method in t.groupby("method", sort=False):
        for keep, rows in by_method.groupby("keep"):
            mean = rows.groupby("step").mean(numeric_only=True).reset_index()
            name = f"{method}, keep {keep:.0%}"
            for col, y in enumerate(("eval_agreement", "eval_nll"), start=1):
                fig.add_scatter(x=mean["tokens_seen"], y=mean[y], mode="lines+markers", name=name, legendgroup=name,
                                showlegend=col == 1, row=1, col=col,
                                line={"color": METHOD_COLORS.get(method),
                                      "dash": DASHES[keeps.index(keep) % len(DASHES)]})
    fig.update_xaxes(title_text="training tokens seen (prompt + answer)")
    fig.update_layout(title=f"{title}<br><sup>validation split, mean over seeds; step 0 is the untrained decoder</sup>",
                      height=440)
    return fig


def family_curves(table, families: list[str], title: str, full_model: str = MAIN_FULL_MODEL,
                  methods: tuple[str, ...] = ("OverFill", "pruned")):
    """Per task family, exact match against the kept fraction: a line per method (seed std as error bars)
    and the full model's score as a dashed line."""
    from plotly.subplots import make_subplots

    from overfill_lib import ablation

    t = table[table["full_model"] == full_model]
    full = t[t["method"] == ablation.FULL]
    fig = make_subplots(rows=1, cols=len(families), subplot_titles=families, shared_yaxes=True)
    for col, fam in enumerate(families, start=1):
        for method in methods:
            rows = t[t["method"] == method].sort_values("keep")
            fig.add_scatter(x=rows["keep"], y=rows[fam], error_y={"type": "data", "array": rows[f"{fam}_std"]},
                            mode="lines+markers", name=method, legendgroup=method, showlegend=col == 1,
                            line={"color": METHOD_COLORS.get(method)}, row=1, col=col)
        if not full.empty:
            fig.add_hline(y=float(full[fam].iloc[0]), line_dash="dash", line_color="gray", row=1, col=col)
        fig.update_xaxes(title_text="kept fraction", tickformat=".0%", row=1, col=col)
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(title=f"{title}<br><sup>dashed: the full model; error bars: std over seeds</sup>",
                      width=260 * len(families) + 150, height=420)
    return fig


def retention_by_full_model(table, title: str, method: str = "OverFill", score: str = "overall"):
    """The decoder's score as a fraction of its own full model's, against the kept fraction (left) and
    against the decoder's parameter count (right), one line per full model: which axis lines them up?"""
    from plotly.subplots import make_subplots

    from overfill_lib import ablation

    fig = make_subplots(rows=1, cols=2, subplot_titles=["against the kept fraction", "against decoder parameters"],
                        shared_yaxes=True)
    palette = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
    for i, (name, t) in enumerate(table.groupby("full_model", sort=False)):
        full = t[t["method"] == ablation.FULL]
        rows = t[t["method"] == method].sort_values("keep")
        if full.empty or rows.empty or float(full[score].iloc[0]) <= 0:
            continue
        ref = float(full[score].iloc[0])
        label = f"{name} ({int(full['parameters'].iloc[0]):,} params)"
        for col, x in enumerate(("keep", "parameters"), start=1):
            fig.add_scatter(x=rows[x], y=rows[score] / ref, error_y={"type": "data", "array": rows[f"{score}_std"] / ref},
                            mode="lines+markers", name=label, legendgroup=label, showlegend=col == 1,
                            line={"dash": DASHES[i % len(DASHES)], "color": palette[i % len(palette)]},
                            row=1, col=col)
    fig.update_xaxes(title_text="kept fraction", tickformat=".0%", row=1, col=1)
    fig.update_xaxes(title_text="decoder parameters", type="log", row=1, col=2)
    fig.update_yaxes(title_text=f"{method} {score} / its full model's", row=1, col=1)
    fig.update_layout(title=title, height=420)
    return fig


def gap_by_position(positions, title: str):
    """KL to the full model on held-out text by how many continuation tokens the decoder has read, from
    ``recovery.position_frame``: a line per trained (method, kept fraction) with its 95% interval as error bars;
    colour = method, dash = width. Near the prefill OverFill's decoder reads the full model's cache; far from it,
    mostly its own."""
    import plotly.graph_objects as go

    fig = go.Figure()
    trained = positions[positions["trained"] & (positions["keep"] < 1)]
    keeps = sorted(trained["keep"].unique(), reverse=True)
    for (method, keep), rows in trained.groupby(["method", "keep"], sort=False):
        fig.add_scatter(x=rows["positions"], y=rows["kl"], mode="lines+markers", name=f"{method}, keep {keep:.0%}",
                        error_y={"type": "data", "symmetric": False,
                                 "array": [hi - v for (_, hi), v in zip(rows["kl_ci"], rows["kl"])],
                                 "arrayminus": [v - lo for (lo, _), v in zip(rows["kl_ci"], rows["kl"])]},
                        line={"color": METHOD_COLORS.get(method),
                              "dash": DASHES[keeps.index(keep) % len(DASHES)]})
    fig.update_xaxes(title_text="continuation tokens the decoder has read (range)", type="category")
    fig.update_yaxes(title_text="KL to the full model per token")
    fig.update_layout(title=f"{title}<br><sup>held-out test modules; 95% bootstrap intervals over windows</sup>",
                      height=420)
    return fig


def window_recovery(curves, title: str):
    """Validation KL to the full model (left) and agreement with its greedy token (right) against scored training
    tokens, from ``recovery.curves_frame``: a line per (method, kept fraction) and seed; colour = method, dash =
    width; the extra seeds thinner. The full model itself sits at KL 0 and agreement 1."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["KL to the full model per token (lower is better)",
                                                        "agreement with the full model's greedy token"])
    keeps = sorted(curves["keep"].unique(), reverse=True)
    first_seed = curves["seed"].min()
    for (method, keep, seed), rows in curves.groupby(["method", "keep", "seed"], sort=False):
        name = f"{method}, keep {keep:.0%}"
        main = bool(seed == first_seed)
        for col, y in enumerate(("val_kl", "val_agreement"), start=1):
            fig.add_scatter(x=rows["tokens"], y=rows[y], mode="lines+markers" if main else "lines",
                            name=name if main else f"{name}, seed {seed}", legendgroup=name,
                            showlegend=col == 1 and main, row=1, col=col, opacity=1.0 if main else 0.45,
                            line={"color": METHOD_COLORS.get(method), "width": 2 if main else 1,
                                  "dash": DASHES[keeps.index(keep) % len(DASHES)]})
    fig.add_hline(y=1.0, line_dash="dot", line_color=METHOD_COLORS["full model"], row=1, col=2,
                  annotation_text="full model", annotation_position="bottom right")
    fig.update_xaxes(title_text="scored continuation tokens trained on")
    fig.update_layout(title=f"{title}<br><sup>validation modules; token 0 is the untrained decoder; thin lines: other "
                            "seeds</sup>", height=440)
    return fig
