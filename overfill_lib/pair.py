"""The OverFill pair: a frozen full model prefills and picks the first token, a smaller decoder generates from its KV.

How the decoder reads the full model's cache is a pairing strategy (:mod:`overfill_lib.pairing`: ``shared_kv``,
``layer_subset``, ``kv_projection``). One computation serves training (``forward_continuation``), scoring
(``score``) and generation (``generate``); a pair saves as the decoder, any projection and a config that names
(and fingerprints) its full model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from overfill_lib import generation
from overfill_lib.artifacts import (
    atomic_directory,
    environment_record,
    load_causal_lm,
    read_json,
    weights_fingerprint,
    write_json,
)
from overfill_lib.config import torch_dtype

# Re-exported: notebooks and tests import the strategies from here, where they lived before their own module.
from overfill_lib.pairing import (  # noqa: F401
    STRATEGIES,
    KVProjection,
    KVShape,
    LayerSubset,
    PairingStrategy,
    SharedKV,
    build_strategy,
    default_layer_map,
    kv_mismatches,
    layer_kv,
    register_strategy,
    suggest_strategy,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "overfill_config.json"
PROJECTION_NAME = "kv_projection.safetensors"
PRUNING_NAME = "pruning.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# What a saved pair records: the decoder's pruning, the full model it read, its config file
# --------------------------------------------------------------------------------------------------


def layers_from_record(record: dict | None) -> list[int] | None:
    """Full-model indices of the decoder's layers from a ``pruning.json`` record, if it pruned depth.

    ``overfill_lib.pruning.prune_depth`` records them as ``kept["layers"]`` (kind "depth"); a flat
    ``keep_layers`` / ``layers`` list is accepted too. Width records keep every layer: None.
    """
    if not record:
        return None
    kept = record.get("kept") if isinstance(record.get("kept"), dict) else {}
    for value in (kept.get("layers"), record.get("keep_layers"), record.get("layers")):
        if isinstance(value, list) and value and all(isinstance(i, int) for i in value):
            return [int(i) for i in value]
    return None


def check_pruning_record(record: dict | None, decoder) -> None:
    """Refuse a ``pruning.json`` record that does not describe ``decoder``: sizes that differ from its config, or a
    width record that also lists kept layers (it would be read as a layer subset)."""
    if not record:
        return
    new = record.get("new") or {}
    differ = {k: (v, getattr(decoder.config, k, None)) for k, v in new.items()
              if k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim") and getattr(decoder.config, k, None) != v}
    if differ:
        said = ", ".join(f"{k} {a} in the record, {b} in the decoder" for k, (a, b) in differ.items())
        raise ValueError(f"the pruning record does not describe this decoder ({said}); pass the decoder's own "
                         "pruning.json, or pruning_record=None")
    if record.get("kind") == "width" and layers_from_record(record) is not None:
        raise ValueError("the pruning record is a width record but lists kept layers; a width-pruned decoder keeps "
                         "every layer (fix the record, or pass pruning_record=None)")


def full_model_identity(full) -> dict:
    """What a saved pair records about its full model, so that loading it beside another one is refused."""
    return {"weights_fingerprint": weights_fingerprint(full), "dtype": str(next(full.parameters()).dtype),
            "parameters": sum(p.numel() for p in full.parameters())}


def check_full_model(saved: dict | None, full, where: str) -> None:
    """Refuse a full model other than the one the pair was saved with (the decoder learned to read that one's
    cache). In another dtype the weights cannot be compared exactly, so only the size is checked."""
    if not saved:
        return  # saved before pairs recorded their full model
    found = full_model_identity(full)
    same = (found["weights_fingerprint"] == saved["weights_fingerprint"] if found["dtype"] == saved["dtype"]
            else found["parameters"] == saved["parameters"])
    if not same:
        raise ValueError(
            f"{where} was saved with another full model (weights fingerprint {saved['weights_fingerprint']}, "
            f"{saved['parameters']:,} parameters, {saved['dtype']}); the one found has {found['weights_fingerprint']}, "
            f"{found['parameters']:,}, {found['dtype']} (retrained or replaced in place?). The decoder learned to read "
            "the saved one's cache: restore that model, or pair on purpose with "
            "OverFillModel.from_pretrained(..., check_full=False)"
        )


def read_pair_config(path: Path) -> dict:
    """``overfill_config.json`` as written by ``OverFillModel.save_pretrained``; anything else is an error naming the
    file and what is wrong with it."""
    cfg = read_json(path)
    redo = "restore it, or save the pair again with OverFillModel.save_pretrained"
    if not isinstance(cfg, dict) or cfg.get("format") != "overfill":
        what = f"format {cfg.get('format')!r}" if isinstance(cfg, dict) else f"a JSON {type(cfg).__name__}"
        raise ValueError(f"{path} is not an OverFill config ({what}; expected an object with format 'overfill', "
                         f"strategy and full_model): {redo}")
    missing = [k for k in ("strategy", "full_model") if not cfg.get(k)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: {redo}")
    for key in ("strategy_args", "full_model_identity", "pruning"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"{path}: {key} should be a JSON object, not {cfg[key]!r}: {redo}")
    return cfg


# --------------------------------------------------------------------------------------------------
# The pair
# --------------------------------------------------------------------------------------------------


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask``ed positions of KL(teacher || student) between next-token distributions [batch, T, vocab].

    Only the masked positions are normalized (a vocabulary-wide softmax per position is the costly part)."""
    keep = mask.to(student_logits.device).reshape(-1).bool()
    if not keep.any():
        return student_logits.sum() * 0.0  # keeps the graph for a batch with nothing to score
    vocab = student_logits.shape[-1]
    log_student = F.log_softmax(student_logits.reshape(-1, vocab)[keep].float(), dim=-1)
    log_teacher = F.log_softmax(teacher_logits.to(student_logits.device).reshape(-1, vocab)[keep].float(), dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


@dataclass
class ContinuationOutput:
    """Logits over the continuation: position t predicts continuation token t.

    ``logits[:, 0]`` is the full model's prediction at the last context position (no grad); the rest
    are the decoder's, computed over ``continuation[:, :-1]`` while attending to the full model's
    context KV (with grad when enabled).
    """

    logits: torch.Tensor  # [batch, T, vocab]
    continuation_mask: torch.Tensor  # [batch, T], 1 on real continuation tokens


def _as_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but this machine has no CUDA device; use device='cpu'")
    return device


class OverFillModel(nn.Module):
    """A frozen full model that prefills and a decoder that generates from its KV cache.

    Args:
        full: the full causal LM (frozen here: ``requires_grad_(False)`` and always in eval mode), unless it is
            also the decoder (an identity pair, which may wrap a model being trained).
        decoder: the causal LM that continues after the first token.
        strategy: a registered strategy name (``shared_kv``, ``layer_subset``, ``kv_projection``) or a
            :class:`PairingStrategy` instance; ``strategy_args`` go to its constructor.
        tokenizer: optional; used for text prompts, chat templates, stop strings, and saved alongside.
        full_id: how to find the full model again (local path or hub id), stored by ``save_pretrained``;
            defaults to ``full.config._name_or_path``.
        pruning_record: the decoder's ``pruning.json`` content, stored with the pair.
        mixed_precision: allow a decoder dtype other than the full model's (training under autocast).
    """

    def __init__(
        self,
        full: PreTrainedModel,
        decoder: PreTrainedModel,
        strategy: str | PairingStrategy = "shared_kv",
        *,
        tokenizer=None,
        full_id: str | os.PathLike | None = None,
        pruning_record: dict | None = None,
        mixed_precision: bool = False,
        **strategy_args: Any,
    ):
        super().__init__()
        if pruning_record is not None and hasattr(pruning_record, "to_dict"):
            pruning_record = pruning_record.to_dict()  # a pruning.PruningRecord
        check_pruning_record(pruning_record, decoder)
        if isinstance(strategy, str):
            if strategy == "layer_subset" and "layers" not in strategy_args:
                layers = layers_from_record(pruning_record)
                if layers is None:
                    raise ValueError("layer_subset needs layers=[full-model indices] (or a pruning record that lists them)")
                strategy_args["layers"] = layers
            strategy = build_strategy(strategy, full.config, decoder.config, **strategy_args)
        elif strategy_args:
            raise TypeError("strategy_args are only accepted with a strategy name")
        self.full = full
        self.decoder = decoder
        self.strategy = strategy
        self.tokenizer = tokenizer
        self.full_id = str(full_id) if full_id is not None else (getattr(full.config, "_name_or_path", "") or None)
        self.pruning_record = pruning_record
        if full is not decoder:  # an identity pair wraps one model, which may be one being trained
            full.requires_grad_(False)
            full.eval()
        # Projection weights live with the decoder (same device and dtype).
        ref = next(decoder.parameters())
        self.strategy.to(device=ref.device, dtype=ref.dtype)
        generation.check_pairable(full, decoder, self.strategy, mixed_precision=mixed_precision)

    # -- basics -----------------------------------------------------------------------------------

    @property
    def strategy_name(self) -> str:
        return self.strategy.name

    @property
    def device(self) -> torch.device:
        return next(self.full.parameters()).device

    def train(self, mode: bool = True) -> OverFillModel:
        super().train(mode)
        if self.full is not self.decoder:
            self.full.eval()  # the full model is frozen: no dropout, whatever the pair's mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Decoder and strategy parameters (the full model is frozen)."""
        return [p for p in [*self.decoder.parameters(), *self.strategy.parameters()] if p.requires_grad]

    # -- the training / scoring path --------------------------------------------------------------

    def forward_continuation(
        self,
        context_ids: torch.Tensor,
        continuation_ids: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        continuation_mask: torch.Tensor | None = None,
    ) -> ContinuationOutput:
        """Logits for every continuation token, computed exactly as generation computes them.

        ``context_ids`` [batch, C] is left-padded (``context_mask`` marks real tokens; every row needs
        at least one), ``continuation_ids`` [batch, T] right-padded. The full model prefills the
        context under ``torch.no_grad`` (it is frozen) and gives the logits for continuation token 0;
        the decoder runs over ``continuation[:, :-1]`` reading that cache (through the strategy, so
        projection weights get gradients too) and gives the logits for tokens 1..T-1. Used by
        :meth:`loss` for training and by :meth:`score` for evaluation.

        Hugging Face gradient checkpointing drops ``past_key_values`` in training mode, which would
        silently cut the decoder off from the prompt, so it is refused here.
        """
        # Read the per-layer flag HF sets, rather than a model property renamed across 5.x releases.
        if self.decoder.training and any(getattr(m, "gradient_checkpointing", False) is True for m in self.decoder.modules()):
            raise ValueError(
                "the decoder has Hugging Face gradient checkpointing enabled, which drops past_key_values in training "
                "mode; the decoder would not see the full model's prompt KV. Disable it for OverFill training."
            )
        device = self.device
        context_ids = context_ids.to(device)
        continuation_ids = continuation_ids.to(device)
        context_mask = torch.ones_like(context_ids) if context_mask is None else context_mask.to(device)
        continuation_mask = (
            torch.ones_like(continuation_ids) if continuation_mask is None else continuation_mask.to(device)
        )
        generation.check_padded(context_ids, context_mask, side="left", what="context", model=self.full)
        generation.check_padded(continuation_ids, continuation_mask, side="right", what="continuation")
        with torch.no_grad():
            prefill = generation.prefill(self.full, context_ids, context_mask)
        first = prefill.logits[:, -1:]
        if continuation_ids.shape[1] < 2:
            return ContinuationOutput(first, continuation_mask)
        cache = self.strategy.decoder_cache(prefill.cache)
        steps = continuation_ids.shape[1] - 1
        positions = prefill.position_ids[:, -1:] + torch.arange(1, steps + 1, device=device)
        out = self.decoder(
            input_ids=continuation_ids[:, :-1],
            attention_mask=torch.cat([context_mask, continuation_mask[:, :-1]], dim=1),
            position_ids=positions,
            **generation.with_cache(self.decoder, cache),
            use_cache=True,
        )
        logits = torch.cat([first.to(out.logits.dtype), out.logits], dim=1)
        return ContinuationOutput(logits, continuation_mask)

    forward = forward_continuation

    def loss(
        self,
        context_ids: torch.Tensor,
        continuation_ids: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        continuation_mask: torch.Tensor | None = None,
        include_first_token: bool = False,
        kind: str = "ce",
    ) -> torch.Tensor:
        """Mean loss of the decoder on continuation tokens 1..T-1, by ``kind``:

        - ``ce``: cross-entropy on the continuation tokens (the OverFill objective);
        - ``kl``: KL(full || pair) between next-token distributions on the same prefixes (logit distillation, as
          Minitron recovers pruned models); the full model reads context + continuation in one frozen forward.

        Token 0 is predicted by the frozen full model, so its loss carries no gradient (its KL is 0); set
        ``include_first_token`` to count it anyway (e.g. to report a comparable validation loss).
        """
        if kind not in ("ce", "kl"):
            raise ValueError(f"unknown loss kind {kind!r}; choose 'ce' (cross-entropy) or 'kl' (distillation)")
        out = self.forward_continuation(context_ids, continuation_ids, context_mask, continuation_mask)
        targets = continuation_ids.to(out.logits.device)
        first = 0 if include_first_token else 1
        logits, mask = out.logits[:, first:], out.continuation_mask[:, first:]
        if kind == "kl":
            context_mask = torch.ones_like(context_ids) if context_mask is None else context_mask
            with torch.no_grad():
                ids = torch.cat([context_ids.to(self.device), targets], 1)
                full_mask = torch.cat([context_mask.to(self.device), out.continuation_mask], 1)
                teacher = self.full(input_ids=ids, attention_mask=full_mask, use_cache=False,
                                    position_ids=generation.positions_from_mask(full_mask)).logits
            return token_kl(logits, teacher[:, context_ids.shape[1] - 1 + first : -1], mask)
        targets = targets[:, first:]
        if mask.sum() == 0:
            return logits.sum() * 0.0  # keeps the graph for an all-single-token batch
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        mask = mask.reshape(-1).to(ce.dtype)
        return (ce * mask).sum() / mask.sum()

    @torch.inference_mode()
    def score(
        self,
        contexts: Sequence[Sequence[int]],
        continuations: Sequence[Sequence[int]],
        batch_size: int = 16,
    ) -> list[tuple[float, bool]]:
        """lm-eval style ``loglikelihood``: per example (sum of continuation log-probs, is_greedy).

        Batched with padding (contexts left, continuations right). The first continuation token's
        probability comes from the full model (as in generation), the rest from the decoder.
        """
        batch_size = generation.check_positive_int(batch_size, "batch_size")
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        # Before padding, which would truncate a float id; the decoder embeds what the full model does.
        generation.check_token_ids(contexts, self.full, "contexts")
        generation.check_token_ids(continuations, self.full, "continuations")
        if any(len(c) == 0 for c in continuations):
            raise ValueError("every continuation needs at least one token")
        pad = generation.pad_token_for(self.full, self.tokenizer)
        results: list[tuple[float, bool]] = []
        for i in range(0, len(contexts), batch_size):
            ctx, ctx_mask = generation.pad_sequences(contexts[i : i + batch_size], pad, side="left")
            cont, cont_mask = generation.pad_sequences(continuations[i : i + batch_size], pad, side="right")
            out = self.forward_continuation(ctx, cont, ctx_mask, cont_mask)
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)
            cont = cont.to(logprobs.device)
            mask = out.continuation_mask.bool()
            token_lp = logprobs.gather(-1, cont.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
            greedy = (logprobs.argmax(-1) == cont) | ~mask
            results += [(float(lp), bool(g)) for lp, g in zip(token_lp.sum(-1).tolist(), greedy.all(-1).tolist())]
        return results

    # -- generation -------------------------------------------------------------------------------

    def generate(self, input_ids=None, attention_mask=None, **kwargs) -> generation.OverFillOutput:
        """Full-model prefill and first token, then decoder steps; see :func:`overfill_lib.generation.generate`."""
        return generation.generate(self, input_ids, attention_mask, **kwargs)

    def chat(self, conversations: Sequence[Sequence[dict]], **kwargs) -> generation.OverFillOutput:
        """Generate replies to a batch of conversations (each a list of {'role', 'content'} messages)."""
        return generation.generate(self, messages=conversations, **kwargs)

    # -- persistence ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the decoder (HF format, safetensors), any projection, the tokenizer and ``overfill_config.json``.

        The directory is replaced atomically. The full model is not copied: it is named by ``full_id``
        (a local path or hub id, stored as given) and resolved at load time.
        """
        if not self.full_id:
            raise ValueError("the full model has no name or path to store; pass full_id= to OverFillModel")
        from safetensors.torch import save_file

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.decoder.save_pretrained(tmp)
            state = {k: v.detach().contiguous().cpu() for k, v in self.strategy.state_dict().items()}
            if state:
                save_file(state, str(tmp / PROJECTION_NAME), metadata={"format": "pt"})
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if self.pruning_record is not None:
                write_json(tmp / PRUNING_NAME, self.pruning_record)
            write_json(
                tmp / CONFIG_NAME,
                {
                    "format": "overfill",
                    "version": FORMAT_VERSION,
                    "full_model": self.full_id,
                    "full_model_identity": full_model_identity(self.full),
                    "full_kv_shape": {k: v for k, v in vars(self.strategy.full_shape).items() if k != "eos"},
                    "strategy": self.strategy.name,
                    "strategy_args": self.strategy.strategy_args(),
                    "projection": PROJECTION_NAME if state else None,
                    "pruning": self.pruning_record,
                    "saved_with": environment_record(device=str(self.device)),
                },
            )
        log.info("saved OverFill pair (%s, full model %s) to %s", self.strategy.name, self.full_id, directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        full: PreTrainedModel | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        check_full: bool = True,
    ) -> OverFillModel:
        """Load a pair saved by :meth:`save_pretrained`; the full model is resolved via ``artifacts.resolve_model``.

        Works offline (``HF_HUB_OFFLINE=1``) when the full model is a local directory or cached.
        Pass ``full`` to reuse an already loaded full model. A full model other than the one the pair was saved
        with is refused unless ``check_full=False`` (pairing on purpose).
        """
        from safetensors.torch import load_file

        from overfill_lib.artifacts import resolve_model

        directory = Path(directory)
        cfg = read_pair_config(directory / CONFIG_NAME)
        dtype = torch_dtype(dtype)
        load_kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            load_kw["dtype"] = dtype
        if full is None:
            full_path = resolve_model(cfg["full_model"], revision=revision)
            full = load_causal_lm(full_path, "full model", **load_kw)
        if check_full:
            check_full_model(cfg.get("full_model_identity"), full, f"the pair in {directory}")
        decoder = load_causal_lm(directory, "decoder", **load_kw)
        tokenizer = None
        if (directory / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
        pair = cls(
            full,
            decoder,
            cfg["strategy"],
            tokenizer=tokenizer,
            full_id=cfg["full_model"],
            pruning_record=cfg.get("pruning"),
            **(cfg.get("strategy_args") or {}),
        )
        if cfg.get("projection"):
            state = load_file(str(directory / cfg["projection"]))
            pair.strategy.load_state_dict(state, strict=True)
        if device is not None:
            pair.to(_as_device(device))
        pair.eval()
        return pair

    @classmethod
    def from_models(
        cls,
        full_id: str | os.PathLike,
        decoder_dir: str | os.PathLike,
        strategy: str | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        trust_remote_code: bool = False,
        **strategy_args: Any,
    ) -> OverFillModel:
        """Pair a full model (local path or hub id) with a decoder directory (e.g. a pruned one).

        Reads the decoder's ``pruning.json`` if present; the strategy defaults to ``layer_subset`` when
        that record lists kept layers and to ``shared_kv`` otherwise. If both directories carry a
        tokenizer, their vocabularies must agree.
        """
        from transformers import AutoTokenizer

        from overfill_lib.artifacts import resolve_model

        decoder_dir = Path(decoder_dir)
        full_path = resolve_model(full_id)
        record = read_json(decoder_dir / PRUNING_NAME) if (decoder_dir / PRUNING_NAME).is_file() else None
        if strategy is None:
            strategy = "layer_subset" if layers_from_record(record) is not None else "shared_kv"
        load_kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            load_kw["dtype"] = torch_dtype(dtype)
        tokenizer = None
        if (full_path / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(full_path, trust_remote_code=trust_remote_code)
            if (decoder_dir / "tokenizer_config.json").is_file():
                other = AutoTokenizer.from_pretrained(decoder_dir, trust_remote_code=trust_remote_code)
                if other.get_vocab() != tokenizer.get_vocab():
                    raise ValueError(f"{full_id} and {decoder_dir} use different tokenizers: they cannot be paired")
        pair = cls(
            load_causal_lm(full_path, "full model", **load_kw),
            load_causal_lm(decoder_dir, "decoder", **load_kw),
            strategy,
            tokenizer=tokenizer,
            full_id=full_id,
            pruning_record=record,
            **strategy_args,
        )
        if device is not None:
            pair.to(_as_device(device))
        return pair.eval()


def compare_generations(full, decoder, tokenizer, conversations: Sequence[Sequence[dict]], *,
                        max_new_tokens: int = 48, pair_label: str = "OverFill"):
    """Greedy replies to the same ``conversations`` from the full model, the decoder alone and the pair
    (full-model prefill, decoder after), one row per conversation."""
    import pandas as pd

    runs = {"full model": OverFillModel(full, full, tokenizer=tokenizer),
            "decoder alone": OverFillModel(decoder, decoder, tokenizer=tokenizer),
            pair_label: OverFillModel(full, decoder, tokenizer=tokenizer)}
    replies = {name: run.chat(conversations, max_new_tokens=max_new_tokens, do_sample=False).texts
               for name, run in runs.items()}
    return pd.DataFrame({"prompt": [c[-1]["content"] for c in conversations], **replies})
