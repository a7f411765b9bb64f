"""Importance scores for width and depth pruning (Minitron-style, as in the OverFill paper).

One score per prunable unit, higher is more important: ``hidden`` channels, ``intermediate`` MLP neurons and
query ``heads`` per layer, whole ``layers``. Criteria: ``activation`` (the paper's, from forward hooks over
calibration data; padding never enters a statistic), ``magnitude`` and ``random``. The exact definitions and
aggregations are in docs/training.md ("Channel importance and pruning"). ``cached_importance`` computes each
criterion once per set of weights and calibration request and reuses the saved scores.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from overfill_lib import architectures as arch
from overfill_lib import corpus
from overfill_lib.artifacts import atomic_directory, read_json, weights_fingerprint, write_json
from overfill_lib.config import AGGREGATIONS, CRITERIA, SEQ_AGGREGATIONS, CalibrationSection, check_choice, parse
from overfill_lib.generation import positions_from_mask

log = logging.getLogger(__name__)

TENSORS_FILE = "importance.safetensors"
METADATA_FILE = "importance.json"
_SCORE_NAMES = ("hidden", "intermediate", "heads", "layers", "layers_skip_loss", "hidden_per_layer")


@dataclass
class Importance:
    """Scores for every prunable unit of one model, plus where they came from."""

    hidden: torch.Tensor  # [hidden_size]
    intermediate: torch.Tensor  # [num_layers, intermediate_size]
    heads: torch.Tensor  # [num_layers, num_attention_heads]
    layers: torch.Tensor  # [num_layers]
    criterion: str
    model_type: str
    source_model: str | None = None
    aggregation: str | None = None
    seq_aggregation: str | None = None
    num_samples: int = 0
    num_tokens: int = 0
    calibration: str | None = None  # free-text description of the calibration data
    seed: int | None = None
    layers_skip_loss: torch.Tensor | None = None  # [num_layers] loss increase when skipped
    extra: dict = field(default_factory=dict)
    # [num_layers, hidden_size]: each layer's share of ``hidden`` (for per-layer plots; pruning uses ``hidden``).
    # activation: the two norms' statistics of that layer, so hidden == hidden_per_layer.sum(0);
    # magnitude: the norm over that layer's matrices only (embeddings / lm_head belong to no layer).
    hidden_per_layer: torch.Tensor | None = None

    def metadata(self) -> dict:
        """Everything but the tensors, JSON-ready."""
        return {
            "criterion": self.criterion,
            "aggregation": self.aggregation,
            "seq_aggregation": self.seq_aggregation,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "calibration": self.calibration,
            "source_model": self.source_model,
            "model_type": self.model_type,
            "seed": self.seed,
            "shapes": {name: list(t.shape) for name, t in self._tensors().items()},
            "extra": self.extra,
        }

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in _SCORE_NAMES if getattr(self, n) is not None}

    def check_matches(self, config) -> None:
        """ValueError if these scores were computed for a model of another shape than ``config``."""
        want = {
            "hidden": (config.hidden_size,),
            "intermediate": (config.num_hidden_layers, config.intermediate_size),
            "heads": (config.num_hidden_layers, config.num_attention_heads),
            "layers": (config.num_hidden_layers,),
        }
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"importance {name!r} has shape {got} but the model needs {shape}: these scores were computed "
                    f"for another model ({self.source_model!r}); recompute them with compute_importance(model, ...)."
                )

    def save(self, directory: str | Path) -> Path:
        """Write ``importance.safetensors`` and ``importance.json`` into ``directory`` atomically."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            tensors = {n: t.detach().float().cpu().contiguous() for n, t in self._tensors().items()}
            save_file(tensors, tmp / TENSORS_FILE)
            meta = self.metadata() | {"created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            write_json(tmp / METADATA_FILE, meta)
        log.info("saved %s importance to %s", self.criterion, directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Importance:
        directory = Path(directory)
        meta = read_json(directory / METADATA_FILE)
        tensors = load_file(str(directory / TENSORS_FILE))
        return cls(
            **{n: tensors.get(n) for n in _SCORE_NAMES},
            **{k: meta.get(k) for k in ("criterion", "model_type", "source_model", "aggregation", "seq_aggregation",
                                        "calibration", "seed")},
            num_samples=int(meta.get("num_samples") or 0),
            num_tokens=int(meta.get("num_tokens") or 0),
            extra=meta.get("extra") or {},
        )


# ----------------------------------------------------------------------------------------------
# Calibration data


def calibration_batches(data, batch_size: int = 8, pad_token_id: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Normalize calibration data to batches of ``{"input_ids", "attention_mask"}`` tensors.

    Accepts an iterable of batch dicts (``attention_mask`` optional, lists or tensors), a single
    batch dict, a list of token-id lists (batched here, right-padded), or a 2-D tensor of token ids.
    Empty data raises ValueError. Where no mask says which tokens are real, runs of ``pad_token_id`` at
    either end of a sample are padding (masked, with a log line), not signal.
    """
    if isinstance(data, torch.Tensor):
        data = [data] if data.dim() == 1 else list(data)
    elif isinstance(data, Mapping):
        data = [data]
    if data is None:
        raise ValueError("calibration data is None: pass batches of input_ids or a list of token-id lists.")
    items = iter(data)
    first = next(items, None)
    if first is None:
        raise ValueError(
            "calibration data is empty: pass at least one sample (batches with input_ids/attention_mask, or a list "
            "of token-id lists)."
        )
    items = itertools.chain([first], items)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(first, Mapping) and not _is_sample(first):
        for batch in items:
            yield _as_batch(batch, pad_token_id)
    elif _is_sample(first) or _is_token_list(first):
        # Single samples (token lists, or per-sample dicts as a datasets.Dataset yields) are batched here.
        while chunk := list(itertools.islice(items, batch_size)):
            yield _pad([_sample_tokens(x, pad_token_id) for x in chunk], 0 if pad_token_id is None else pad_token_id)
    else:
        raise ValueError(
            f"calibration items must be batch dicts with 'input_ids' or token-id lists, got {type(first).__name__}."
        )


def _is_token_list(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1
    return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(t, numbers.Integral) for t in x[:8])


def _is_sample(x) -> bool:
    """A dict holding ONE sample (1-D input_ids), e.g. an item of a tokenized datasets.Dataset."""
    return isinstance(x, Mapping) and "input_ids" in x and _is_token_list(x["input_ids"])


def _sample_tokens(x, pad_token_id: int | None = None) -> list[int]:
    """Token ids of one sample; a per-sample dict's masked-out tokens are dropped, and without a mask the runs of
    ``pad_token_id`` at either end."""
    if isinstance(x, Mapping):
        if not _is_sample(x):
            raise ValueError("calibration items mix single samples and batches; give one kind.")
        ids = torch.as_tensor(x["input_ids"], dtype=torch.long)
        mask = x.get("attention_mask")
        if mask is not None:
            return ids[torch.as_tensor(mask).bool()].tolist()
        x = ids
    ids = torch.as_tensor(x.tolist() if isinstance(x, torch.Tensor) else list(x), dtype=torch.long)
    return ids[_unpadded(ids[None], pad_token_id)[0].bool()].tolist()


def _unpadded(ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """A mask [batch, length] that drops the runs of ``pad_token_id`` at either end of each row (left or right
    padding); padding ids inside a row are kept (an end-of-turn id often doubles as the pad id)."""
    if pad_token_id is None or ids.numel() == 0:
        return torch.ones_like(ids)
    real = ids != pad_token_id
    after_first = real.long().cumsum(-1) > 0
    before_last = real.flip(-1).long().cumsum(-1).flip(-1) > 0
    mask = (after_first & before_last).long()
    dropped = int(ids.numel() - mask.sum())
    if dropped:
        log.info("calibration: %d padding tokens (id %d) at the ends of samples without an attention mask are masked",
                 dropped, pad_token_id)
    return mask


def _pad(samples: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(1, max(len(s) for s in samples))
    ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _num_batches(data, batch_size: int) -> int | None:
    """Batches calibration_batches will yield, for the progress bar (None when unknown)."""
    if isinstance(data, torch.Tensor):
        return math.ceil(len(data) / max(batch_size, 1)) if data.dim() == 2 else 1
    if not isinstance(data, Sequence) or not data:
        return None
    if isinstance(data[0], Mapping) and not _is_sample(data[0]):
        return len(data)
    return math.ceil(len(data) / max(batch_size, 1))


def _as_batch(batch: Mapping, pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    if "input_ids" not in batch:
        raise ValueError(f"calibration batch has no 'input_ids' (keys: {sorted(batch)})")
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    mask = batch.get("attention_mask")
    mask = _unpadded(ids, pad_token_id) if mask is None else torch.as_tensor(mask, dtype=torch.long).reshape(ids.shape)
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------
# Activation statistics


class _Stats:
    """Running sums of a per-sample statistic m_s over samples: sum m_s, sum m_s^2 and N."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.n = 0

    def add(self, per_sample: torch.Tensor) -> None:
        per_sample = per_sample.double()
        s, sq = per_sample.sum(0), per_sample.square().sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.n += per_sample.shape[0]

    def result(self, aggregation: str) -> torch.Tensor:
        if aggregation == "l2":
            return self.sumsq.sqrt()
        if aggregation == "mean":
            return self.sum / self.n
        return self.sum  # "l1": m_s >= 0, so the sum is the L1 norm over samples


def _per_sample(act: torch.Tensor, mask: torch.Tensor, seq_aggregation: str) -> torch.Tensor:
    """[B, T, C] activation -> [B', C] per-sample statistic over valid tokens (B' = samples with tokens)."""
    act = act.float()
    valid = mask.bool()[..., None]
    # where() rather than multiplying: padded rows may hold NaN/inf from fully masked attention.
    x = torch.where(valid, act.abs() if seq_aggregation == "mean" else act.square(), 0.0)
    count = valid.sum(1).clamp(min=1)
    stat = x.sum(1) / count
    stat = stat if seq_aggregation == "mean" else stat.sqrt()
    return stat[mask.bool().any(1)]


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _ActivationRecorder:
    """Forward hooks that feed per-sample statistics into _Stats; ``remove()`` takes them all off."""

    def __init__(self, model: nn.Module, seq_aggregation: str) -> None:
        config = model.config
        self.seq_aggregation = seq_aggregation
        self.n_heads = config.num_attention_heads
        self.mask: torch.Tensor | None = None
        self.recording = True
        layers = arch.decoder_layers(model)
        self.hidden = [[_Stats(), _Stats()] for _ in layers]
        self.intermediate = [_Stats() for _ in layers]
        self.heads = [_Stats() for _ in layers]
        self.layers = [_Stats() for _ in layers]
        self._layer_inputs: dict[int, torch.Tensor] = {}
        self.handles = []
        try:
            for i, layer in enumerate(layers):
                for j, name in enumerate((arch.INPUT_NORM, arch.POST_ATTENTION_NORM)):
                    self.handles.append(layer.get_submodule(name).register_forward_hook(self._on_norm(i, j)))
                self.handles.append(layer.get_submodule(arch.DOWN_PROJ).register_forward_pre_hook(self._on_down(i)))
                self.handles.append(layer.get_submodule(arch.O_PROJ).register_forward_pre_hook(self._on_o(i)))
                self.handles.append(layer.register_forward_pre_hook(self._on_layer_in(i), with_kwargs=True))
                self.handles.append(layer.register_forward_hook(self._on_layer_out(i)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._layer_inputs.clear()

    def _add(self, stats: _Stats, act: torch.Tensor) -> None:
        stats.add(_per_sample(act, self.mask, self.seq_aggregation))

    def _on_norm(self, i: int, j: int):
        def hook(module, args, output):
            if self.recording:
                self._add(self.hidden[i][j], _hidden_output(output))

        return hook

    def _on_down(self, i: int):
        def hook(module, args):
            if self.recording:
                self._add(self.intermediate[i], args[0])

        return hook

    def _on_o(self, i: int):
        def hook(module, args):
            if self.recording:
                x = args[0]
                head_norms = x.float().unflatten(-1, (self.n_heads, -1)).norm(dim=-1)  # [B, T, heads]
                self._add(self.heads[i], head_norms)

        return hook

    def _on_layer_in(self, i: int):
        def hook(module, args, kwargs):
            if self.recording:
                self._layer_inputs[i] = _hidden_input(args, kwargs)

        return hook

    def _on_layer_out(self, i: int):
        def hook(module, args, output):
            if self.recording:
                x_in = self._layer_inputs.pop(i)
                cos = F.cosine_similarity(x_in.float(), _hidden_output(output).float(), dim=-1)
                self._add(self.layers[i], (1.0 - cos)[..., None])

        return hook


def _skip_layer_hook(module, args, kwargs, output):
    """Forward hook making a decoder layer the identity (its output := its input)."""
    hidden = _hidden_input(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over pairs of valid tokens, and their count."""
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return float(loss[valid.flatten()].sum()), int(valid.sum())


def _source_name(model: nn.Module) -> str | None:
    return getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None


@torch.no_grad()
def activation_importance(
    model: nn.Module,
    data,
    *,
    aggregation: str = "l2",
    seq_aggregation: str = "mean",
    batch_size: int = 8,
    pad_token_id: int | None = None,
    layer_skip_loss: bool = False,
    skip_loss_samples: int | None = None,
    description: str | None = None,
    progress: bool = True,
) -> Importance:
    """Activation importance from calibration ``data`` (see the module docstring for definitions).

    ``layer_skip_loss`` additionally measures, per layer, the mean next-token loss increase when that
    layer is skipped (one extra forward pass per layer and batch), on the batches that hold the first
    ``skip_loss_samples`` samples (all when None): with 30 layers it costs 30 times the calibration.
    """
    arch.check_model(model)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("seq_aggregation", seq_aggregation, SEQ_AGGREGATIONS)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
    batches = calibration_batches(data, batch_size=batch_size, pad_token_id=pad_token_id)
    total = _num_batches(data, batch_size)
    device = next(model.parameters()).device
    n_layers = len(arch.decoder_layers(model))
    was_training = model.training
    model.eval()
    recorder = _ActivationRecorder(model, seq_aggregation)
    num_samples = num_tokens = 0
    base_loss, skip_loss, loss_tokens = 0.0, [0.0] * n_layers, 0
    try:
        for batch in tqdm(batches, total=total, desc="calibration", unit="batch", disable=not progress):
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            if not mask.any():
                continue
            _check_token_ids(ids, model)
            recorder.mask, recorder.recording = mask, True
            kwargs = dict(attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
            logits = model(input_ids=ids, **kwargs).logits
            skip_this_batch = layer_skip_loss and (skip_loss_samples is None or num_samples < skip_loss_samples)
            num_samples += int(mask.any(1).sum())
            num_tokens += int(mask.sum())
            if skip_this_batch:
                recorder.recording = False  # the skipped-layer forwards are not calibration
                loss, count = _lm_loss(logits, ids, mask)
                base_loss, loss_tokens = base_loss + loss, loss_tokens + count
                skip_loss = [total + lost for total, lost in zip(skip_loss, _skipped_layer_losses(model, ids, kwargs))]
    finally:
        recorder.remove()
        model.train(was_training)
    if num_samples == 0:
        raise ValueError("calibration data held no unpadded tokens: every attention_mask was 0.")

    skip = None
    if layer_skip_loss:
        denom = max(loss_tokens, 1)
        skip = torch.tensor([(s - base_loss) / denom for s in skip_loss], dtype=torch.float32)
    log.info("activation importance from %d samples / %d tokens (%s over samples)", num_samples, num_tokens,
             aggregation)
    return _recorded_importance(recorder, model, aggregation, seq_aggregation, skip, num_samples, num_tokens,
                                description)


def _check_token_ids(ids: torch.Tensor, model: nn.Module) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"calibration token ids run from {int(ids.min())} to {int(ids.max())}, but the model's "
                         f"vocabulary has {vocab} entries: were the samples made with another tokenizer?")


def _skipped_layer_losses(model: nn.Module, ids: torch.Tensor, kwargs: dict) -> list[float]:
    """Per decoder layer, the batch's summed next-token loss with that layer made the identity."""
    losses = []
    for layer in arch.decoder_layers(model):
        handle = layer.register_forward_hook(_skip_layer_hook, with_kwargs=True)
        try:
            losses.append(_lm_loss(model(input_ids=ids, **kwargs).logits, ids, kwargs["attention_mask"])[0])
        finally:
            handle.remove()
    return losses


def _recorded_importance(recorder: _ActivationRecorder, model: nn.Module, aggregation: str, seq_aggregation: str,
                         skip: torch.Tensor | None, num_samples: int, num_tokens: int,
                         description: str | None) -> Importance:
    """The :class:`Importance` of what ``recorder`` accumulated over the calibration batches."""
    hidden_per_layer = torch.stack([sum(s.result(aggregation) for s in pair) for pair in recorder.hidden])
    hidden = hidden_per_layer.sum(0)
    return Importance(
        hidden=hidden.float().cpu(),
        intermediate=torch.stack([s.result(aggregation) for s in recorder.intermediate]).float().cpu(),
        heads=torch.stack([s.result(aggregation) for s in recorder.heads]).float().cpu(),
        layers=torch.cat([s.result(aggregation) for s in recorder.layers]).float().cpu(),
        layers_skip_loss=skip,
        hidden_per_layer=hidden_per_layer.float().cpu(),
        criterion="activation",
        model_type=model.config.model_type,
        source_model=_source_name(model),
        aggregation=aggregation,
        seq_aggregation=seq_aggregation,
        num_samples=num_samples,
        num_tokens=num_tokens,
        calibration=description,
    )


# ----------------------------------------------------------------------------------------------
# Weight magnitude and random baselines


@torch.no_grad()
def magnitude_importance(model: nn.Module) -> Importance:
    """L2 norm of all weight-matrix entries that read or write each unit (no data needed)."""
    arch.check_model(model)
    config = model.config
    n_layers, head_dim = config.num_hidden_layers, arch.head_dim_of(config)
    hidden = torch.zeros(config.hidden_size, dtype=torch.float64)
    hidden_per_layer = torch.zeros(n_layers, config.hidden_size, dtype=torch.float64)
    inter = torch.zeros(n_layers, config.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(n_layers, config.num_attention_heads, dtype=torch.float64)
    layers = torch.zeros(n_layers, dtype=torch.float64)
    # named_parameters() lists a tied lm_head/embedding once, so it is counted once.
    for name, param in model.named_parameters():
        layer, axes = arch.param_axes(name)
        if param.dim() != 2:
            continue
        sq = param.detach().double().square().cpu()
        if layer is not None:
            layers[layer] += sq.sum()
        for dim, role in enumerate(axes):
            per_index = sq.sum(1 - dim)  # sum over the other axis
            if role == arch.HIDDEN:
                hidden += per_index
                if layer is not None:
                    hidden_per_layer[layer] += per_index
            elif role == arch.INTERMEDIATE:
                inter[layer] += per_index
            elif role == arch.Q_HEADS:
                heads[layer] += per_index.view(-1, head_dim).sum(1)
    return Importance(
        hidden=hidden.sqrt().float(), intermediate=inter.sqrt().float(), heads=heads.sqrt().float(),
        layers=layers.sqrt().float(), hidden_per_layer=hidden_per_layer.sqrt().float(),
        criterion="magnitude", model_type=config.model_type,
        source_model=_source_name(model),
    )


def random_importance(model: nn.Module, seed: int = 0) -> Importance:
    """Seeded uniform random scores with the model's shapes (a pruning baseline)."""
    arch.check_model(model)
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    n = config.num_hidden_layers
    return Importance(
        hidden=torch.rand(config.hidden_size, generator=gen),
        intermediate=torch.rand(n, config.intermediate_size, generator=gen),
        heads=torch.rand(n, config.num_attention_heads, generator=gen),
        layers=torch.rand(n, generator=gen),
        criterion="random", model_type=config.model_type, source_model=_source_name(model), seed=seed,
    )


def compute_importance(
    model: nn.Module,
    data=None,
    *,
    criterion: str = "activation",
    aggregation: str = "l2",
    seq_aggregation: str = "mean",
    batch_size: int = 8,
    pad_token_id: int | None = None,
    seed: int = 0,
    layer_skip_loss: bool = False,
    skip_loss_samples: int | None = None,
    description: str | None = None,
    progress: bool = True,
) -> Importance:
    """Scores for ``model`` by ``criterion`` ("activation" needs ``data``; the others ignore it)."""
    check_choice("criterion", criterion, CRITERIA)
    if criterion == "magnitude":
        return magnitude_importance(model)
    if criterion == "random":
        return random_importance(model, seed=seed)
    if data is None:
        raise ValueError("criterion='activation' needs calibration data: pass data=[batches or token-id lists].")
    return activation_importance(
        model, data, aggregation=aggregation, seq_aggregation=seq_aggregation, batch_size=batch_size,
        pad_token_id=pad_token_id, layer_skip_loss=layer_skip_loss, skip_loss_samples=skip_loss_samples,
        description=description, progress=progress,
    )


# ----------------------------------------------------------------------------------------------
# Calibration data named by a preset, and importance computed once per model and reused

CALIBRATION_KEYS = tuple(f.name for f in dataclasses.fields(CalibrationSection))
WIKITEXT_REPO = "Salesforce/wikitext"  # the hub dataset whose parquet files the authors' wikitext loader reads
WIKITEXT_SUBSET = "wikitext-2-raw-v1"


def calibration_samples(calibration: Mapping, tokenizer, *, suite_dir: str | Path | None = None) -> tuple[list, str]:
    """Token-id lists for a preset's ``calibration`` section, and a one-line description of them.

    ``source: suite``: the first ``samples`` records of the suite's train split (families alternate,
    so every family is represented), each rendered whole (system, user and reply turns) through the
    tokenizer's chat template; cut to ``seq_len`` tokens when given.

    ``source: wikitext`` (the authors' choice): ``samples`` consecutive windows of ``seq_len`` tokens
    (default 512) of wikitext's train split (``subset``, default wikitext-2-raw-v1), read from local
    files only: the section's ``path`` (a .parquet / .jsonl / .txt file, or a directory of them) or
    the hub cache. Nothing is downloaded here, so an offline machine fails at once, saying how to
    provide the files, instead of waiting on the network.

    ``source: pydoc``: ``samples`` windows of ``seq_len`` tokens (default 512) of real English prose that
    ships with Python (``corpus``: the help topics' calibration split; the held-out topics stay unseen).
    """
    parse(CalibrationSection, calibration, "calibration")
    source = calibration.get("source", "suite")
    samples = calibration.get("samples", 512)
    seq_len = calibration.get("seq_len")
    if source == "suite":
        from overfill_lib import tasks

        if suite_dir is None:
            raise ValueError("calibration source 'suite' needs suite_dir (the preset's suite_dir); pass suite_dir=...")
        records = tasks.load_split(suite_dir, "train")[:samples]
        texts = tokenizer.apply_chat_template([r["messages"] for r in records], tokenize=False)
        # The template already starts with the bos token; the tokenizer must not add another.
        ids = [x[:seq_len] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        cut = f", cut to {seq_len} tokens" if seq_len else ""
        return ids, f"suite train split, first {len(ids)} conversations through the chat template{cut}"
    if source == "wikitext":
        subset = calibration.get("subset", WIKITEXT_SUBSET)
        seq_len = seq_len or 512
        files = _local_text_files(calibration.get("path"), subset)
        ids = corpus.token_windows(_iter_texts(files), tokenizer, samples, seq_len)
        where = calibration.get("path") or f"{WIKITEXT_REPO} (hub cache)"
        return ids, f"{subset} train, {len(ids)} windows of {seq_len} tokens from {where}"
    if source == "pydoc":
        seq_len = seq_len or 512
        ids = corpus.token_windows(corpus.texts("calibration"), tokenizer, samples, seq_len)
        return ids, (f"Python's help topics (pydoc_data.topics, calibration split {corpus.fingerprint('calibration')}), "
                     f"{len(ids)} windows of {seq_len} tokens")
    raise AssertionError(source)  # CalibrationSection admits only the sources above


def _local_text_files(path, subset: str) -> list[Path]:
    """Train-split text files from ``path`` or the hub cache; FileNotFoundError naming the fix if there are none."""
    how = (
        f"download the {WIKITEXT_REPO} files where the hub is reachable (`hf download {WIKITEXT_REPO} --repo-type "
        f"dataset --include '{subset}/*' --local-dir DIR`), copy DIR here and set the preset's calibration.path to "
        f"DIR/{subset} (or any .parquet/.jsonl/.txt text), e.g. overrides={{'calibration': {{'path': '...'}}}}"
    )
    if path is not None:
        root = Path(path)
        if not root.is_absolute():
            from overfill_lib.artifacts import PROJECT_ROOT

            root = root if root.exists() else PROJECT_ROOT / root
        if not root.exists():
            raise FileNotFoundError(f"calibration path {str(path)!r} does not exist; {how}")
    else:
        from huggingface_hub import snapshot_download

        try:  # local_files_only: reads the cache, never the network
            root = Path(snapshot_download(WIKITEXT_REPO, repo_type="dataset", allow_patterns=[f"{subset}/*"],
                                          local_files_only=True)) / subset
        except Exception as e:
            raise FileNotFoundError(f"{WIKITEXT_REPO} ({subset}) is not in the local hub cache "
                                    f"({type(e).__name__}); {how}") from e
    suffixes = (".parquet", ".jsonl", ".txt")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in suffixes)
    train = [p for p in files if "train" in p.name]
    files = train or files
    if not files:
        raise FileNotFoundError(f"no .parquet/.jsonl/.txt text under {root}; {how}")
    return files


def _iter_texts(files: list[Path]) -> Iterator[str]:
    import json

    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            yield from pq.read_table(path, columns=["text"]).column("text").to_pylist()
        elif path.suffix == ".jsonl":
            with path.open() as f:
                yield from (json.loads(line)["text"] for line in f if line.strip())
        else:
            with path.open() as f:
                yield from f


def cached_importance(
    model: nn.Module,
    tokenizer,
    calibration: dict,
    directory: str | Path,
    *,
    suite_dir: str | Path | None = None,
    criteria: Sequence[str] = CRITERIA,
    layer_skip_loss: bool = True,
    seed: int = 0,
    recompute: bool = False,
    progress: bool = True,
) -> dict[str, Importance]:
    """Importance of ``model`` by each criterion, calibrated as a ``calibration`` section says (a preset's:
    ``pipeline.channel_importance``).

    Each criterion's scores are saved under ``directory/<criterion>`` and loaded instead of recomputed when they
    were made by the same request (criterion, aggregation, calibration data, seed) on the same weights.
    """
    for criterion in criteria:
        check_choice("criterion", criterion, CRITERIA)
    calibration = dict(calibration or {})
    aggregation = calibration.get("aggregation", "l2")
    seq_aggregation = calibration.get("seq_aggregation", "mean")
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("seq_aggregation", seq_aggregation, SEQ_AGGREGATIONS)
    directory = Path(directory)
    fingerprint = weights_fingerprint(model)
    data = None
    out = {}
    for criterion in criteria:
        request = {"criterion": criterion, "weights": fingerprint}
        if criterion == "activation":
            request |= {"calibration": {k: calibration.get(k) for k in CALIBRATION_KEYS},
                        "aggregation": aggregation, "seq_aggregation": seq_aggregation,
                        "layer_skip_loss": layer_skip_loss}
        elif criterion == "random":
            request["seed"] = seed
        path = directory / criterion
        if not recompute and (path / METADATA_FILE).exists():
            cached = Importance.load(path)
            if cached.extra.get("request") == request:
                log.info("reusing %s importance from %s", criterion, path)
                out[criterion] = cached
                continue
        if criterion == "activation" and data is None:
            data = calibration_samples(calibration, tokenizer, suite_dir=suite_dir)
        imp = compute_importance(
            model, data[0] if data else None, criterion=criterion, aggregation=aggregation,
            seq_aggregation=seq_aggregation, batch_size=calibration.get("batch_size", 8),
            pad_token_id=tokenizer.pad_token_id, seed=seed, layer_skip_loss=layer_skip_loss,
            skip_loss_samples=calibration.get("skip_loss_samples"),
            description=data[1] if data else None, progress=progress,
        )
        imp.extra["request"] = request
        imp.save(path)
        out[criterion] = imp
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dim (ties broken by position; scores here are continuous, so ties are rare)."""
    return torch.argsort(torch.argsort(x.double(), dim=-1, stable=True), dim=-1, stable=True).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dim (one value per row of a 2-D input)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.square().sum(-1) * rb.square().sum(-1)).sqrt().clamp(min=1e-30)


def rank_agreement(importances: Mapping[str, Importance]):
    """DataFrame: Spearman correlation between every two criteria's rankings, per pruned dimension.

    Hidden channels are ranked once for the model; MLP neurons and heads are ranked within each
    layer (as pruning chooses them), so their value is the mean over layers.
    """
    import pandas as pd

    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(importances.items(), 2):
        rows.append({
            "criteria": f"{name_a} vs {name_b}",
            "hidden": float(spearman(a.hidden, b.hidden)),
            "intermediate (mean over layers)": float(spearman(a.intermediate, b.intermediate).mean()),
            "heads (mean over layers)": float(spearman(a.heads, b.heads).mean()),
        })
    return pd.DataFrame(rows).set_index("criteria")
