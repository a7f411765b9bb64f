"""The batch run behind ``make run``: every notebook of the series, in order, through papermill.

Each run gets ``runs/<preset>-<timestamp>/`` with the executed notebooks, self-contained HTML
renders and an ``index.html`` listing each notebook's status and duration. A notebook whose
source, parameters and library code are unchanged since its last successful run (for the same
preset) is skipped unless ``--force``; a failing notebook stops the run, keeps its partial
output and reports the failing cell.

    python -m overfill_lib.runner --preset tiny
    python -m overfill_lib.runner --preset smoke --only 00 01 --force
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from overfill_lib.artifacts import PROJECT_ROOT, atomic_write_text, read_json, write_json
from overfill_lib.artifacts import read_mapping, read_yaml
from overfill_lib.presets import load_preset
from overfill_lib.workbook import check_parameters, missing_sections

log = logging.getLogger(__name__)
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
RENAMED_NOTEBOOKS = {"00_teacher": "00_full_model"}  # --only still takes a notebook's old name, with a message
RUNS_DIR = PROJECT_ROOT / "runs"
KERNEL = "python3"


def patient_kernel_waits() -> None:
    """Make the kernel client wait for replies in 1-second polls instead of one unbounded poll.

    nbclient waits for a cell's reply and outputs with ``get_msg(timeout=None)``, one unbounded poll on an
    asyncio zmq socket. On this stack that poll now and then never wakes although the message has arrived,
    most often right after a cell's widget traffic (jupyter/nbclient#312): the kernel sits idle and the run
    hangs forever (seen twice in a day of test runs, in the widget cells of notebooks 00 and 02). A poll
    with a timeout re-checks the socket, so a missed wake-up costs at most a second.
    """
    from queue import Empty

    from jupyter_client.channels import AsyncZMQSocketChannel

    original = AsyncZMQSocketChannel.get_msg
    if getattr(original, "patient", False):
        return

    async def get_msg(self, timeout: float | None = None):
        if timeout is not None:
            return await original(self, timeout)
        while True:
            try:
                return await original(self, 1.0)
            except Empty:
                continue

    get_msg.patient = True
    AsyncZMQSocketChannel.get_msg = get_msg


def notebooks(only: list[str] | None = None, directory: Path = NOTEBOOK_DIR) -> list[Path]:
    found = sorted(p for p in directory.glob("[0-9][0-9]_*.ipynb"))
    if only:
        for old in set(only) & set(RENAMED_NOTEBOOKS):
            log.warning("notebook %s is now %s; rename it in --only", old, RENAMED_NOTEBOOKS[old])
        wanted = [RENAMED_NOTEBOOKS.get(o, o.zfill(2) if o.isdigit() else o) for o in only]
        found = [p for p in found if any(p.name.startswith(w) or p.stem == w for w in wanted)]
        if not found:
            raise ValueError(f"no notebook matches {only}; available: {[p.stem for p in notebooks()]}")
    return found


def _fingerprint(notebook: Path, parameters: dict) -> str:
    """Hash of what a notebook's result depends on: its source, its parameters, the library, the preset files."""
    h = hashlib.sha256()
    h.update(notebook.read_bytes())
    h.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    lib = PROJECT_ROOT / "overfill_lib"
    for p in sorted(lib.rglob("*")):
        if p.is_file() and p.suffix in {".py", ".yaml", ".json"}:
            h.update(p.relative_to(lib).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# The lab template and plotly's notebook renderer add scripts from a CDN (require.js, MathJax) that these reports do
# not need; offline, each would be a failed load in the reader's console.
REMOTE_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>')


def render_html(executed: Path) -> Path:
    """Self-contained HTML that needs no network (plotly figures embed their library through the notebook renderer)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    # A widget view needs a live kernel (or JavaScript from a CDN); batch runs print each widget's default state.
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return atomic_write_text(executed.with_suffix(".html"), REMOTE_SCRIPT.sub("", body))


@dataclass
class Outcome:
    notebook: str
    status: str  # ok | skipped | failed | not run
    seconds: float = 0.0
    error: str = ""


def _error_of(exc: Exception) -> str:
    # papermill's PapermillExecutionError carries the failing cell's index and traceback.
    parts = [type(exc).__name__]
    for attr in ("exec_count", "ename", "evalue"):
        if getattr(exc, attr, None) is not None:
            parts.append(f"{attr}={getattr(exc, attr)}")
    return " ".join(parts) + f"\n{exc}"


def write_index(run_dir: Path, preset: str, outcomes: list[Outcome]) -> Path:
    rows = "\n".join(
        f"<tr><td><a href='{html.escape(o.notebook)}.html'>{html.escape(o.notebook)}</a></td>"
        f"<td class='{o.status}'>{o.status}</td><td>{o.seconds:.1f}</td>"
        f"<td><pre>{html.escape(o.error[-2000:])}</pre></td></tr>"
        for o in outcomes
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>overfill run: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 12px;text-align:left;vertical-align:top}}
.ok{{color:#1a7f37}} .failed{{color:#cf222e}} .skipped{{color:#6e7781}} pre{{margin:0;white-space:pre-wrap}}</style></head>
<body><h1>overfill run <code>{html.escape(run_dir.name)}</code></h1><p>preset: <b>{html.escape(preset)}</b></p>
<table><tr><th>notebook</th><th>status</th><th>seconds</th><th>error</th></tr>
{rows}</table></body></html>
"""
    write_json(run_dir / "run.json", {"preset": preset, "notebooks": [o.__dict__ for o in outcomes]})
    return atomic_write_text(run_dir / "index.html", page)


def run_series(
    preset: str = "tiny",
    parameters: dict | None = None,
    only: list[str] | None = None,
    force: bool = False,
    run_dir: Path | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    log_output: bool = False,
) -> tuple[Path, list[Outcome]]:
    """Execute the series; return the run directory and one outcome per notebook.

    ``log_output``: echo each notebook's log lines (training runs, evaluations) to this process's log
    as they happen, so long cells show progress on the console and not only in the executed notebook.
    """
    import papermill

    patient_kernel_waits()
    parameters = {"preset": preset, **(parameters or {})}
    selected = notebooks(only, notebook_dir)
    for nb in selected:
        check_parameters(nb, parameters)
    if run_dir is None:  # a fresh folder per run, even for two runs started in the same second
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix=f"{Path(str(preset)).stem}-{stamp}-", dir=RUNS_DIR))
        os.chmod(run_dir, 0o755)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = RUNS_DIR / f".state-{Path(str(preset)).stem}.json"
    state = read_json(state_path) if state_path.exists() else {}
    outcomes = [Outcome(nb.stem, "not run") for nb in selected]
    env = {"OVERFILL_BATCH": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ.update(env)
    upstream_ran = False  # once a notebook reruns, the ones after it read fresh artifacts: rerun them too
    spec = load_preset(preset, parameters.get("overrides"))
    for i, nb in enumerate(selected):
        missing = missing_sections(spec, nb.stem)
        if missing:
            outcomes[i] = Outcome(nb.stem, "skipped", error=f"preset {spec.name!r} has no {' / '.join(missing)} section")
            log.info("%s skipped: %s", nb.stem, outcomes[i].error)
            write_index(run_dir, str(preset), outcomes)
            continue
        fingerprint = _fingerprint(nb, parameters)
        if not force and not upstream_ran and state.get(nb.stem) == fingerprint:
            outcomes[i] = Outcome(nb.stem, "skipped")
            log.info("%s unchanged since its last successful run: skipped (use --force to rerun)", nb.stem)
            write_index(run_dir, str(preset), outcomes)
            continue
        upstream_ran = True
        out = run_dir / nb.name
        log.info("running %s -> %s", nb.name, out)
        t0 = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(nb), str(out), parameters=parameters, kernel_name=KERNEL, cwd=str(nb.parent), progress_bar=True,
                log_output=log_output,
            )
        except Exception as exc:  # keep the partial notebook, render it, and stop the series
            outcomes[i] = Outcome(nb.stem, "failed", time.perf_counter() - t0, _error_of(exc))
            if out.exists():
                render_html(out)
            write_index(run_dir, str(preset), outcomes)
            log.error("%s failed; partial output in %s\n%s", nb.name, out, outcomes[i].error)
            return run_dir, outcomes
        outcomes[i] = Outcome(nb.stem, "ok", time.perf_counter() - t0)
        render_html(out)
        state[nb.stem] = fingerprint
        write_json(state_path, state)
        write_index(run_dir, str(preset), outcomes)
    log.info("run complete: %s", run_dir / "index.html")
    return run_dir, outcomes


def parameters_of(args) -> dict:
    """The notebook parameters of the command line: ``-f`` file, then ``-y`` mapping, then each ``-p`` (read as YAML,
    so "false" is False: papermill's -p keeps it a string, which Python takes as true)."""
    params = {}
    if args.parameters_file:
        path = Path(args.parameters_file)
        if not path.is_file():
            raise ValueError(f"-f {path}: no such file")
        params = read_mapping(path.read_text(), f"-f {path}", "a YAML mapping of notebook parameters")
    if args.yaml:
        params |= read_mapping(args.yaml, f"-y {args.yaml!r}", "a YAML mapping of notebook parameters")
    params |= {name: read_yaml(value, f"-p {name}") for name, value in args.parameter}
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="preset name or path to a preset YAML")
    parser.add_argument("-f", "--parameters-file", help="YAML of extra notebook parameters (papermill -f)")
    parser.add_argument("--only", nargs="*", help="notebook numbers or names to run (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun notebooks even when unchanged")
    parser.add_argument("--run-dir", type=Path, help="where to write executed notebooks (default runs/<preset>-<time>)")
    parser.add_argument("--quiet", action="store_true", help="show only each cell's progress, not the notebooks' log lines")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter, its value read as YAML (false, 3, 1e-3, [0, 1]), as papermill -p")
    parser.add_argument("-y", "--yaml", help="notebook parameters as a YAML mapping, as papermill -y")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        params = parameters_of(args)
        preset = params.pop("preset", args.preset)
        load_preset(preset, params.get("overrides"))  # fail fast on a bad preset or overrides, before any kernel starts
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    run_dir, outcomes = run_series(preset, params, args.only, args.force, args.run_dir, log_output=not args.quiet)
    print(f"run folder: {run_dir}\nindex: {run_dir / 'index.html'}")
    for o in outcomes:
        print(f"  {o.notebook:32s} {o.status:8s} {o.seconds:7.1f}s")
    return 0 if all(o.status in {"ok", "skipped"} for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
