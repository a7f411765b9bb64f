"""Every preset section as typed data, the one parser that checks them when a preset loads, and the registries a
preset's values are checked against (objectives, ablation scorers).

A section is a frozen dataclass whose annotations are its schema and whose field defaults are the only place a
default is written. :func:`parse` refuses an unknown key (naming the section, the key and the valid keys) and a value
of the wrong type (naming the expected type), reads a number YAML left as a string (PyYAML reads ``1e-3`` without a
dot as text) and turns lists into tuples. ``presets.load_preset`` turns a preset file into a tree of these objects
(``preset.decoder.hidden``, ``preset.training.learning_rate``). Four sections keep their class beside the code whose
registry checks them (``suite``: ``tasks.SuiteConfig``, ``latency``: ``latency.LatencySettings``,
``full_model.train``: ``full_model.FullModelConfig``, ``full_model.gguf``: ``gguf_models.GGUFSource``);
``presets.SECTION_TYPES``
lists every section's class in one table.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
DEVICES = ("cpu", "cuda")
CALIBRATION_SOURCES = ("suite", "wikitext", "pydoc")
CRITERIA = ("activation", "magnitude", "random")
AGGREGATIONS = ("l2", "mean", "l1")
SEQ_AGGREGATIONS = ("mean", "l2")
DECODER_WEIGHTS = ("float", "int8", "w8a8")  # decoder.weights: the runtime dtype, int8 weights, int8 weights and
# activations (quantize.DECODER_WEIGHTS)
MAIN_FULL_MODEL = "full_model"  # the ablation grid's name for the preset's own full model (pipeline.MODELS)
# How a run folder names a full model, where that differs from its name: the main full model's ablation folders were
# named when it was called "teacher" (artifacts/<preset>/ablation/teacher-keep0.5/...). Keeping that spelling in the
# folder name keeps every pruned decoder, finished run and cached score where it is.
FOLDER_NAMES = {MAIN_FULL_MODEL: "teacher"}
PRECISIONS = ("auto", "fp32", "bf16")  # training.precision
ABLATION_SCORERS = {  # how the grid scores a model (ablation.SCORERS implements each, by these names)
    "lm_eval": "the preset's evaluation tasks through lm-evaluation-harness (the synthetic suite by default; "
               "overall: the group's exact match)",
    "fidelity": "how closely the model continues the full model's held-out answers (the training data's test split; "
                "overall: per-token agreement, also reported: exact, answer_nll)",
}


def parse(cls, data: Mapping | None, where: str):
    """``cls(**data)`` with every key and value checked against ``cls``'s annotations (see the module docstring)."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping of keys to values, got {data!r}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {', '.join(names)}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: coerce(value, hints[key], f"{where}.{key}") for key, value in data.items()})


def values(cls, data: Mapping | None, where: str) -> dict:
    """The keys ``data`` gives, with the values :func:`parse` reads (lists for tuples, as YAML and JSON write them):
    what a preset keeps in place of its raw section, so readers of the dict see checked values."""
    parsed = parse(cls, data, where)
    return {key: plain(getattr(parsed, key)) for key in (data or {})}


def plain(value):
    """A parsed value as YAML and JSON write it: tuples as lists, nested dicts copied, dataclasses as dicts."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def describe(hint) -> str:
    """A type annotation in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin in (tuple, list):
        return f"a list of {describe(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def coerce(value, hint, where: str):
    """``value`` as the annotation ``hint`` wants it, or a ValueError naming ``where`` and the expected type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ValueError:
                continue
        raise _wrong(value, hint, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(value, hint, where, " (write true or false unquoted)" if isinstance(value, str) else "")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong(value, hint, where)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong(value, hint, where)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _wrong(value, hint, where)
    if origin in (tuple, list):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple, e.g. (low, high)
            if len(items) != len(args):
                raise ValueError(f"{where} expects {len(args)} values, got {value!r}")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        item = args[0] if args else typing.Any
        out = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _wrong(value, hint, where)
        if not args:
            return dict(value)
        return {coerce(k, args[0], where): coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where)
    raise TypeError(f"{where}: unsupported annotation {hint!r}")


def _wrong(value, hint, where: str, advice: str = "") -> ValueError:
    return ValueError(f"{where} expects {describe(hint)}, got {value!r} ({type(value).__name__}){advice}")


def torch_dtype(dtype, where: str = "runtime.dtype"):
    """The torch dtype a name means (None, "auto" and torch dtypes pass through); "bf16" and friends are refused with
    the name to write, since torch has no such attribute."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPE_ALIASES:
        raise ValueError(f"{where} {dtype!r}: write {DTYPE_ALIASES[dtype]!r}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} ({where}); use auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def _check_width(where: str, value) -> None:
    # A fraction removed in [0, 1), or a count kept (an integer >= 1); None keeps everything.
    if value is None or (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 <= value < 1):
        return
    raise ValueError(f"{where} is {value!r}: give the fraction removed (a number in [0, 1)) or the number kept "
                     "(an integer >= 1), or leave it out to keep all")


# --------------------------------------------------------------------------------------------------
# The registry of objectives (what a ``training`` or ``ablation`` section may name; training.py trains them)
# --------------------------------------------------------------------------------------------------

OBJECTIVE_LAYOUTS = ("pair", "causal")  # how a batch is collated (chat_data.LAYOUTS; a test keeps them equal)
LOSSES = ("ce", "kl")


@dataclass(frozen=True)
class Objective:
    """What is trained (``trains``), how its batches look (``layout``: ``pair`` or ``causal``) and its loss
    (``loss``: ``ce``, cross-entropy on the response tokens, or ``kl``, KL from the frozen full model's
    next-token distribution on the same tokens). ``per_width``: the pruning-ratio ablation may train it at every
    width (it trains the pruned decoder, or its architecture, on the chat data)."""

    name: str
    trains: str  # "decoder" (the pruned decoder), "scratch" (its architecture, random init), "full", "smaller"
    layout: str
    description: str
    label: str  # how tables and figures name the trained model
    loss: str = "ce"
    per_width: bool = False


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    if objective.layout not in OBJECTIVE_LAYOUTS:
        raise ValueError(f"objective layout must be one of {OBJECTIVE_LAYOUTS}, got {objective.layout!r}")
    if objective.loss not in LOSSES:
        raise ValueError(f"objective loss must be one of {LOSSES}, got {objective.loss!r}")
    OBJECTIVES[objective.name] = objective
    return objective


for _o in (
    Objective("overfill", "decoder", "pair", "pruned decoder reading the frozen full model's prompt KV (the method)",
              "OverFill", per_width=True),
    Objective("pruned", "decoder", "causal", "the same pruned decoder trained alone on prompt + response", "pruned",
              per_width=True),
    Objective("scratch", "scratch", "causal", "the decoder's architecture trained from random initialization",
              "from scratch", per_width=True),
    Objective("full", "full", "causal", "the full model fine-tuned (upper reference)", "full fine-tuned"),
    Objective("smaller", "smaller", "causal", "a separately trained smaller model, fine-tuned", "smaller fine-tuned"),
    Objective("overfill_kd", "decoder", "pair", "OverFill, distilled: KL to the full model's next-token distribution",
              "OverFill, distilled", loss="kl"),
    Objective("pruned_kd", "decoder", "causal", "the pruned decoder alone, distilled from the full model (KL)",
              "pruned, distilled", loss="kl"),
):
    register_objective(_o)


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        valid = ", ".join(f"{k} ({v.description})" for k, v in OBJECTIVES.items())
        raise ValueError(f"unknown objective or baseline {name!r}; valid names: {valid}")
    return OBJECTIVES[name]


# --------------------------------------------------------------------------------------------------
# The decoder training recipe (a preset's ``training`` section)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingConfig:
    """One recipe for every objective. ``steps`` (optimizer steps) wins over ``epochs`` when set."""

    objectives: tuple[str, ...] = ("overfill", "pruned", "scratch", "full", "smaller")
    seeds: tuple[int, ...] = (0,)
    objective_seeds: dict | None = None  # {objective: [seeds]} where an objective gets other seeds than `seeds`
    # data
    data: str = "suite"  # "suite", a .jsonl/.json path or directory, or a hub dataset name
    data_config: str | None = None
    data_split: str = "train"
    data_where: dict | None = None  # column == value filters, e.g. {langdetect: en}
    data_limit: int | None = None
    skip_invalid: bool = False
    max_length: int = 2048
    num_proc: int | None = None
    # schedule
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8  # per device
    grad_accum: int = 1
    learning_rate: float = 2e-5
    scheduler: str = "cosine"
    warmup_ratio: float = 0.01
    warmup_steps: int | None = None  # wins over warmup_ratio: a warmup that does not move with the token budget
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    group_by_length: bool = False
    gradient_checkpointing: bool = False  # baselines only: HF checkpointing drops the pair's prompt KV
    # logging and checkpoints
    logging_steps: int = 10
    # every N steps (and at step 0), fidelity on the data's validation split: eval_nll, eval_agreement in the log
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int = 2
    # "auto": autocast to runtime.dtype on a GPU, fp32 on a CPU; "bf16": bf16 autocast on any device (fp32 weights
    # and optimizer; on CPUs with AMX, bf16 products run several times faster than fp32); "fp32": never autocast
    precision: str = "auto"
    # text windows (windows.py): cross-entropy on the text, weighted, beside the KL to the full model
    ce_weight: float = 0.0
    # the OverFill objective
    strategy: str = "shared_kv"
    include_first_token: bool = True
    # the "smaller" baseline: a model id or directory (default: the preset's smaller model)
    smaller_id: str | None = None

    def __post_init__(self):
        for name in self.objectives:
            get_objective(name)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"training.steps must be >= 1 (or null to train for training.epochs), got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("training.batch_size and training.grad_accum must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"training.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.seeds:
            raise ValueError("training.seeds needs at least one seed")
        check_distinct(self.objectives, "training.objectives")
        check_distinct(self.seeds, "training.seeds")
        for name, seeds in (self.objective_seeds or {}).items():
            if name not in self.objectives:
                raise ValueError(f"training.objective_seeds names {name!r}, which is not in training.objectives "
                                 f"{list(self.objectives)}")
            if not isinstance(seeds, (list, tuple)) or not seeds or not all(isinstance(x, int) for x in seeds):
                raise ValueError(f"training.objective_seeds.{name} must be a non-empty list of integer seeds, got {seeds!r}")
            check_distinct(seeds, f"training.objective_seeds.{name}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"training.warmup_steps must be >= 0 (or null: warmup_ratio), got {self.warmup_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"training.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.ce_weight < 0:
            raise ValueError(f"training.ce_weight must be >= 0, got {self.ce_weight}")
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ValueError(f"training.eval_steps must be >= 1 (or null: no validation during training), got {self.eval_steps}")

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainingConfig:
        return parse(cls, d, "training")

    @classmethod
    def from_preset(cls, preset) -> TrainingConfig:
        """The preset's recipe (``preset.training``; kept for callers written before presets were typed)."""
        return preset.training

    def to_dict(self) -> dict:
        """Every field (what a run's fingerprint hashes, less objectives and seeds)."""
        return asdict(self)

    def seeds_for(self, objective: str) -> tuple[int, ...]:
        """The seeds ``objective`` is trained with: its ``objective_seeds`` entry, else ``seeds``."""
        return tuple((self.objective_seeds or {}).get(objective, self.seeds))

    def runs(self, objectives=None, seeds=None) -> list[tuple[str, int]]:
        """(objective, seed) in training order, seed-major: every objective's first seed before any second seed.
        ``seeds`` given: those for every objective."""
        names = list(objectives or self.objectives)
        order = list(dict.fromkeys(s for n in names for s in (seeds or self.seeds_for(n))))
        return [(n, s) for s in order for n in names if s in (seeds or self.seeds_for(n))]


# --------------------------------------------------------------------------------------------------
# Sections without a home of their own
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FullModelSection:
    """The full model: ``id`` (a local directory or hub id), and how it is made when it is missing: ``train``
    (a local recipe, ``full_model.FullModelConfig``) or ``gguf`` (a GGUF file in a wheel, ``gguf_models.GGUFSource``);
    a loaded preset holds those two typed (``presets.NESTED_TYPES`` parses them; their classes live beside the
    code that checks them)."""

    id: str
    train: typing.Any = None  # full_model.FullModelConfig
    gguf: typing.Any = None  # gguf_models.GGUFSource
    revision: str | None = None


@dataclass(frozen=True)
class SmallerSection:
    """The smaller model (the paper's "smaller fine-tuned" reference): a hub id / directory, or (local presets) the
    full model's recipe at ``width_ratio`` of its width (with ``heads``: fewer attention heads too)."""

    id: str | None = None
    width_ratio: float = 0.5
    heads: bool = False
    revision: str | None = None

    def __post_init__(self):
        if not 0 < self.width_ratio <= 1:
            raise ValueError(f"smaller.width_ratio must be in (0, 1], got {self.width_ratio}")


@dataclass(frozen=True)
class DecoderSection:
    """Width pruning of the decoder (``pruning.prune_width``): per axis the fraction removed or the number kept."""

    hidden: int | float | None = None
    intermediate: int | float | None = None
    heads: int | float | None = None
    round_to: int = 1
    criterion: str = "activation"
    # The decoder's weights where it is timed and scored (notebooks 03 and 04): "float" (the runtime dtype), "int8"
    # or "w8a8" (int8 activations too; quantize.py). A run-time setting: the pruned decoder's stamp leaves it out
    # (pipeline.pruned_decoder).
    weights: str = "float"

    def __post_init__(self):
        for axis in ("hidden", "intermediate", "heads"):
            _check_width(f"decoder.{axis}", getattr(self, axis))
        if self.round_to < 1:
            raise ValueError(f"decoder.round_to must be >= 1, got {self.round_to}")
        check_choice("criterion", self.criterion, CRITERIA)
        check_choice("decoder.weights", self.weights, DECODER_WEIGHTS)


@dataclass(frozen=True)
class CalibrationSection:
    """Importance calibration data (``importance.calibration_samples``)."""

    source: str = "suite"
    samples: int = 512
    seq_len: int | None = None
    batch_size: int = 8
    aggregation: str = "l2"
    seq_aggregation: str = "mean"
    path: str | None = None
    subset: str | None = None
    skip_loss_samples: int | None = None

    def __post_init__(self):
        check_choice("calibration source", self.source, CALIBRATION_SOURCES)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_choice("seq_aggregation", self.seq_aggregation, SEQ_AGGREGATIONS)
        for name in ("samples", "seq_len", "batch_size", "skip_loss_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"calibration {name}={value!r} must be a positive int.")


def check_limit(limit, what: str):
    """A limit on scored documents or records as lm-eval reads it: None (all), a count (>= 1) or a share (below 1).
    Zero or less would score nothing, or (as a slice) everything but the last few."""
    if limit is not None and not limit > 0:
        raise ValueError(f"{what}={limit!r} keeps nothing: give a number of records (1 or more), a share below 1, "
                         "or null for all")
    return limit


@dataclass(frozen=True)
class EvaluationSection:
    """lm-eval settings of the benchmark notebooks (``evaluation.evaluate``)."""

    tasks: tuple[str, ...] = ()
    limit: int | float | None = None
    batch_size: int = 16
    apply_chat_template: bool = True
    num_fewshot: int | None = None
    fewshot_as_multiturn: bool | None = None

    def __post_init__(self):
        check_limit(self.limit, "evaluation.limit")


@dataclass(frozen=True)
class RuntimeSection:
    """Where and in which precision models run."""

    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.dtype in DTYPE_ALIASES:
            raise ValueError(f"runtime.dtype {self.dtype!r}: write {DTYPE_ALIASES[self.dtype]!r}")
        check_choice("runtime.dtype", self.dtype, DTYPES)
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"runtime.device is {self.device!r}; choose from cpu, cuda or cuda:N")


@dataclass(frozen=True)
class DistillSection:
    """Self-distilled chat data (``pipeline.distilled_data``, ``corpus.build_distilled_data``): per split
    ``[passage prompts, family prompts]`` (passage prompts beyond the split's passages ask for a passage again under
    another instruction); answers longer than ``max_new_tokens`` are dropped; ``batch_size`` prompts of similar
    length are answered together."""

    dir: str
    train: tuple[int, int]
    validation: tuple[int, int]
    test: tuple[int, int]
    max_new_tokens: int = 96
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        for split in ("train", "validation", "test"):
            if any(n < 0 for n in getattr(self, split)):
                raise ValueError(f"distill.{split} counts must be >= 0, got {getattr(self, split)!r}")
            if not any(getattr(self, split)):  # an empty file, found only when training or scoring reads it
                raise ValueError(f"distill.{split} is [0, 0]: the split would hold no prompts; give it passage or "
                                 "family prompts, e.g. [20, 10]")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class AblationConfig:
    """A preset's ``ablation`` section.

    ``keep``: fractions of hidden and intermediate channels the decoder keeps, for the preset's full model.
    ``objectives`` / ``seeds``: what is trained at every width (same recipe as notebook 02: the preset's
    ``training`` section). ``scratch_keep``: widths where the from-scratch baseline is trained too.
    ``full_models``: a second axis, other full models of the same family, each ``{keep, seeds, objectives}``
    (any left out: the main grid's); a key is ``smaller`` (the preset's smaller model) or a local directory /
    hub id. Untrained decoders are scored for the main full model only.
    ``retention``: a decoder "holds" a family when it keeps at least this fraction of its full model's score.
    ``untrained``: also score every decoder before training (alone and paired).
    ``eval_limit``: score only the first N documents of each task (None: the ``evaluation`` section's limit).
    ``scorer``: how every model is scored (``SCORERS``): ``lm_eval`` (the preset's evaluation tasks, the synthetic
    suite by default) or ``fidelity`` (agreement with the full model's held-out answers, for pretrained models).
    """

    keep: tuple[float, ...] = (0.25, 0.4, 0.55, 0.7, 0.85)
    objectives: tuple[str, ...] = ("overfill", "pruned")
    seeds: tuple[int, ...] = (0,)
    scratch_keep: tuple[float, ...] = ()
    full_models: dict = field(default_factory=dict)
    retention: float = 0.9
    untrained: bool = True
    eval_limit: int | None = None
    scorer: str = "lm_eval"

    def __post_init__(self):
        check_limit(self.eval_limit, "ablation.eval_limit")
        if self.scorer not in ABLATION_SCORERS:
            valid = "; ".join(f"{k}: {v}" for k, v in ABLATION_SCORERS.items())
            raise ValueError(f"unknown ablation.scorer {self.scorer!r}; valid: {valid}")
        for name in ("keep", "scratch_keep"):
            for k in getattr(self, name):
                _check_keep(k, f"ablation.{name}")
        for name in ("keep", "scratch_keep", "seeds", "objectives"):
            check_distinct(getattr(self, name), f"ablation.{name}")
        for other, spec in self.full_models.items():
            bad = sorted(set(spec or {}) - {"keep", "seeds", "objectives"})
            if bad:
                raise ValueError(
                    f"ablation.full_models.{other}: unknown key(s) {bad}; valid keys: keep, seeds, objectives")
            for k in (spec or {}).get("keep", self.keep):
                _check_keep(k, f"ablation.full_models.{other}.keep")
            for name in ("keep", "seeds", "objectives"):
                check_distinct((spec or {}).get(name, ()), f"ablation.full_models.{other}.{name}")
        for p in self.points():
            if bad := [o for o in p.objectives if not get_objective(o).per_width]:
                per_width = sorted(n for n, o in OBJECTIVES.items() if o.per_width)
                raise ValueError(f"ablation objectives {bad} cannot be trained per width; choose from {per_width}")
        if not self.seeds:
            raise ValueError("ablation.seeds needs at least one seed")
        if not 0 < self.retention <= 1:
            raise ValueError(f"ablation.retention must be in (0, 1], got {self.retention}")

    @classmethod
    def from_dict(cls, d: dict | None) -> AblationConfig:
        d = dict(d or {})
        if d.get("full_models") is None:
            d.pop("full_models", None)
        return parse(cls, d, "ablation")

    @classmethod
    def from_preset(cls, preset) -> AblationConfig:
        """The preset's grid (``preset.ablation``; kept for callers written before presets were typed)."""
        return preset.ablation

    def to_dict(self) -> dict:
        return asdict(self)

    def with_changes(self, **changes) -> AblationConfig:
        """This grid with some keys replaced (notebook 04's parameters), checked like a preset's section."""
        return AblationConfig.from_dict(asdict(self) | changes)

    def points(self) -> list[Point]:
        """The grid: the main full model at every ``keep``, then each other full model at its own widths."""
        scratch = set(self.scratch_keep)
        out = [Point(MAIN_FULL_MODEL, k, self.seeds, self.objectives + (("scratch",) if k in scratch else ()))
               for k in self.keep]
        for other, spec in self.full_models.items():
            spec = spec or {}
            seeds, objectives = tuple(spec.get("seeds", self.seeds)), tuple(spec.get("objectives", self.objectives))
            out += [Point(str(other), k, seeds, objectives) for k in spec.get("keep", self.keep)]
        return out

    def runs(self) -> int:
        """How many training runs the grid asks for (before any are found finished)."""
        return sum(len(p.seeds) * len(p.objectives) for p in self.points())


@dataclass(frozen=True)
class Point:
    full_model: str
    keep: float
    seeds: tuple[int, ...] = (0,)
    objectives: tuple[str, ...] = ("overfill", "pruned")

    @property
    def slug(self) -> str:
        """The point's folder name (its full model's folder name, ``FOLDER_NAMES``, and the width)."""
        return f"{folder_name(self.full_model)}-keep{self.keep:g}"


def folder_name(full_model: str) -> str:
    """How run folders and cached scores name ``full_model`` (see ``FOLDER_NAMES``)."""
    return slug(FOLDER_NAMES.get(full_model, full_model))


def check_seed(seed, where: str) -> int:
    """A seed numpy and torch both take: an integer in [0, 2**32) (numpy refuses others when the run starts)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"{where}: a seed is an integer from 0 to 2**32 - 1, got {seed!r}")
    return seed


def seed_arg(text: str) -> int:
    """An argparse ``type`` for a seed (:func:`check_seed`)."""
    import argparse

    try:
        return check_seed(int(text), "seed")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is an integer from 0 to 2**32 - 1") from e


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1 (``--tokens 0`` or ``--batch-size -1`` fail at the command line,
    not after the models load)."""
    import argparse

    try:
        number = float(text)  # 1e6 is a fine way to write a token budget
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    value = int(number)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def keep_fraction(text: str) -> float:
    """An argparse ``type``: a fraction of channels kept, in (0, 1]."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a kept fraction is in (0, 1] (0.5 keeps half the channels)")
    return value


def check_distinct(values, where: str) -> None:
    """Refuse a list that names a value twice (seeds, widths, objectives): the run would be counted twice, and two
    copies of one run make a seed spread of zero."""
    twice = sorted({v for v in values if list(values).count(v) > 1}, key=str)
    if twice:
        raise ValueError(f"{where} lists {', '.join(map(repr, twice))} more than once ({list(values)}): each run would "
                         f"count twice; list each value once")


def _check_keep(k, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"{where}: keep fractions must be numbers in (0, 1] (1 keeps every channel), got {k!r}")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# --------------------------------------------------------------------------------------------------
# Long runs on text windows (recovery.py, windows.py)

RECOVERY_OBJECTIVES = ("overfill_kd", "pruned_kd")  # the window objective in OverFill's layout, and the decoder alone


def keeping(decoder: Mapping, keep: float) -> dict:
    """A ``decoder`` section pruned to keep ``keep`` of the hidden and intermediate channels (the section counts what
    is removed: ``hidden: 0.25`` keeps 75%)."""
    return {**dict(decoder), "hidden": round(1.0 - keep, 6), "intermediate": round(1.0 - keep, 6)}


@dataclass(frozen=True)
class WindowSpec:
    """How text is cut into windows (windows.py): ``window`` tokens, of which the full model prefills the first
    ``context``; the decoder continues over the rest, and its KL is taken over the teacher's ``teacher_topk`` tokens."""

    window: int = 256
    context: int = 128
    teacher_topk: int = 64

    def __post_init__(self):
        for name in ("window", "context", "teacher_topk"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} must be a whole number of tokens, got {getattr(self, name)!r}")
        if not 1 <= self.context <= self.window - 2:
            raise ValueError(f"a window needs context >= 1 and at least 2 continuation tokens: window={self.window}, "
                             f"context={self.context}")
        if self.teacher_topk < 1:
            raise ValueError(f"teacher_topk must be >= 1, got {self.teacher_topk}")

    @property
    def continuation(self) -> int:
        return self.window - self.context

    @property
    def scored(self) -> int:
        """Positions per window the loss and the scores cover (continuation tokens 1..T-1)."""
        return self.continuation - 1


@dataclass(frozen=True)
class RecoveryConfig:
    """A preset's ``recovery`` section: the grid of long runs, their recipe and their scoring (recovery.py)."""

    keep: tuple[float, ...] = (0.5, 0.75)
    objectives: tuple[str, ...] = RECOVERY_OBJECTIVES
    seeds: tuple[int, ...] = (0,)
    tokens: int = 1_000_000  # scored continuation tokens per run, at most
    eval_every: int = 25_000  # tokens between validations (and checkpoints)
    flat: float = 0.01  # stop once validation KL improved by less than this fraction over the last flat_evals
    flat_evals: int = 4
    spread_seeds: tuple[int, ...] = (1, 2)  # extra seeds at spread_tokens, for the seed spread
    spread_tokens: int = 100_000
    # the windows and the teacher
    window: int = 256
    context: int = 128
    teacher_topk: int = 64
    validation_windows: int = 64
    test_windows: int = 192  # held-out text scored at the end: 192 x 127 = 24,384 positions
    test_answers: str = "data/distill-smollm2-135m/test.jsonl"  # held-out chat answers (the full model's own)
    # the recipe
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup_tokens: int = 20_000
    weight_decay: float = 0.0
    ce_weight: float = 0.0
    precision: str = "fp32"  # training.precision: "bf16" autocasts (several times faster on CPUs with AMX)

    def __post_init__(self):
        for name in self.objectives:
            if name not in RECOVERY_OBJECTIVES:
                raise ValueError(f"recovery.objectives: {name!r} is not a window objective; choose from "
                                 f"{RECOVERY_OBJECTIVES}")
        for k in self.keep:
            _check_keep(k, "recovery.keep")
        for what in ("keep", "seeds", "spread_seeds", "objectives"):
            check_distinct(getattr(self, what), f"recovery.{what}")
        for what in ("keep", "seeds", "objectives"):
            if not getattr(self, what):
                raise ValueError(f"recovery.{what} is empty: the grid would train nothing; list at least one")
        for seed in (*self.seeds, *self.spread_seeds):
            check_seed(seed, "recovery seeds")
        if min(self.tokens, self.eval_every, self.spread_tokens, self.batch_size, self.test_windows,
               self.validation_windows, self.flat_evals) < 1:
            raise ValueError("recovery.tokens, eval_every, spread_tokens, batch_size, test_windows, validation_windows "
                             "and flat_evals must be positive")
        if self.eval_every > self.tokens:  # the run would end before its first validation and checkpoint
            raise ValueError(f"recovery.eval_every ({self.eval_every} tokens) is more than recovery.tokens "
                             f"({self.tokens}): a run would end unvalidated; make eval_every at most tokens")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"recovery.learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("weight_decay", "ce_weight", "warmup_tokens"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"recovery.{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.flat) and 0 <= self.flat < 1):
            raise ValueError(f"recovery.flat is a fraction of the validation KL in [0, 1) (0.01: stop below 1% "
                             f"improvement), got {self.flat}")
        check_choice("recovery.precision", self.precision, PRECISIONS)
        if self.test_windows * self.spec.scored < 20_000:
            raise ValueError(f"recovery.test_windows: {self.test_windows} windows score "
                             f"{self.test_windows * self.spec.scored} positions; held-out text needs at least 20k")

    @property
    def spec(self) -> WindowSpec:
        return WindowSpec(self.window, self.context, self.teacher_topk)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.spec.scored

    def steps(self, tokens: int) -> int:
        return max(1, -(-tokens // self.tokens_per_step))

    @property
    def eval_steps(self) -> int:
        return self.steps(self.eval_every)


# Names from before the model that prefills was called "full model" everywhere ("teacher" now means a distillation
# teacher only): still importable, with a DeprecationWarning.
_RENAMED = {"TeacherSection": "FullModelSection", "MAIN_TEACHER": "MAIN_FULL_MODEL"}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings

        warnings.warn(f"config.{name} is now config.{_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
