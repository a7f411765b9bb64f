"""Width and depth pruning of a Hugging Face decoder into a smaller model of the same class.

``prune_width`` is OverFill's decoder: hidden channels, MLP neurons and optionally query heads are cut by
importance while layers, KV heads and head_dim stay, so the decoder's KV cache has the full model's shape.
``prune_depth`` keeps a subset of layers. A float size is the fraction removed, an int the number kept; kept
indices stay in order, so keeping everything reproduces the model. ``size_report``, ``sweep`` and ``layer_ablation``
measure before any training (with a scorer of :mod:`overfill_lib.scoring`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from overfill_lib import architectures as arch
from overfill_lib import cost, scoring
from overfill_lib.artifacts import atomic_directory, environment_record, read_json, write_json
from overfill_lib.importance import Importance
from overfill_lib.pair import PRUNING_NAME

log = logging.getLogger(__name__)



@dataclass
class PruningRecord:
    """What was pruned, how, and from what: saved as ``pruning.json`` beside the pruned weights."""

    kind: str  # "width" or "depth"
    model_type: str
    source_model: str | None
    original: dict  # sizes and num_parameters of the source model
    new: dict  # the same for the pruned model
    kept: dict  # dimension -> kept indices (hidden: [..]; intermediate/heads: [[..] per layer]; layers: [..])
    request: dict = field(default_factory=dict)  # the arguments as given (ratios / counts, round_to)
    importance: dict = field(default_factory=dict)  # criterion, aggregation, calibration description and size
    notes: list = field(default_factory=list)
    environment: dict | None = None  # versions, device, commit: filled in by save_pruned
    format_version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruningRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PruningRecord:
        return cls.from_dict(read_json(path))


def load_pruning_record(path: str | Path) -> PruningRecord:
    """The PruningRecord of a ``save_pruned`` directory (or of a ``pruning.json`` file)."""
    path = Path(path)
    return PruningRecord.load(path / PRUNING_NAME if path.is_dir() else path)


# ----------------------------------------------------------------------------------------------
# Sizes (no weights needed)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _check_round_to(round_to) -> int:
    if isinstance(round_to, bool) or not isinstance(round_to, numbers.Integral) or round_to < 1:
        raise ValueError(
            f"round_to={round_to!r} must be an int >= 1 (1 = no rounding, e.g. 64 for GPU-friendly sizes)."
        )
    return int(round_to)


def _round_count(kept: int, multiple: int, original: int, name: str) -> int:
    """Nearest multiple of ``multiple`` (halves up), at most ``original``, at least one multiple."""
    if multiple == 1:
        return kept
    if multiple > original:
        raise ValueError(
            f"cannot round {name} to a multiple of {multiple}: the model's {name} is only {original}; "
            "use a smaller round_to."
        )
    rounded = _round_half_up(kept / multiple) * multiple
    return max(multiple, min(rounded, original - original % multiple))


def kept_count(spec, original: int, name: str, multiple: int = 1) -> int:
    """Number of units kept for a size ``spec``: None = all, float = fraction removed, int = number kept."""
    if spec is None:
        kept = original
    elif isinstance(spec, bool) or not isinstance(spec, numbers.Real):
        raise ValueError(
            f"{name}={spec!r}: give a float in [0, 1) (fraction removed) or an int (number kept), not "
            f"{type(spec).__name__}."
        )
    elif isinstance(spec, numbers.Integral):
        if not 1 <= spec <= original:
            raise ValueError(
                f"{name}={spec} is not a valid number of {name} channels to keep: an int is the number KEPT and must "
                f"be between 1 and the model's {original}. For a fraction removed pass a float in [0, 1)."
            )
        kept = int(spec)
    else:
        if not 0.0 <= spec < 1.0:  # also catches nan
            raise ValueError(
                f"{name}={spec} is outside [0, 1): a float is the FRACTION REMOVED (0.0 keeps everything, 0.45 removes "
                f"45%). To give the number kept, pass an int between 1 and {original}."
            )
        kept = max(1, _round_half_up(original * (1.0 - spec)))
    return _round_count(kept, multiple, original, name)


def kept_heads(spec, num_heads: int, num_kv_heads: int) -> int:
    """Number of query heads kept: a positive multiple of num_kv_heads (the same count in every KV group)."""
    group = num_heads // num_kv_heads
    if spec is None:
        return num_heads
    if isinstance(spec, bool) or not isinstance(spec, numbers.Real):
        raise ValueError(f"heads={spec!r}: give a float in [0, 1) (fraction removed) or an int (number kept).")
    if isinstance(spec, numbers.Integral):
        if not (num_kv_heads <= spec <= num_heads and spec % num_kv_heads == 0):
            choices = list(range(num_kv_heads, num_heads + 1, num_kv_heads))
            raise ValueError(
                f"heads={spec} breaks the KV grouping: the kept query heads must be a positive multiple of "
                f"num_key_value_heads={num_kv_heads} (the same number per KV group, KV heads are kept), at most "
                f"{num_heads}; choose one of {choices}."
            )
        return int(spec)
    if not 0.0 <= spec < 1.0:
        raise ValueError(
            f"heads={spec} is outside [0, 1): a float is the FRACTION of query heads REMOVED; pass an int for the "
            "number kept (a multiple of num_key_value_heads)."
        )
    per_group = _round_half_up(group * (1.0 - spec))
    if per_group < 1:
        raise ValueError(
            f"heads={spec} removes every query head of each KV group ({group} per group): at least one per group must "
            f"stay (kept heads must be a positive multiple of num_key_value_heads={num_kv_heads}); use a smaller ratio."
        )
    return per_group * num_kv_heads


def target_sizes(config, hidden=None, intermediate=None, heads=None, round_to: int = 1) -> dict:
    """Kept sizes for a width pruning request, plus ``notes`` on any adjustment made. No weights needed."""
    spec = arch.check_config(config)
    round_to = _check_round_to(round_to)
    notes = []
    n_heads = kept_heads(heads, config.num_attention_heads, config.num_key_value_heads)
    n_hidden = kept_count(hidden, config.hidden_size, "hidden", round_to)
    if spec.hidden_multiple_of_heads and n_hidden % n_heads:
        multiple = math.lcm(round_to, n_heads)
        n_hidden = kept_count(hidden, config.hidden_size, "hidden", multiple)
        notes.append(
            f"{config.model_type} configs require hidden_size % num_attention_heads == 0: hidden rounded to "
            f"{n_hidden}, the nearest multiple of lcm(round_to={round_to}, heads={n_heads}) = {multiple}"
        )
    n_intermediate = kept_count(intermediate, config.intermediate_size, "intermediate", round_to)
    # Rounding to a multiple can move a size far from the request on a small model: say so, with the numbers.
    for name, spec, original, kept, multiple in (("hidden", hidden, config.hidden_size, n_hidden, round_to),
                                                ("intermediate", intermediate, config.intermediate_size,
                                                 n_intermediate, round_to)):
        asked = kept_count(spec, original, name, 1)
        if kept != asked:
            notes.append(f"{name}: {asked} of {original} asked ({1 - asked / original:.0%} removed), {kept} kept "
                         f"({1 - kept / original:.0%} removed) after rounding to a multiple of {multiple}")
    sizes = {
        "hidden_size": n_hidden,
        "intermediate_size": n_intermediate,
        "num_attention_heads": n_heads,
        "notes": notes,
    }
    for note in notes:
        log.info(note)
    return sizes


def pruned_config(config, hidden=None, intermediate=None, heads=None, round_to: int = 1):
    """The config of the width-pruned model: same class, layers, KV heads and head_dim; smaller widths."""
    sizes = target_sizes(config, hidden=hidden, intermediate=intermediate, heads=heads, round_to=round_to)
    return _config_for_sizes(config, sizes)


def _config_for_sizes(config, sizes: dict):
    return _derive_config(
        config,
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_attention_heads=sizes["num_attention_heads"],
        # Explicit, because several families derive head_dim from hidden_size // num_attention_heads.
        head_dim=arch.head_dim_of(config),
    )


def _derive_config(config, **changes):
    data = config.to_dict()
    data.update(changes)
    return type(config).from_dict(data)


def count_parameters(config) -> int:
    """Parameters of a model built from ``config`` (tied weights once), on the meta device: no memory used."""
    arch.check_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return num_parameters(model)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _sizes(config, num_params: int | None = None) -> dict:
    out = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": arch.head_dim_of(config),
        "num_hidden_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
    }
    if num_params is not None:
        out["num_parameters"] = num_params
    return out


# ----------------------------------------------------------------------------------------------
# Choosing what to keep


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending (ties keep the lower index, so the choice is deterministic)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return order[:k].sort().values


def select_kept(importance: Importance, config, new_config) -> dict[str, list]:
    """Kept indices per dimension: one hidden set; an intermediate and a query-head set per layer."""
    kv = config.num_key_value_heads
    group, new_group = config.num_attention_heads // kv, new_config.num_attention_heads // kv
    heads = []
    for layer_scores in importance.heads:
        # Rank query heads within each KV group, so every KV head keeps the same number of queries.
        per_group = [_top_sorted(g, new_group) + i * group for i, g in enumerate(layer_scores.view(kv, group))]
        heads.append(torch.cat(per_group).tolist())
    return {
        "hidden": _top_sorted(importance.hidden, new_config.hidden_size).tolist(),
        "intermediate": [_top_sorted(s, new_config.intermediate_size).tolist() for s in importance.intermediate],
        "heads": heads,
    }


def layers_to_keep(importance: Importance, n: int, score: str = "layers") -> list[int]:
    """The ``n`` most important layers (by ``importance.layers`` or ``layers_skip_loss``), ascending."""
    scores = getattr(importance, score)
    if scores is None:
        raise ValueError(f"importance has no {score!r} scores; compute them with layer_skip_loss=True.")
    if not 1 <= n <= len(scores):
        raise ValueError(f"cannot keep {n} layers of {len(scores)}: n must be between 1 and {len(scores)}.")
    return _top_sorted(scores, n).tolist()


# ----------------------------------------------------------------------------------------------
# Building the pruned model


def _slice(tensor: torch.Tensor, axes, index: dict[str, torch.Tensor]) -> torch.Tensor:
    for dim, role in enumerate(axes):
        if role is not None:
            tensor = tensor.index_select(dim, index[role].to(tensor.device))
    return tensor


def _is_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _build_like(model: nn.Module, config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of ``type(model)`` for ``config`` holding ``state``, without a random init (meta device)."""
    with torch.device("meta"):
        new = type(model)(config)
    new.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in a state_dict; head_dim and RoPE settings are
    # unchanged, so the source's buffers are the right values.
    source = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            src = source.get(name)
            if src is None or src.shape != buf.shape:
                raise RuntimeError(f"cannot fill buffer {name!r} of the pruned model from the source model")
            owner, _, attr = name.rpartition(".")
            new.get_submodule(owner).register_buffer(attr, src.clone(), persistent=False)
    if _is_tied(model):
        new.tie_weights()
        if not _is_tied(new):
            raise RuntimeError("the pruned model lost its tied embeddings")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn and getattr(new.config, "_attn_implementation", None) != attn:
        new.set_attn_implementation(attn)
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new


def _importance_info(importance: Importance) -> dict:
    return {
        "criterion": importance.criterion,
        "aggregation": importance.aggregation,
        "seq_aggregation": importance.seq_aggregation,
        "calibration": importance.calibration,
        "num_samples": importance.num_samples,
        "num_tokens": importance.num_tokens,
        "seed": importance.seed,
        "source_model": importance.source_model,
    }


@torch.no_grad()
def prune_width(
    model: nn.Module,
    importance: Importance,
    hidden=None,
    intermediate=None,
    heads=None,
    round_to: int = 1,
) -> tuple[nn.Module, PruningRecord]:
    """Width-prune ``model`` by ``importance``: a new model of the same class whose KV cache has the same shape.

    ``hidden`` / ``intermediate`` / ``heads``: None or 0.0 keeps all; a float in [0, 1) is the fraction
    removed; an int the number kept (heads: a multiple of num_key_value_heads). The source model is
    left unchanged.
    """
    arch.check_model(model)
    config = model.config
    importance.check_matches(config)
    sizes = target_sizes(config, hidden=hidden, intermediate=intermediate, heads=heads, round_to=round_to)
    new_config = _config_for_sizes(config, sizes)
    kept = select_kept(importance, config, new_config)

    head_dim = arch.head_dim_of(config)
    hidden_index = torch.tensor(kept["hidden"])
    per_layer = []
    for inter, qh in zip(kept["intermediate"], kept["heads"]):
        q_rows = (torch.tensor(qh)[:, None] * head_dim + torch.arange(head_dim)).flatten()  # heads -> q/o rows
        per_layer.append({arch.HIDDEN: hidden_index, arch.INTERMEDIATE: torch.tensor(inter), arch.Q_HEADS: q_rows})
    global_index = {arch.HIDDEN: hidden_index}

    tied = _is_tied(model)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # sliced once with the embedding below
        layer, axes = arch.param_axes(name)
        state[name] = _slice(tensor, axes, global_index if layer is None else per_layer[layer])
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    new_model = _build_like(model, new_config, state)

    record = _record("width", model, new_model, kept=kept, importance=_importance_info(importance), notes=sizes["notes"],
                     request={"hidden": hidden, "intermediate": intermediate, "heads": heads, "round_to": round_to})
    log.info(
        "pruned %s: hidden %d -> %d, intermediate %d -> %d, query heads %d -> %d, params %d -> %d",
        config.model_type, config.hidden_size, new_config.hidden_size, config.intermediate_size,
        new_config.intermediate_size, config.num_attention_heads, new_config.num_attention_heads,
        record.original["num_parameters"], record.new["num_parameters"],
    )
    return new_model, record


@torch.no_grad()
def prune_depth(model: nn.Module, keep_layers) -> tuple[nn.Module, PruningRecord]:
    """Keep only the decoder layers ``keep_layers`` (sorted ascending) of ``model``; widths unchanged.

    The new model's layers are renumbered 0..n-1 (their ``layer_idx`` and ``config.layer_types``
    follow), so its cache has n layers; ``record.kept["layers"][j]`` is the source layer of layer j.
    """
    arch.check_model(model)
    config = model.config
    n = config.num_hidden_layers
    keep = list(keep_layers) if keep_layers is not None else []
    if not keep or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in keep):
        raise ValueError(f"keep_layers={keep_layers!r} must be a non-empty list of layer indices in [0, {n}).")
    keep = [int(i) for i in keep]
    if len(set(keep)) != len(keep) or not all(0 <= i < n for i in keep):
        raise ValueError(f"keep_layers={keep_layers!r} must hold distinct layer indices in [0, {n}).")
    keep = sorted(keep)

    changes = {"num_hidden_layers": len(keep)}
    if getattr(config, "layer_types", None) is not None:
        changes["layer_types"] = [config.layer_types[i] for i in keep]
    new_config = _derive_config(config, **changes)
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        key = arch.layer_key(name)
        if key is None:
            state[name] = tensor
        elif key[0] in new_index:
            state[f"{arch.LAYER_PREFIX}{new_index[key[0]]}.{key[1]}"] = tensor
    new_model = _build_like(model, new_config, state)
    record = _record("depth", model, new_model, kept={"layers": keep}, request={"keep_layers": list(keep_layers)})
    log.info("kept layers %s of %d (params %d -> %d)", keep, n, record.original["num_parameters"],
             record.new["num_parameters"])
    return new_model, record


def _record(kind: str, model: nn.Module, new_model: nn.Module, **fields) -> PruningRecord:
    config = model.config
    return PruningRecord(kind=kind, model_type=config.model_type,
                         source_model=getattr(config, "name_or_path", None) or None,
                         original=_sizes(config, num_parameters(model)),
                         new=_sizes(new_model.config, num_parameters(new_model)), **fields)


def save_pruned(model: nn.Module, record: PruningRecord, directory: str | Path, tokenizer=None) -> Path:
    """Write a ``save_pretrained`` directory (safetensors) plus ``pruning.json``, atomically."""
    directory = Path(directory)
    record.environment = environment_record(device=str(next(model.parameters()).device))
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if any(tmp.glob("*.bin")) or any(tmp.glob("*.pt")):
            raise RuntimeError("save_pretrained wrote pickle weights; expected safetensors only")
        record.save(tmp / PRUNING_NAME)  # where OverFillModel.from_pruned reads it
    log.info("saved pruned model to %s", directory)
    return directory


# ----------------------------------------------------------------------------------------------
# What a pruned decoder costs per decode step, and how good it is before any training


def size_report(config, hidden=None, intermediate=None, heads=None, round_to: int = 1, dtype_bytes=2) -> dict:
    """Sizes, parameter counts and decode bytes of ``config`` and of its width-pruned config (meta device).

    ``decode_bytes`` is weights only (:func:`overfill_lib.cost.weight_bytes`): the KV cache a step also reads
    grows with the context and is the same for the full model and an OverFill decoder.
    """
    sizes = target_sizes(config, hidden=hidden, intermediate=intermediate, heads=heads, round_to=round_to)
    new = _config_for_sizes(config, sizes)
    out = {"request": {"hidden": hidden, "intermediate": intermediate, "heads": heads, "round_to": round_to},
           "dtype_bytes": cost.dtype_bytes(dtype_bytes), "notes": sizes["notes"]}
    for key, cfg in (("original", config), ("pruned", new)):
        n = count_parameters(cfg)
        out[key] = _sizes(cfg, n) | {"decode_bytes": cost.weight_bytes(cfg, dtype_bytes, num_parameters=n)}
    out["parameter_fraction"] = out["pruned"]["num_parameters"] / out["original"]["num_parameters"]
    return out


# The reply loss and text NLL live in scoring.py with every other measure; named here for the notebooks and
# tests that call them as pruning's.
reply_loss, text_nll = scoring.reply_loss, scoring.text_nll


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """Hold back a logger's INFO lines for the duration of the block (warnings still show)."""
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def sweep(
    model: nn.Module,
    importances: dict[str, Importance],
    ratios,
    eval_fn,
    *,
    heads=None,
    round_to: int = 1,
    dtype_bytes=2,
    progress: bool = True,
):
    """Prune ``model`` by every criterion at every ratio and evaluate each pruned model (no training).

    A ratio is the fraction removed from BOTH hidden channels and MLP neurons (``heads`` as in
    prune_width, the same for every row). ``eval_fn(pruned_model) -> {metric: number}``. Returns a
    DataFrame with one row per (criterion, ratio): the kept sizes, parameter count, ``decode_bytes`` (as in
    :func:`size_report`) and the metrics. Ratio 0 keeps every unit, so it reproduces the unpruned model.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if not importances or not all(isinstance(v, Importance) for v in importances.values()):
        raise ValueError("importances must map a name to an Importance, e.g. {'activation': compute_importance(...)}.")
    ratios = list(ratios)
    if not ratios or any(isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 <= r < 1 for r in ratios):
        raise ValueError(f"ratios={ratios!r} must be fractions removed in [0, 1), e.g. [0.1, 0.25, 0.5].")
    rows = []
    jobs = [(name, float(r)) for name in importances for r in ratios]
    for name, ratio in tqdm(jobs, desc="pruning sweep", unit="model", disable=not progress):
        with _quiet(log):  # one log line per pruned model would bury the notebook; the table holds the sizes
            pruned, record = prune_width(model, importances[name], hidden=ratio, intermediate=ratio, heads=heads,
                                         round_to=round_to)
        metrics = eval_fn(pruned)
        if not isinstance(metrics, dict) or not all(isinstance(v, numbers.Real) for v in metrics.values()):
            raise ValueError(f"eval_fn must return a dict of numbers (e.g. {{'loss': 1.2}}), got {metrics!r}.")
        new = record.new
        rows.append({
            "criterion": name, "ratio": ratio, "heads": heads, "hidden_size": new["hidden_size"],
            "intermediate_size": new["intermediate_size"], "num_attention_heads": new["num_attention_heads"],
            "parameters": new["num_parameters"],
            "decode_bytes": cost.weight_bytes(pruned.config, dtype_bytes, num_parameters=new["num_parameters"]),
            **metrics,
        })
        del pruned
    return pd.DataFrame(rows)


def layer_ablation(model: nn.Module, eval_fn, progress: bool = True):
    """Drop each decoder layer in turn (prune_depth) and evaluate: one row per dropped layer.

    ``eval_fn(model) -> {metric: number}`` as in ``sweep``; measured on the caller's data, so it
    can be the task's own metric (e.g. the reply loss) rather than the calibration loss.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    n = model.config.num_hidden_layers
    if n < 2:
        raise ValueError("layer_ablation needs a model with at least 2 layers (dropping the only layer leaves none).")
    rows = []
    for layer in tqdm(range(n), desc="layer ablation", unit="layer", disable=not progress):
        with _quiet(log):
            shallower, record = prune_depth(model, [i for i in range(n) if i != layer])
        metrics = eval_fn(shallower)
        if not isinstance(metrics, dict) or not all(isinstance(v, numbers.Real) for v in metrics.values()):
            raise ValueError(f"eval_fn must return a dict of numbers (e.g. {{'loss': 1.2}}), got {metrics!r}.")
        rows.append({"dropped_layer": layer, "parameters": record.new["num_parameters"], **metrics})
        del shallower
    return pd.DataFrame(rows)
