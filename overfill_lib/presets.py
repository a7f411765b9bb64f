"""Presets: what a run uses (models, data, sizes), as YAML data with strict validation.

A preset is named (``smoke``, ``tiny``, ``llama-3.2-3b``, ...; the YAML files beside this module)
or given as a path to a YAML file of the same shape. Notebooks take it as their one papermill
parameter ``preset``; overrides are nested dicts merged on top.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from overfill_lib.artifacts import PROJECT_ROOT, read_mapping, short_repr

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent / "presets"
SECTIONS = {
    "name": "preset name",
    "description": "one line shown in reports",
    "suite": "synthetic suite config (tasks.SuiteConfig), or null for real-data presets",
    "suite_dir": "where the suite's JSONL splits live (relative to the project root)",
    "full_model": "the model that prefills: {id: local dir or hub id, train: its recipe (local only, "
                  "full_model.FullModelConfig), gguf: a GGUF file in a wheel (gguf_models.GGUFSource), revision}",
    "smaller": "the smaller model, the paper's 'smaller finetuned' reference: {width_ratio, heads: also narrow attention} "
               "(trained here) or {id: hub id}",
    "decoder": "width pruning of the decoder: {hidden, intermediate, heads, round_to, criterion}",
    "calibration": "importance calibration data: {source (suite, wikitext, pydoc), samples, seq_len, batch_size, "
                   "aggregation, skip_loss_samples}",
    "training": "decoder training recipe (config.TrainingConfig: OverFill objective and baselines)",
    "distill": "self-distilled chat data the full model writes (pipeline.distilled_data): "
               "{dir, train, validation, test: [passage prompts, family prompts], max_new_tokens, batch_size, seed}",
    "evaluation": "evaluation settings (tasks, limits, batch size)",
    "latency": "latency profiling settings",
    "ablation": "pruning-ratio ablation grid (config.AblationConfig): {keep, objectives, seeds, scratch_keep, full_models, ...}",
    "recovery": "long runs on text windows to a plateau (config.RecoveryConfig): {keep, objectives, seeds, tokens, "
                "eval_every, window, context, teacher_topk, batch_size, learning_rate, ...}",
    "runtime": "{dtype, device}",
    "workdir": "where derived artifacts go (relative to the project root)",
}


# The dataclass that parses each section (``config.parse``), imported when a preset loads: the preset's schema.
SECTION_TYPES = {
    "suite": "overfill_lib.tasks:SuiteConfig",
    "full_model": "overfill_lib.config:FullModelSection",
    "smaller": "overfill_lib.config:SmallerSection",
    "decoder": "overfill_lib.config:DecoderSection",
    "calibration": "overfill_lib.config:CalibrationSection",
    "training": "overfill_lib.config:TrainingConfig",
    "distill": "overfill_lib.config:DistillSection",
    "evaluation": "overfill_lib.config:EvaluationSection",
    "latency": "overfill_lib.latency:LatencySettings",
    "ablation": "overfill_lib.config:AblationConfig",
    "runtime": "overfill_lib.config:RuntimeSection",
    "recovery": "overfill_lib.config:RecoveryConfig",
}
NESTED_TYPES = {("full_model", "train"): "overfill_lib.full_model:FullModelConfig",
                ("full_model", "gguf"): "overfill_lib.gguf_models:GGUFSource"}
TEXT_SECTIONS = ("name", "description", "suite_dir", "workdir")
# Sections a preset may leave out: None (no such thing: a pretrained model has no synthetic suite), else the
# section's defaults (its dataclass with no keys given).
OPTIONAL = ("suite", "full_model", "smaller", "distill", "recovery")
# Names a preset file or overrides may still use, read under their new names with one message each (the section of
# the model that prefills was ``teacher`` before "teacher" was kept for a distillation teacher): (parent section or
# None for the top level, old name, new name).
RENAMED_KEYS = ((None, "teacher", "full_model"), ("ablation", "teachers", "full_models"))
# Preset attributes renamed with them, still readable with a DeprecationWarning (Preset.__getattr__).
_RENAMED_ATTRIBUTES = {"teacher": "full_model", "teacher_config": "full_model_config"}


def _section_type(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _parse_section(spec: str, data, where: str):
    """``(typed, plain)``: the section's dataclass, and the keys the preset gave with the values read (lists for
    tuples, as YAML and JSON write them): the plain form records and run fingerprints keep."""
    from overfill_lib.config import parse, plain

    typed = parse(_section_type(spec), data, where)
    if hasattr(typed, "validate"):  # latency.LatencySettings checks its values after construction
        typed.validate()
    return typed, {key: plain(getattr(typed, key)) for key in (data or {})}


def _checked(raw: dict) -> tuple[dict, dict]:
    """``(plain, typed)``: every section parsed by its dataclass, so a wrong key or type fails here, not an hour
    into a run; ``plain`` is the preset with the values read (numbers YAML left as strings, single values for
    lists) in place of the raw ones, ``typed`` maps each given section to its dataclass."""
    from dataclasses import replace

    out, typed = dict(raw), {}
    for key in TEXT_SECTIONS:
        if out.get(key) is not None and not isinstance(out[key], str):
            raise ValueError(f"preset {key} must be a string, got {out[key]!r}")
    for section, spec in SECTION_TYPES.items():
        if out.get(section) is None:
            continue
        typed[section], out[section] = _parse_section(spec, out[section], section)
        for (parent, key), nested in NESTED_TYPES.items():
            if parent == section and out[section].get(key) is not None:
                value, out[section][key] = _parse_section(nested, out[section][key], f"{section}.{key}")
                typed[section] = replace(typed[section], **{key: value})
    return out, typed


def _rename_key(mapping: dict, old: str, new: str) -> dict:
    """``mapping`` with key ``old`` called ``new``, in its place (a recorded preset keeps its section order)."""
    return {new if key == old else key: value for key, value in mapping.items()}


def legacy_names(raw: dict, where: str) -> tuple[dict, list[tuple[str, str, str]]]:
    """``raw`` (a preset file's mapping, overrides, or a preset a record kept) with the old names of
    ``RENAMED_KEYS`` read as the new ones, and ``(what, old, new)`` for each renamed (``("section", "teacher",
    "full_model")``). Both names at once are refused: which one was meant cannot be told."""
    found = []
    for parent, old, new in RENAMED_KEYS:
        holder = raw if parent is None else raw.get(parent)
        if not isinstance(holder, dict) or old not in holder:
            continue
        what, before, after = ("section", old, new) if parent is None else ("key", f"{parent}.{old}", f"{parent}.{new}")
        if new in holder:
            raise ValueError(f"{where} gives both `{before}` and `{after}`; {what} `{before}` is the old name of "
                             f"`{after}`: keep only `{after}`")
        found.append((what, before, after))
        raw = _rename_key(raw, old, new) if parent is None else {**raw, parent: _rename_key(holder, old, new)}
    return raw, found


def renamed(raw: dict, where: str) -> dict:
    """:func:`legacy_names`, logging ``section `teacher` is now `full_model`; rename it in <where>`` for each."""
    raw, found = legacy_names(raw, where)
    for what, before, after in found:
        log.warning("%s `%s` is now `%s`; rename it in %s", what, before, after, where)
    return raw


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
    """A loaded preset: a tree of typed sections (``preset.decoder.hidden``, ``preset.training.learning_rate``,
    ``preset.recovery.keep``), each default written once in its dataclass (``config``, ``SECTION_TYPES``).

    ``raw`` is the preset as written, every value checked (what ``to_dict`` returns, what notebook results record
    and what run fingerprints hash); read sections through the attributes, and ``plain(section)`` where a record
    needs the keys the preset gave.
    """

    name: str
    raw: dict = field(repr=False)

    @cached_property
    def _typed(self) -> dict:
        return _checked(self.raw)[1]

    def _section(self, section: str):
        if section in self._typed:
            return self._typed[section]
        return None if section in OPTIONAL else _section_type(SECTION_TYPES[section])()

    # The sections, typed (None where an optional section is left out).
    suite = property(lambda self: self._section("suite"), doc="tasks.SuiteConfig, or None: no synthetic suite")
    full_model = property(lambda self: self._section("full_model"), doc="config.FullModelSection: the model that prefills")
    smaller = property(lambda self: self._section("smaller"), doc="config.SmallerSection (the smaller model), or None")
    decoder = property(lambda self: self._section("decoder"), doc="config.DecoderSection")
    calibration = property(lambda self: self._section("calibration"), doc="config.CalibrationSection")
    training = property(lambda self: self._section("training"), doc="config.TrainingConfig")
    distill = property(lambda self: self._section("distill"), doc="config.DistillSection, or None")
    evaluation = property(lambda self: self._section("evaluation"), doc="config.EvaluationSection")
    latency = property(lambda self: self._section("latency"), doc="latency.LatencySettings")
    ablation = property(lambda self: self._section("ablation"), doc="config.AblationConfig")
    recovery = property(lambda self: self._section("recovery"), doc="config.RecoveryConfig, or None")
    runtime = property(lambda self: self._section("runtime"), doc="config.RuntimeSection")

    @property
    def description(self) -> str:
        return self.raw.get("description") or ""

    def has(self, section: str) -> bool:
        """Whether the preset gives ``section`` (not left out, null or empty)."""
        return bool(self.raw.get(section))

    def plain(self, section: str) -> dict:
        """``section`` as the preset wrote it, values checked (``{}`` when left out): the form a pruned decoder's
        stamp and the importance cache key record, so they match what earlier runs recorded."""
        return copy.deepcopy(self.raw.get(section) or {})

    def __getitem__(self, section: str):
        """The plain form of ``section`` (None when left out), for callers written before presets were typed."""
        return self.raw.get(section)

    def get(self, section: str, default=None):
        """Like ``__getitem__``, with a default; prefer the typed attributes."""
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
    def workload(self) -> str:
        """``synthetic`` (a synthetic suite and models trained on it here) or ``pretrained`` (a pretrained full
        model, scored by fidelity to its own answers): the name of the ``workloads.WORKLOADS`` entry that says what
        data, scorer, quality measure and figures the notebooks use."""
        return "synthetic" if self.suite is not None else "pretrained"

    def suite_config(self):
        if self.suite is None:
            raise ValueError(f"preset {self.name!r} has no synthetic suite; it evaluates real tasks through lm-eval")
        return self.suite

    def full_model_config(self):
        """The full model's local recipe (``full_model.FullModelConfig``); refused for a pretrained full model."""
        if self.full_model is None or self.full_model.train is None:
            raise ValueError(f"preset {self.name!r} uses a pretrained full model; there is no local recipe to train")
        return self.full_model.train

    def __getattr__(self, name: str):
        """The attributes renamed with the ``teacher`` section (``preset.teacher``, ``preset.teacher_config()``),
        with a DeprecationWarning (only reached when normal lookup fails)."""
        if name in _RENAMED_ATTRIBUTES:
            import warnings

            warnings.warn(f"Preset.{name} is now Preset.{_RENAMED_ATTRIBUTES[name]}", DeprecationWarning, stacklevel=2)
            return getattr(self, _RENAMED_ATTRIBUTES[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)


def load_preset(preset: str | os.PathLike | Preset, overrides: dict | None = None) -> Preset:
    """Load a named preset or a YAML file, apply overrides, and check every section (``config.parse``)."""
    if isinstance(preset, Preset):
        raw, where = preset.to_dict(), f"preset {preset.name!r}"
    else:
        text = str(preset)
        candidate = Path(text)
        if text.endswith((".yaml", ".yml")) or candidate.is_file():
            if not candidate.is_file():
                raise ValueError(f"preset file {text!r} does not exist")
            raw = read_mapping(candidate.read_text(), f"preset file {text}", "a mapping of preset sections")
            raw, where = renamed(raw, text), f"preset file {text}"
            raw.setdefault("name", candidate.stem)
        elif (PRESET_DIR / f"{text}.yaml").is_file():
            path = PRESET_DIR / f"{text}.yaml"
            raw, where = renamed(read_mapping(path.read_text(), f"preset {text}"), str(path)), f"preset file {path}"
        else:
            raise ValueError(f"unknown preset {text!r}; valid presets: {', '.join(available())} (or a path to a .yaml file)")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a mapping of preset sections (e.g. {{'training': {{'steps': 5}}}}), got "
                         f"{type(overrides).__name__} {short_repr(overrides)}")
    if overrides:
        raw, where = _deep_merge(raw, renamed(overrides, "the overrides")), f"{where} with the overrides"
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        valid = "\n".join(f"  {k}: {v}" for k, v in SECTIONS.items())
        raise ValueError(f"unknown preset section(s) {unknown}; valid sections:\n{valid}")
    if not isinstance(raw.get("full_model"), dict) or not raw["full_model"].get("id"):
        raise ValueError(f"preset {raw.get('name')!r} needs full_model.id (a local directory or a hub model id)")
    try:
        plain, typed = _checked(raw)
    except ValueError as error:  # the section's own message, and which file (or overrides) to fix
        raise ValueError(f"{error} (in {where})") from None
    preset = Preset(name=str(raw["name"]), raw=plain)
    preset.__dict__["_typed"] = typed  # parsed once, here (cached_property's slot)
    return preset
