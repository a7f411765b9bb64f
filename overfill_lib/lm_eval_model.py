"""The ``overfill`` lm-eval model: an OverFill pair, or one model alone, behind lm-eval's ``HFLM`` interface.

``OverFillLM`` subclasses lm-eval's ``HFLM`` and replaces only the two calls that reach the network: scoring
(``OverFillModel.score``: the full model prefills the context and scores the first continuation token, the decoder
the rest) and generation (``OverFillModel.generate``). A single model runs as an identity pair, which computes what
the plain model computes (tested against ``hf``), so the rows of a comparison share one code path. Importing this
module registers the model with lm-eval; :mod:`overfill_lib.evaluation` runs it. Model arguments are described in
docs/evaluation.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm.auto import tqdm

from overfill_lib.artifacts import PROJECT_ROOT, environment_record, load_causal_lm
from overfill_lib.config import torch_dtype
from overfill_lib.pair import CONFIG_NAME, OverFillModel

log = logging.getLogger(__name__)

# HFLM options that still act here: they shape prompts and tokens, not model loading. HFLM's loading
# options (parallelize, peft, quantization, ...) belong to its own loader, which is not used.
HF_PASSTHROUGH = frozenset(
    {
        "add_bos_token",
        "prefix_token_id",
        "truncation",
        "chat_template_args",
        "enable_thinking",
        "think_end_token",
        "use_fast_tokenizer",
        "max_batch_size",
    }
)


# --------------------------------------------------------------------------------------------------
# Loading what to evaluate
# --------------------------------------------------------------------------------------------------


def _device(device: str | torch.device | None) -> torch.device:
    available = "cuda" if torch.cuda.is_available() else "cpu"
    if device is None:
        return torch.device(available)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's CLI defaults to cuda:0; like its hf model, fall back rather than fail on a CPU box.
        log.warning("device %s requested but CUDA is not available: evaluating on cpu", device)
        return torch.device("cpu")
    return device


def _load_causal_lm(model_id: str | os.PathLike, dtype, revision: str | None):
    from overfill_lib.artifacts import resolve_model

    path = resolve_model(model_id, revision=revision)
    kw = {} if dtype is None else {"dtype": dtype}
    return load_causal_lm(path, "model", **kw).eval(), path


def is_saved_pair(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``OverFillModel.save_pretrained``."""
    for candidate in (Path(path), PROJECT_ROOT / str(path)):
        if (candidate / CONFIG_NAME).is_file():
            return True
    return False


def load_models(
    pretrained: Any = None,
    full: Any = None,
    decoder: Any = None,
    *,
    strategy: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> tuple[OverFillModel, str, str | None]:
    """The pair to evaluate, its role, and where its tokenizer can be loaded from.

    Role: ``overfill`` (a real pair), ``full`` / ``decoder`` (one of them alone) or ``model`` (any single
    model given as ``pretrained``). A single model becomes an identity pair ``OverFillModel(m, m)``.
    Arguments may be paths / hub ids, or loaded objects (an ``OverFillModel`` or a ``PreTrainedModel``).
    """
    from transformers import PreTrainedModel

    if pretrained is None and full is None and decoder is None:
        raise ValueError(
            "nothing to evaluate: give pretrained=DIR (a saved OverFill pair or one model), or full=ID,decoder=DIR "
            "(a pair), or only full=ID / only decoder=DIR (one model alone)"
        )
    if pretrained is not None and (full is not None or decoder is not None):
        raise ValueError(
            "give either pretrained=... or full=.../decoder=..., not both (pretrained names a saved pair or a single model)"
        )
    dtype = torch_dtype(dtype, "dtype")
    device = _device(device)
    source: str | None = None

    def alone(model, name, role):
        return OverFillModel(model, model, "shared_kv", full_id=name), role

    if pretrained is not None:
        if isinstance(pretrained, OverFillModel):
            pair = pretrained
            role = "model" if pair.full is pair.decoder else "overfill"
        elif isinstance(pretrained, PreTrainedModel):
            pair, role = alone(pretrained.eval(), getattr(pretrained.config, "_name_or_path", None) or None, "model")
        elif is_saved_pair(pretrained):
            path = Path(pretrained) if Path(pretrained).is_dir() else PROJECT_ROOT / str(pretrained)
            pair = OverFillModel.from_pretrained(path, dtype=dtype, revision=revision)
            role, source = "overfill", str(path)
        else:
            model, path = _load_causal_lm(pretrained, dtype, revision)
            (pair, role), source = alone(model, str(pretrained), "model"), str(path)
    elif full is not None and decoder is not None:
        if isinstance(full, PreTrainedModel) and isinstance(decoder, PreTrainedModel):
            pair = OverFillModel(full, decoder, strategy or "shared_kv")
        elif isinstance(full, (str, os.PathLike)) and isinstance(decoder, (str, os.PathLike)):
            pair = OverFillModel.from_models(full, decoder, strategy, dtype=dtype)
            from overfill_lib.artifacts import resolve_model

            source = str(resolve_model(full, revision=revision))
        else:
            raise ValueError("full= and decoder= must both be paths/hub ids or both be loaded models")
        role = "overfill"
    else:
        role = "full" if full is not None else "decoder"
        one = full if full is not None else decoder
        if isinstance(one, PreTrainedModel):
            pair, role = alone(one.eval(), getattr(one.config, "_name_or_path", None) or None, role)
        else:
            model, path = _load_causal_lm(one, dtype, revision)
            (pair, role), source = alone(model, str(one), role), str(path)
    pair.to(device)
    pair.eval()
    if pair.tokenizer is None and source is None and pair.full_id and role == "overfill":
        from overfill_lib.artifacts import resolve_model

        source = str(resolve_model(pair.full_id, revision=revision))
    return pair, role, source


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return 1
    text = str(value)
    if text.startswith("auto"):
        raise ValueError(
            "batch_size='auto' is not supported by the overfill model (its probe measures the hf forward, not the "
            "two-stage scoring and generation paths); give an integer, e.g. batch_size=16"
        )
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return size


# --------------------------------------------------------------------------------------------------
# The lm-eval model
# --------------------------------------------------------------------------------------------------


@register_model("overfill")
class OverFillLM(HFLM):
    """lm-eval model for an OverFill pair, or one model through the same path (see the module docstring).

    Args (all also accepted as ``--model_args`` strings):
        pretrained: a saved pair directory, or one causal LM (directory, hub id, or loaded model), or an
            ``OverFillModel`` instance.
        full, decoder: the pair's two models (ids/paths or loaded models); one of them alone evaluates that
            model alone. ``strategy``: pairing strategy for ``full=``/``decoder=`` (default: inferred).
        tokenizer: tokenizer path or instance (default: the pair's, else the full model's directory).
        dtype, device, batch_size, max_length: as for lm-eval's ``hf`` model (``batch_size`` an integer).
        refresh_every: prefill refresh period N for ``generate_until`` (0: never); scoring ignores it.
        revision: hub revision for models named by hub id.
        Other HFLM prompt/tokenization options pass through: add_bos_token, prefix_token_id, truncation,
        chat_template_args, enable_thinking, think_end_token, use_fast_tokenizer.
    """

    def __init__(
        self,
        pretrained: Any = None,
        full: Any = None,
        decoder: Any = None,
        strategy: str | None = None,
        tokenizer: Any = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = None,
        batch_size: int | str | None = 1,
        refresh_every: int = 0,
        max_length: int | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - HF_PASSTHROUGH)
        if unknown:
            raise ValueError(
                f"unknown overfill model argument(s) {unknown}; valid: pretrained, full, decoder, strategy, tokenizer, "
                f"dtype, device, batch_size, refresh_every, max_length, revision, {', '.join(sorted(HF_PASSTHROUGH))}"
            )
        if trust_remote_code:
            raise ValueError("trust_remote_code is off in this project; use models whose architecture transformers ships")
        batch_size = _batch_size(batch_size)
        refresh_every = int(refresh_every or 0)
        if refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0: no prefill refresh), got {refresh_every}")
        pair, role, source = load_models(
            pretrained, full, decoder, strategy=strategy, dtype=dtype, device=device, revision=revision
        )
        tok = self._tokenizer_for(pair, tokenizer, source)
        super().__init__(pretrained=pair.full, tokenizer=tok, batch_size=batch_size, max_length=max_length, **kwargs)
        self.pair = pair
        self.role = role
        self.refresh_every = refresh_every
        self.revision = revision
        # What was evaluated, by name: for a model alone the pair's "full" slot holds that model.
        decoder_name = getattr(pair.decoder.config, "_name_or_path", None) or None
        self._names = {
            "overfill": {"full": pair.full_id, "decoder": decoder_name},
            "full": {"full": pair.full_id},
            "decoder": {"decoder": pair.full_id},
            "model": {"model": pair.full_id},
        }[role]
        self._warned_refresh = False
        log.info("overfill lm-eval model: role=%s strategy=%s device=%s", role, pair.strategy_name, self.device)

    @staticmethod
    def _tokenizer_for(pair: OverFillModel, tokenizer: Any, source: str | None):
        from transformers import AutoTokenizer

        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        if pair.tokenizer is not None:
            return pair.tokenizer
        candidates = [source, getattr(pair.full.config, "_name_or_path", None)]
        for candidate in candidates:
            if candidate and (Path(candidate) / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(candidate)
        raise ValueError("no tokenizer found for this model; pass tokenizer=PATH (a directory holding tokenizer files)")

    # -- scoring ----------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """HFLM's split, except after a line break that is a token of its own.

        lm-eval moves a context's trailing whitespace into the continuation so that ``"Answer:" + " Paris"`` keeps
        the word's leading-space token. A chat template ends the prompt with a line break after the assistant
        header; when the context's tokens are already a prefix of the whole string's, moving it only changes who
        reads that token. Keeping it in the context lets the full model prefill the whole prompt, as in
        generation, and scores exactly the answer tokens (so ``overfill_chat`` gives ``fidelity``'s numbers). A
        single model then differs from lm-eval's ``hf`` only by that line break's own log-prob, the same for every
        candidate continuation; spaces are moved as lm-eval moves them.
        """
        if "\n" in context[len(context.rstrip()) :]:
            whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
            if len(whole) > len(head) and whole[: len(head)] == head:
                return head, whole[len(head) :]
        return super()._encode_pair(context, continuation)

    def _fit_window(self, context: list[int], continuation: list[int]) -> list[int]:
        """Left-truncate the context exactly as HFLM does: the model sees at most ``max_length`` tokens.

        HFLM feeds ``(context + continuation)[-(max_length + 1):][:-1]``; the pair sees the context and all
        but the last continuation token, so it keeps the last ``max_length + 1 - len(continuation)`` context tokens.
        """
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}; "
                "raise max_length in the model arguments"
            )
        return context[-keep:] if len(context) > keep else context

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.refresh_every and not self._warned_refresh:
            log.warning("refresh_every=%d applies to generation only; log-likelihoods are scored without refresh", self.refresh_every)
            self._warned_refresh = True
        # Longest first, as HFLM sorts: batches pad little and an out-of-memory shows up at once.
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        answers: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="overfill loglikelihood")
        for chunk in collator.get_batched(n=override_bs or self.batch_size):
            scored = [i for i, (_, _, cont) in enumerate(chunk) if cont]
            results: list[tuple[float, bool]] = [(0.0, True)] * len(chunk)  # an empty continuation has log-prob 0
            if scored:
                contexts = [self._fit_window(chunk[i][1], chunk[i][2]) for i in scored]
                continuations = [chunk[i][2] for i in scored]
                for i, answer in zip(scored, self.pair.score(contexts, continuations, batch_size=len(scored))):
                    results[i] = answer
            for (request, _, _), answer in zip(chunk, results):
                answers.append(answer)
                if request is not None:  # rolling windows are cached per document by the caller
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                pbar.update(1)
        pbar.close()
        return collator.get_original(answers)

    # -- generation -------------------------------------------------------------------------------

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """Two-stage generation with the task's stop sequences; returns prompt + new ids like ``generate``."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        # lm-eval's greedy convention, as in HFLM: temperature 0 (or unset) without do_sample means greedy.
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample")
        if generation_kwargs["temperature"] == 0.0 and do_sample is None:
            generation_kwargs["do_sample"] = do_sample = False
        if do_sample is False and generation_kwargs["temperature"] == 0.0:
            generation_kwargs.pop("temperature")
        out = self.pair.generate(
            context,
            attention_mask,
            tokenizer=self.tokenizer,
            max_new_tokens=max_length - context.shape[1],
            stop_strings=[s for s in stop if s] or None,
            pad_token_id=self.tokenizer.pad_token_id,
            refresh_every=self.refresh_every,
            **generation_kwargs,
        )
        return out.sequences

    # -- provenance -------------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        """Stored in results["config"]: parameter counts, dtype, role and the environment."""

        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        full, decoder = self.pair.full, self.pair.decoder
        alone = full is decoder
        total = count(full) if alone else count(full) + count(decoder) + count(self.pair.strategy)
        return {
            "model_num_parameters": total,
            "model_dtype": str(next(full.parameters()).dtype),
            "model_revision": self.revision,
            "model_sha": "",
            "overfill": {
                "role": self.role,
                "strategy": None if alone else self.pair.strategy_name,
                "refresh_every": self.refresh_every,
                "batch_size": self.batch_size,
                "max_length": self.max_length,
                "full_parameters": count(full),
                "decoder_parameters": count(decoder),
                **self._names,
                "environment": environment_record(device=str(self.device)),
            },
        }
