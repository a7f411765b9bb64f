"""What every notebook does first: load the preset, set up plotting and logging, know where outputs go.

One call per notebook keeps the notebooks free of repeated set-up cells::

    wb = workbook.setup(preset, overrides, notebook="01_channel_importance")
    wb.save_figure(fig, "importance_heatmap")
    wb.save_results({...})
"""

from __future__ import annotations

import logging
import random
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from overfill_lib.artifacts import PROJECT_ROOT, environment_record, write_json
from overfill_lib.presets import Preset, load_preset

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Workbook:
    preset: Preset
    notebook: str
    figures_dir: Path
    results_dir: Path

    @property
    def workload(self):
        """The preset's ``workloads.Workload``: its data, scorers and what quality means (imported on first use: the
        runner reads this module without loading models)."""
        from overfill_lib import workloads

        return workloads.for_preset(self.preset)

    def save_figure(self, fig, name: str) -> Path:
        """Write ``<notebook>_<name>.html`` (plotly.js beside it, once per folder, so it works offline)
        and, where a Chromium is available for kaleido, a PNG."""
        from overfill_lib.plots import save_figure

        return save_figure(fig, self.figures_dir / f"{self.notebook}_{name}")

    def show(self, shown) -> None:
        """Display one notebook section (``workloads.Shown``): its tables, its figures (each saved first, as
        :meth:`save_figure` names them) and its lines of text. An empty section shows nothing."""
        from IPython.display import display

        for table in shown.tables:
            display(table)
        for name, fig in shown.figures.items():
            self.save_figure(fig, name)
            fig.show()
        for line in shown.text:
            print(line)

    def save_results(self, results: dict, name: str | None = None, seed: int | None = None) -> Path:
        """Write the notebook's results JSON, with the preset and the environment recorded."""
        path = self.results_dir / f"{name or self.notebook}.json"
        record = {
            "notebook": self.notebook,
            "preset": self.preset.to_dict(),
            "environment": environment_record(self.preset.runtime.device, seed),
            **results,
        }
        write_json(path, record)
        log.info("results written to %s", path)
        return path


# Preset sections a notebook cannot run without (beyond the full model every notebook needs).
NOTEBOOK_NEEDS = {
    "02_decoder_training": ("training",),
    "04_pruning_ratio_ablation": ("training", "ablation"),
}


# Notebook parameters renamed with the full model (docs/names.md): refused, naming the new one.
RENAMED_PARAMETERS = {"teachers": "full_models"}


def check_parameters(notebook: str | Path, parameters: Mapping, *, known_only: bool = True) -> None:
    """Refuse a parameter the notebook does not declare (papermill would only warn) or whose value has not its
    default's type: papermill's ``-p retrain false`` passes the string "false", which Python takes as true.
    ``known_only=False``: check the declared names found in ``parameters`` (a notebook's ``globals()``)."""
    import ast

    import papermill

    path = Path(notebook) if str(notebook).endswith(".ipynb") else PROJECT_ROOT / "notebooks" / f"{notebook}.ipynb"
    with warnings.catch_warnings():  # nbformat asks for cell ids the stored notebooks do not carry
        warnings.simplefilter("ignore")
        declared = papermill.inspect_notebook(str(path))
    unknown = sorted(set(parameters) - set(declared))
    if unknown and known_only:
        renamed = "".join(f"; {old} is now {RENAMED_PARAMETERS[old]}" for old in unknown if old in RENAMED_PARAMETERS)
        raise ValueError(f"{path.name}: unknown parameter(s) {unknown}; valid parameters: {sorted(declared)}{renamed}")
    for name, value in ((k, v) for k, v in parameters.items() if k in declared):
        try:
            default = ast.literal_eval(declared[name]["default"])
        except (ValueError, SyntaxError):
            continue  # not a literal: nothing to compare with
        kind = type(default)
        if default is None or value is None or kind not in (bool, int, float, str):
            continue
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = (isinstance(value, bool) if kind is bool else (numeric and (kind is float or isinstance(value, int)))
              if kind in (int, float) else isinstance(value, str))
        if not ok:
            hint = (" (papermill -p reads only True/False as booleans: -p NAME True, or -y 'NAME: true')"
                    if kind is bool and isinstance(value, str) else "")
            raise ValueError(f"{path.name}: parameter {name} expects {kind.__name__} like its default "
                             f"{declared[name]['default']}, got {value!r} ({type(value).__name__}){hint}")


def missing_sections(preset: Preset, notebook: str) -> list[str]:
    """The sections ``notebook`` needs that ``preset`` leaves empty (the runner skips such notebooks)."""
    return [s for s in NOTEBOOK_NEEDS.get(notebook, ()) if not preset.has(s)]


def setup(preset: str, overrides: dict | None = None, *, notebook: str, seed: int = 0,
          parameters: Mapping | None = None) -> Workbook:
    """Load and check the preset (and, given the notebook's ``globals()``, its parameters' types), set up logging,
    plotting, seeds and the output folders."""
    from overfill_lib.plots import configure_plotly

    if parameters is not None:
        check_parameters(notebook, parameters, known_only=False)

    # On stdout: in a rendered notebook the library's log lines read as plain output, not as pink stderr blocks.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True, stream=sys.stdout)
    for noisy in ("httpx", "urllib3", "filelock", "kaleido"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kaleido's browser driver logs a traceback at ERROR for a Chromium pipe message it then ignores; a PNG export
    # that really fails raises from write_image.
    logging.getLogger("choreographer").setLevel(logging.CRITICAL)
    p = load_preset(preset, overrides)
    missing = missing_sections(p, notebook)
    if missing:
        raise ValueError(f"notebook {notebook} needs the preset's {' and '.join(missing)} section(s), which preset "
                         f"{p.name!r} leaves empty; run it on a preset that has them (e.g. tiny), or add them")
    configure_plotly()
    seed_everything(seed)
    sub = p.name
    wb = Workbook(p, notebook, PROJECT_ROOT / "figures" / sub, PROJECT_ROOT / "results" / sub)
    wb.figures_dir.mkdir(parents=True, exist_ok=True)
    wb.results_dir.mkdir(parents=True, exist_ok=True)
    return wb
