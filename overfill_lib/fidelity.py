"""How closely a model or a pair continues as the full model would, on the full model's own greedy answers.

By teacher forcing: ``nll`` per answer token, ``agreement`` (the share of positions where the greedy token is the
full model's: also the acceptance rate as a greedy speculative draft) and ``exact`` (answers reproduced token for
token). ``split_perplexity`` does the same for plain text read in two parts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from overfill_lib import generation
from overfill_lib.pair import OverFillModel


def _as_pair(model, tokenizer=None) -> OverFillModel:
    # A model alone is the identity pair: it prefills and continues itself, exactly as it would generate.
    return model if isinstance(model, OverFillModel) else OverFillModel(model, model, tokenizer=tokenizer)


def split_records(tokenizer, records) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and answer token ids of chat records, encoded as in training (answer + end-of-turn token)."""
    from overfill_lib.teacher import encode_examples

    rows = encode_examples(tokenizer, [r["messages"] if isinstance(r, dict) else r for r in records])
    starts = [next(i for i, t in enumerate(r["labels"]) if t != -100) for r in rows]
    return [r["input_ids"][:k] for r, k in zip(rows, starts)], [r["input_ids"][k:] for r, k in zip(rows, starts)]


def bootstrap_ratio(numerators, denominators, *, resamples: int = 10_000, seed: int = 0,
                    level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)``, resampling the units (answers,
    windows, questions) whole: positions within one unit are not independent, so they are never resampled apart."""
    num = torch.as_tensor(numerators, dtype=torch.float64)
    den = torch.as_tensor(denominators, dtype=torch.float64)
    if num.numel() == 0 or num.shape != den.shape:
        raise ValueError(f"bootstrap needs one numerator per denominator, got {num.numel()} and {den.numel()}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, num.numel(), (resamples, num.numel()), generator=gen)
    ratios = num[pick].sum(1) / den[pick].sum(1)
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return [lo, hi]


def bootstrap_paired(a: tuple[Sequence, Sequence], b: tuple[Sequence, Sequence], *, resamples: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """``ratio(a) - ratio(b)`` for two models scored on the same units (``a`` and ``b``: per-unit numerators and
    denominators), with a percentile interval from resampling the units jointly. Both models see the same resampled
    answers or windows, so the difference is far better determined than two separate intervals would suggest."""
    (an, ad), (bn, bd) = ([torch.as_tensor(v, dtype=torch.float64) for v in pair] for pair in (a, b))
    if not (an.numel() == ad.numel() == bn.numel() == bd.numel() > 0):
        raise ValueError(f"a paired bootstrap needs the same units for both models; got {an.numel()}, {ad.numel()}, "
                         f"{bn.numel()} and {bd.numel()} values")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, an.numel(), (resamples, an.numel()), generator=gen)
    diffs = an[pick].sum(1) / ad[pick].sum(1) - bn[pick].sum(1) / bd[pick].sum(1)
    lo, hi = torch.quantile(diffs, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"difference": float(an.sum() / ad.sum() - bn.sum() / bd.sum()), "ci": [lo, hi]}


@torch.inference_mode()
def answer_fidelity(model, tokenizer, records, batch_size: int = 8, intervals: bool = False,
                    units: bool = False) -> dict:
    """``nll``, ``agreement`` and ``exact`` of ``model`` (a causal LM or an OverFill pair) on chat ``records``
    whose last turn is the full model's answer (see the module docstring); with ``intervals``, a 95% bootstrap
    interval of each over answers (``nll_ci``, ...); with ``units``, the per-answer sums behind them (``per_answer``:
    ``nll``, ``hits``, ``tokens``, ``exact``), for paired comparisons of two models on the same answers."""
    if not records:
        raise ValueError("answer_fidelity needs at least one record; got none.")
    pair = _as_pair(model, tokenizer)
    was_training = pair.decoder.training
    pair.eval()
    contexts, answers = split_records(tokenizer, records)
    pad = generation.pad_token_for(pair.full, tokenizer)
    per = {"nll": [0.0] * len(records), "hits": [0.0] * len(records), "tokens": [0] * len(records),
           "exact": [0.0] * len(records)}
    order = sorted(range(len(answers)), key=lambda i: len(contexts[i]) + len(answers[i]))  # less padding
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ctx, ctx_mask = generation.pad_sequences([contexts[i] for i in idx], pad, side="left")
            ans, ans_mask = generation.pad_sequences([answers[i] for i in idx], pad, side="right")
            out = pair.forward_continuation(ctx, ans, ctx_mask, ans_mask)
            logprobs = torch.log_softmax(out.logits.float(), -1)
            ans, mask = ans.to(logprobs.device), out.continuation_mask.bool()
            nll = -logprobs.gather(-1, ans[..., None]).squeeze(-1).masked_fill(~mask, 0).sum(-1)
            agree = (logprobs.argmax(-1) == ans) & mask
            for j, i in enumerate(idx):
                per["nll"][i] = float(nll[j])
                per["hits"][i] = float(agree[j].sum())
                per["tokens"][i] = int(mask[j].sum())
                per["exact"][i] = float((agree[j] | ~mask[j]).all())
    finally:
        pair.train(was_training)
    out = summarize_answers(per, intervals)
    if units:
        out["per_answer"] = per
    return out


def summarize_answers(per: dict, intervals: bool = False) -> dict:
    """Per token ``nll`` and ``agreement`` and per answer ``exact`` from per-answer sums (``nll``, ``hits``,
    ``tokens``, ``exact``), with 95% bootstrap intervals over answers when ``intervals``."""
    tokens, count = sum(per["tokens"]), len(per["tokens"])
    out = {"nll": sum(per["nll"]) / tokens, "agreement": sum(per["hits"]) / tokens,
           "exact": sum(per["exact"]) / count, "answers": count, "tokens": tokens}
    if intervals:
        out |= {"nll_ci": bootstrap_ratio(per["nll"], per["tokens"]),
                "agreement_ci": bootstrap_ratio(per["hits"], per["tokens"]),
                "exact_ci": bootstrap_ratio(per["exact"], [1] * count)}
    return out


@torch.inference_mode()
def split_perplexity(model, windows: list[list[int]], prefix: int, batch_size: int = 8, tokenizer=None) -> float:
    """Perplexity of each window's tokens after its first ``prefix``, which the pair's full model reads (or the
    model itself, alone). The first scored token comes from whichever model read the prefix."""
    if not windows or any(len(w) <= prefix for w in windows):
        raise ValueError(f"every window needs more than prefix={prefix} tokens")
    pair = _as_pair(model, tokenizer)
    scores = pair.score([w[:prefix] for w in windows], [w[prefix:] for w in windows], batch_size=batch_size)
    return math.exp(-sum(lp for lp, _ in scores) / sum(len(w) - prefix for w in windows))
