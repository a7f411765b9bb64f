"""The workbook in a real browser: a notebook run through JupyterLab's UI, and the shared HTML reports offline.

Chromium is Debian's (``apt-get install chromium``; ``make test`` installs it where it can), driven by Playwright
through its executable path: nothing downloads a browser. Without one these tests skip, saying how to enable them,
unless ``OVERFILL_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where a missing browser is a failure. On a failed check
a screenshot of the page is written to ``runs/browser-tests/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from overfill_lib.artifacts import PROJECT_ROOT

pytestmark = pytest.mark.browser
SCREENSHOTS = PROJECT_ROOT / "runs" / "browser-tests"
WIDGET_TROUBLE = ("Loading widget...", "Error displaying widget", "Click to show javascript error")


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def browser():
    path = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        path = None
    if path is None:
        message = ("no Chromium (or no playwright): `apt-get install chromium` as root (make test does it where it can) "
                   "and `pip install -e .[dev]` enable the browser tests")
        if os.environ.get("OVERFILL_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        found = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield found
        found.close()


def shot(page, name: str) -> str:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return f" (screenshot: {path})"


# --------------------------------------------------------------------------------------------------
# What a rendered page must show
# --------------------------------------------------------------------------------------------------


def figure_problems(page) -> list[str]:
    """Plotly figures on the page that did not draw (a figure div without its SVG)."""
    counts = page.evaluate("""() => {
        const plots = [...document.querySelectorAll('.js-plotly-plot')];
        return {plots: plots.length, drawn: plots.filter(p => p.querySelector('svg.main-svg')).length};
    }""")
    problems = [] if counts["plots"] == counts["drawn"] else [f"{counts['plots'] - counts['drawn']} figure(s) without SVG"]
    return problems if counts["plots"] else problems + ["no plotly figure on the page"]


def widget_problems(page) -> list[str]:
    """Widget outputs of the open notebook that show an error or a placeholder, or hold no rendered widget view (a
    widget JupyterLab cannot load is shown as its text repr instead)."""
    text = page.inner_text("body")
    problems = [t for t in WIDGET_TROUBLE if t in text]
    counts = page.evaluate("""() => {
        let expected = 0;
        for (const cell of window.jupyterapp.shell.currentWidget.content.widgets) {
            const outputs = cell.model.type === 'code' ? cell.model.outputs : null;
            for (let i = 0; outputs && i < outputs.length; i++) {
                if ('application/vnd.jupyter.widget-view+json' in outputs.get(i).data) expected++;
            }
        }
        return {expected, rendered: document.querySelectorAll('.jp-OutputArea-output > .jupyter-widgets').length};
    }""")
    if counts["rendered"] < counts["expected"]:
        problems.append(f"{counts['expected'] - counts['rendered']} of {counts['expected']} widget outputs not rendered")
    if not counts["expected"]:
        problems.append("no widget output")
    return problems


def python_problems(text: str) -> list[str]:
    """A traceback or a Python warning shown to the reader."""
    return [m.group(0) for m in re.finditer(r"Traceback \(most recent call last\)|\b\w+Warning: .{0,80}", text)]


# --------------------------------------------------------------------------------------------------
# JupyterLab
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab from this environment on a free port with a token, serving a folder of test notebooks."""
    root = tmp_path_factory.mktemp("lab")
    nb = json.loads((PROJECT_ROOT / "notebooks" / "01_channel_importance.ipynb").read_text())
    params = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    params["source"] = [line.replace('preset = "tiny"', 'preset = "smoke"') for line in params["source"]]
    (root / "01_smoke.ipynb").write_text(json.dumps(nb))
    (root / "broken.ipynb").write_text(json.dumps(_broken_notebook() | {"metadata": nb["metadata"]}))
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "OVERFILL_BATCH" and not k.startswith("PAPERMILL")}
    env |= {"JUPYTER_CONFIG_DIR": str(root / ".config"), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
            "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    # Every cell stays in the page (JupyterLab 4 otherwise unrenders the cells scrolled out of view).
    settings = root / ".settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"windowingMode": "none"}))
    log = (root / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: the notebook's outputs, for widget_problems
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _broken_notebook() -> dict:
    """A widget whose front-end module does not exist, and an empty figure (which draws: its axes)."""
    source = (
        "import plotly.graph_objects as go\n"
        "from ipywidgets import DOMWidget\n"
        "from IPython.display import display\n"
        "from traitlets import Unicode\n\n"
        "class Broken(DOMWidget):\n"
        "    _view_name = Unicode('BrokenView').tag(sync=True)\n"
        "    _model_name = Unicode('BrokenModel').tag(sync=True)\n"
        "    _view_module = Unicode('no-such-widget-module').tag(sync=True)\n"
        "    _model_module = Unicode('no-such-widget-module').tag(sync=True)\n\n"
        "display(Broken())\n"
        "go.Figure().show(renderer='plotly_mimetype')\n"
    )
    cell = {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": source}
    return {"cells": [cell], "nbformat": 4, "nbformat_minor": 5}


def run_all(page, url: str, token: str, name: str, timeout_s: float) -> None:
    """Open ``name`` in JupyterLab and run every cell through the Run menu; wait until each code cell has run."""
    # A workspace of its own, reset: only this notebook is open.
    page.goto(f"{url}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
    with contextlib.suppress(Exception):  # JupyterLab may ask which kernel to start: the notebook's own
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=5_000)
    page.wait_for_function("() => document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset?.status === 'idle'"
                           " || document.body.innerText.includes('Idle')", timeout=60_000)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    try:
        page.wait_for_function("""() => {
            const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
            const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(p => p.innerText.trim());
            return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p));
        }""", timeout=timeout_s * 1000)
    except Exception as e:
        raise AssertionError(f"{name}: not every cell ran within {timeout_s:.0f} s" + shot(page, f"lab-{name}")) from e


def cell_error(text: str) -> bool:
    """An output that shows an exception: a traceback, or a first line that is an exception's name and message.
    A log line that mentions one (the library's INFO that PNG export was skipped, say) is not a cell error."""
    return "Traceback (most recent call last)" in text or bool(re.match(r"[\w.]*(Error|Exception)\b", text))


@pytest.mark.xdist_group("lab")
def test_jupyterlab_runs_notebook_01_and_its_widget_responds(browser, lab):
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    run_all(page, url, token, "01_smoke.ipynb", timeout_s=900)
    page.wait_for_timeout(2000)  # widget views render after the kernel's comm messages
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    failed = [t[:300] for t in outputs if cell_error(t)]
    assert not failed, f"cell errors: {failed}" + shot(page, "lab-cell-errors")
    assert not figure_problems(page), f"figures: {figure_problems(page)}" + shot(page, "lab-figures")
    assert not widget_problems(page), f"widgets: {widget_problems(page)}" + shot(page, "lab-widgets")

    # The pruning slider: moving it recomputes the pruned model's description in the panel's output.
    panel = page.locator(".widget-vbox", has=page.locator(".widget-slider")).first
    text = panel.locator(".jp-OutputArea-output, .widget-output").first
    before = text.inner_text()
    assert "removed" in before, f"slider panel shows {before!r}" + shot(page, "lab-slider")
    panel.locator(".widget-slider .noUi-handle, .widget-slider [role=slider]").first.focus()
    page.keyboard.press("ArrowRight")
    try:
        page.wait_for_function("([el, old]) => el.innerText !== old && el.innerText.includes('removed')",
                               arg=[text.element_handle(), before], timeout=60_000)
    except Exception as e:
        raise AssertionError(f"the slider's output did not change from {before!r}" + shot(page, "lab-slider")) from e
    assert text.inner_text() != before
    assert not errors, f"page errors: {errors}"


@pytest.mark.xdist_group("lab")
def test_the_checks_fail_on_a_broken_widget_and_an_undrawn_figure(browser, lab):
    url, token = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    run_all(page, url, token, "broken.ipynb", timeout_s=300)
    page.wait_for_timeout(3000)
    # ipywidgets shows a widget whose front end cannot load as an error box ("Click to show javascript error.").
    problems = widget_problems(page)
    assert problems == ["Click to show javascript error"], f"a widget without its front end passed: {problems}" + shot(
        page, "lab-broken")
    page.set_content("<div class='js-plotly-plot'></div>")  # a figure div plotly never drew into
    assert figure_problems(page) == ["1 figure(s) without SVG"]
    assert python_problems("x\n/usr/lib/foo.py:3: FutureWarning: past_key_values is deprecated")


# --------------------------------------------------------------------------------------------------
# The shared reports of a smoke run
# --------------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("notebooks")  # shares the smoke run with test_notebooks
def test_reports_render_offline_with_figures_and_no_warnings(browser, smoke_run):
    run_dir = smoke_run
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    blocked = []

    def block(route):
        blocked.append(route.request.url)
        route.abort()

    context.route(re.compile(r"^https?://"), block)  # offline: anything fetched from a network fails
    page = context.new_page()
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    page.goto((run_dir / "index.html").as_uri())
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    assert links, "index.html links nothing" + shot(page, "report-index")
    pages = []
    for href in links:
        assert href.startswith("file://"), f"index.html links outside the run: {href}"
        target = Path(urllib.request.url2pathname(href.removeprefix("file://").split("#")[0]))
        assert target.is_file(), f"index.html links a missing file: {target}"
        if target.suffix == ".html":
            pages.append(target)
    assert {p.stem for p in pages} >= {p.stem for p in run_dir.glob("0*.ipynb")}
    for html in pages:
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        page.wait_for_timeout(500)
        if page.locator(".js-plotly-plot").count() or "plotly" in html.read_text():
            assert not figure_problems(page), f"{html.name}: {figure_problems(page)}" + shot(page, f"report-{html.stem}")
        shown = python_problems(page.inner_text("body"))
        assert not shown, f"{html.name} shows {shown}" + shot(page, f"report-{html.stem}")
        if html.stem.startswith("02_"):
            headers = page.eval_on_selector_all("th", "els => els.map(e => e.innerText.trim())")
            assert "Training Loss" not in headers, "notebook 02 shows the Trainer's per-step table"
    assert not console, f"console errors: {console[:5]}"
    assert not blocked, f"the reports fetched from the network: {blocked[:5]}"
