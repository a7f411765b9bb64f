"""Presets: what a run uses (models, data, sizes), as YAML data with strict validation.

A preset is named (``smoke``, ``tiny``, ``llama-3.2-3b``, ...; the YAML files beside this module)
or given as a path to a YAML file of the same shape. Notebooks take it as their one papermill
parameter ``preset``; overrides are nested dicts merged on top.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path


from overfill_lib.artifacts import PROJECT_ROOT, read_mapping, short_repr

PRESET_DIR = Path(__file__).parent / "presets"
SECTIONS = {
    "name": "preset name",
    "description": "one line shown in reports",
    "suite": "synthetic suite config (tasks.SuiteConfig), or null for real-data presets",
    "suite_dir": "where the suite's JSONL splits live (relative to the project root)",
    "teacher": "the full model: {id: local dir or hub id, train: teacher recipe (local only), gguf: a GGUF file in a wheel "
               "(gguf_models.GGUFSource), revision}",
    "smaller": "the 'smaller finetuned' reference: {width_ratio, heads: also narrow attention} (trained here) or {id: hub id}",
    "decoder": "width pruning of the decoder: {hidden, intermediate, heads, round_to, criterion}",
    "calibration": "importance calibration data: {source (suite, wikitext, pydoc), samples, seq_len, batch_size, "
                   "aggregation, skip_loss_samples}",
    "training": "decoder training recipe (OverFill objective and baselines)",
    "distill": "self-distilled chat data the full model writes (pipeline.distilled_data): "
               "{dir, train, validation, test: [passage prompts, family prompts], max_new_tokens, batch_size, seed}",
    "evaluation": "evaluation settings (tasks, limits, batch size)",
    "latency": "latency profiling settings",
    "ablation": "pruning-ratio ablation grid (config.AblationConfig): {keep, objectives, seeds, scratch_keep, teachers, ...}",
    "recovery": "long runs on text windows to a plateau (config.RecoveryConfig): {keep, objectives, seeds, tokens, "
                "eval_every, window, context, teacher_topk, batch_size, learning_rate, ...}",
    "runtime": "{dtype, device}",
    "workdir": "where derived artifacts go (relative to the project root)",
}


# The dataclass that parses each section (``config.parse``), imported when a preset gives the section.
SECTION_TYPES = {
    "suite": "overfill_lib.tasks:SuiteConfig",
    "teacher": "overfill_lib.config:TeacherSection",
    "smaller": "overfill_lib.config:SmallerSection",
    "decoder": "overfill_lib.config:DecoderSection",
    "calibration": "overfill_lib.config:CalibrationSection",
    "training": "overfill_lib.training:TrainingConfig",
    "distill": "overfill_lib.config:DistillSection",
    "evaluation": "overfill_lib.config:EvaluationSection",
    "latency": "overfill_lib.latency:LatencySettings",
    "ablation": "overfill_lib.config:AblationConfig",
    "runtime": "overfill_lib.config:RuntimeSection",
    "recovery": "overfill_lib.config:RecoveryConfig",
}
NESTED_TYPES = {("teacher", "train"): "overfill_lib.teacher:TeacherConfig",
                ("teacher", "gguf"): "overfill_lib.gguf_models:GGUFSource"}
TEXT_SECTIONS = ("name", "description", "suite_dir", "workdir")


def _section_type(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _checked(raw: dict) -> dict:
    """Every section parsed by its dataclass, so a wrong key or type fails here, not an hour into a run; the
    values read (numbers YAML left as strings, single values for lists) replace the raw ones."""
    from overfill_lib.config import values

    out = dict(raw)
    for key in TEXT_SECTIONS:
        if out.get(key) is not None and not isinstance(out[key], str):
            raise ValueError(f"preset {key} must be a string, got {out[key]!r}")
    for section, spec in SECTION_TYPES.items():
        if out.get(section) is None:
            continue
        out[section] = values(_section_type(spec), out[section], section)
        for (parent, key), nested in NESTED_TYPES.items():
            if parent == section and out[section].get(key) is not None:
                out[section][key] = values(_section_type(nested), out[section][key], f"{section}.{key}")
    return out


def available() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _deep_merge(base: dict, override: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Preset:
    name: str
    raw: dict = field(repr=False)

    def __getitem__(self, section: str):
        return self.raw.get(section)

    def get(self, section: str, default=None):
        value = self.raw.get(section)
        return default if value is None else value

    def path(self, relative: str | os.PathLike) -> Path:
        """Resolve a preset path against the project root (absolute paths pass through)."""
        p = Path(relative)
        return p if p.is_absolute() else PROJECT_ROOT / p

    @property
    def workdir(self) -> Path:
        return self.path(self.raw.get("workdir") or f"artifacts/{self.name}")

    @property
    def suite_dir(self) -> Path | None:
        return self.path(self.raw["suite_dir"]) if self.raw.get("suite_dir") else None

    @property
    def is_offline_default(self) -> bool:
        return self.raw.get("suite") is not None

    def suite_config(self):
        from overfill_lib.tasks import SuiteConfig

        if self.raw.get("suite") is None:
            raise ValueError(f"preset {self.name!r} has no synthetic suite; it evaluates real tasks through lm-eval")
        return SuiteConfig.from_dict(self.raw["suite"])

    def teacher_config(self):
        from overfill_lib.teacher import TeacherConfig

        train = (self.raw.get("teacher") or {}).get("train")
        if train is None:
            raise ValueError(f"preset {self.name!r} uses a pretrained teacher; there is no local recipe to train")
        return TeacherConfig.from_dict(train)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)


def load_preset(preset: str | os.PathLike | Preset, overrides: dict | None = None) -> Preset:
    """Load a named preset or a YAML file, apply overrides, and check every section (``config.parse``)."""
    if isinstance(preset, Preset):
        raw = preset.to_dict()
    else:
        text = str(preset)
        candidate = Path(text)
        if text.endswith((".yaml", ".yml")) or candidate.is_file():
            if not candidate.is_file():
                raise ValueError(f"preset file {text!r} does not exist")
            raw = read_mapping(candidate.read_text(), f"preset file {text}", "a mapping of preset sections")
            raw.setdefault("name", candidate.stem)
        elif (PRESET_DIR / f"{text}.yaml").is_file():
            raw = read_mapping((PRESET_DIR / f"{text}.yaml").read_text(), f"preset {text}")
        else:
            raise ValueError(f"unknown preset {text!r}; valid presets: {', '.join(available())} (or a path to a .yaml file)")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a mapping of preset sections (e.g. {{'training': {{'steps': 5}}}}), got "
                         f"{type(overrides).__name__} {short_repr(overrides)}")
    if overrides:
        raw = _deep_merge(raw, overrides)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        valid = "\n".join(f"  {k}: {v}" for k, v in SECTIONS.items())
        raise ValueError(f"unknown preset section(s) {unknown}; valid sections:\n{valid}")
    if not isinstance(raw.get("teacher"), dict) or not raw["teacher"].get("id"):
        raise ValueError(f"preset {raw.get('name')!r} needs teacher.id (a local directory or a hub model id)")
    return Preset(name=str(raw["name"]), raw=_checked(raw))
