"""Every measure of a model's quality, in one place: each rule written once, used by the training probes, the
notebooks (through :mod:`overfill_lib.workloads`), the ablation's scorers, the long runs and the lm-eval tasks.

* **Exact match** (the synthetic suite): a greedy answer equals the reference after :func:`normalize_answer`;
  :func:`exact_match` scores a model per task family and overall.
* **Fidelity to the full model's answers**, by teacher forcing on its own greedy answers (:func:`answer_fidelity`):
  ``nll`` per answer token, ``agreement`` (the share of positions where the greedy token is the full model's: also
  the acceptance rate as a greedy speculative draft) and ``exact`` (answers reproduced token for token).
  :func:`reply_loss` is the per-token NLL of any chat replies (the suite's validation records included).
* **Text**: :func:`text_nll` (each window read alone), :func:`split_perplexity` (the full model reads the first part
  of each window, the decoder the rest) and :func:`summarize_text` (the per-window sums of
  ``windows.text_scores``).
* **Intervals**: percentile bootstrap over whole units (answers, windows), alone (:func:`bootstrap_ratio`) or paired
  for two models scored on the same units (:func:`bootstrap_paired`).
* **lm-eval**: the ``process_results`` and aggregation the task YAMLs in ``lm_tasks/`` name, so lm-eval scores by
  the same rules.

Every function takes a causal LM or an OverFill pair (``pair.OverFillModel``); a model alone is scored as the
identity pair (it prefills and continues itself, exactly as it would generate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

import torch

from overfill_lib.pair import OverFillModel
from overfill_lib.tokens import encode_examples, pad_sequences, pad_token_for

# --------------------------------------------------------------------------------------------------
# Exact match (the synthetic suite)
# --------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    return text.strip()


def answer_matches(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` is the exact answer ``reference`` (both normalized)."""
    return normalize_answer(prediction) == normalize_answer(reference)


def exact_match_scores(records: Iterable[dict], predictions: Iterable[str]) -> dict:
    """Exact match of ``predictions`` against the records' last turns, per family and overall (macro over records)."""
    per: dict[str, list[bool]] = {}
    for record, pred in zip(records, predictions, strict=True):
        per.setdefault(record["family"], []).append(answer_matches(pred, record["messages"][-1]["content"]))
    total = [x for v in per.values() for x in v]
    if not total:
        raise ValueError("no records to score")
    out = {fam: sum(v) / len(v) for fam, v in sorted(per.items())}
    out["overall"] = sum(total) / len(total)
    return out


@torch.no_grad()
def greedy_answers(model, tokenizer, records: list[dict], batch_size: int = 128, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers to the records' prompts (every turn but the last): ``pair.chat`` for an OverFill pair, the
    model's own ``generate`` (left padding) otherwise."""
    model.eval()
    out: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = [r["messages"][:-1] for r in records[i : i + batch_size]]
        if isinstance(model, OverFillModel):
            out += model.chat(chunk, tokenizer=tokenizer, max_new_tokens=max_new_tokens, do_sample=False).texts
            continue
        batch = tokenizer.apply_chat_template(chunk, add_generation_prompt=True, padding=True, return_tensors="pt",
                                              return_dict=True)
        gen = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
        out += tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def exact_match(model, tokenizer, records: list[dict], **kw) -> dict:
    """Exact match per task family and overall of the model's greedy answers (``kw``: :func:`greedy_answers`'s)."""
    return exact_match_scores(records, greedy_answers(model, tokenizer, records, **kw))


def answer_with_latency(model, tokenizer, messages: list[dict], max_new_tokens: int = 16) -> dict:
    """One greedy answer and its wall time; an OverFill pair also reports its prefill / decode split."""
    if isinstance(model, OverFillModel):
        out = model.chat([messages], tokenizer=tokenizer, max_new_tokens=max_new_tokens, do_sample=False)
        t = out.timings
        return {"answer": out.texts[0], "ms": round(1000 * t.total_s, 2), "prefill_ms": round(1000 * t.prefill_s, 2),
                "decode_ms": round(1000 * t.decode_s, 2), "new_tokens": t.new_tokens}
    record = {"family": "", "messages": [*messages, {"role": "assistant", "content": ""}]}
    t0 = time.perf_counter()
    text = greedy_answers(model, tokenizer, [record], max_new_tokens=max_new_tokens)[0]
    return {"answer": text, "ms": round(1000 * (time.perf_counter() - t0), 2), "prefill_ms": None, "decode_ms": None,
            "new_tokens": None}


# --------------------------------------------------------------------------------------------------
# Answers by teacher forcing: fidelity to the full model's own answers, and the reply loss
# --------------------------------------------------------------------------------------------------


def _as_pair(model, tokenizer=None) -> OverFillModel:
    # A model alone is the identity pair: it prefills and continues itself, exactly as it would generate.
    return model if isinstance(model, OverFillModel) else OverFillModel(model, model, tokenizer=tokenizer)


def split_records(tokenizer, records) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and answer token ids of chat records, encoded as in training (answer + end-of-turn token)."""
    rows = encode_examples(tokenizer, [r["messages"] if isinstance(r, dict) else r for r in records])
    starts = [next(i for i, t in enumerate(r["labels"]) if t != -100) for r in rows]
    return [r["input_ids"][:k] for r, k in zip(rows, starts)], [r["input_ids"][k:] for r, k in zip(rows, starts)]


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
    pad = pad_token_for(pair.full, tokenizer)
    per = {"nll": [0.0] * len(records), "hits": [0.0] * len(records), "tokens": [0] * len(records),
           "exact": [0.0] * len(records)}
    order = sorted(range(len(answers)), key=lambda i: len(contexts[i]) + len(answers[i]))  # less padding
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ctx, ctx_mask = pad_sequences([contexts[i] for i in idx], pad, side="left")
            ans, ans_mask = pad_sequences([answers[i] for i in idx], pad, side="right")
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


@torch.no_grad()
def reply_loss(model, tokenizer, records, batch_size: int = 64) -> float:
    """Mean cross-entropy per reply token (reply + end-of-turn) of chat ``records``, prompt tokens excluded.

    ``model`` is a causal LM, or an OverFill pair: then the full model prefills each prompt and predicts the first
    reply token, and the decoder the rest, as in generation (:func:`answer_fidelity`'s ``nll``).

    ``records`` are suite records (with ``messages``) or message lists. Examples are encoded as in training
    (``tokens.encode_examples``), sorted by length to limit padding, right-padded, and each batch's mean (the model's
    own ``labels`` loss) is weighted by its number of reply tokens, so the result is the mean over all reply tokens
    whatever the batching.
    """
    conversations = [r["messages"] if isinstance(r, dict) else r for r in records]
    if not conversations:
        raise ValueError("reply_loss needs at least one record; got none.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(model, "forward_continuation"):  # an OverFill pair: the full model reads the prompt, the decoder the reply
        return answer_fidelity(model, tokenizer, conversations, batch_size=batch_size)["nll"]
    rows = sorted(encode_examples(tokenizer, conversations), key=lambda r: len(r["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids, mask = pad_sequences([r["input_ids"] for r in chunk], pad, side="right")
        labels, _ = pad_sequences([r["labels"] for r in chunk], -100, side="right")
        batches.append((ids, mask, labels))
    total, count = labelled_nll(model, batches)
    if count == 0:
        raise ValueError("the records hold no reply tokens to score.")
    return total / count


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def text_nll(model, windows: list[list[int]], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over token ``windows`` (each scored alone, every token but the first);
    ``exp`` of it is the perplexity."""
    if not windows:
        raise ValueError("text_nll needs at least one window of tokens; got none.")
    batches = []
    for i in range(0, len(windows), batch_size):
        ids, mask = pad_sequences(windows[i : i + batch_size], 0, side="right")
        batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))
    total, count = labelled_nll(model, batches)
    return total / count


@torch.inference_mode()
def labelled_nll(model, batches) -> tuple[float, int]:
    """Summed causal-LM loss over (ids, mask, labels) batches, each batch's mean weighted by its scored tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids, mask, labels in batches:
            tokens = int((labels[:, 1:] != -100).sum())  # the loss shifts labels by one
            if tokens == 0:
                continue
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            total += float(out.loss) * tokens
            count += tokens
    finally:
        model.train(was_training)
    return total, count


@torch.inference_mode()
def split_perplexity(model, windows: list[list[int]], prefix: int, batch_size: int = 8, tokenizer=None) -> float:
    """Perplexity of each window's tokens after its first ``prefix``, which the pair's full model reads (or the
    model itself, alone). The first scored token comes from whichever model read the prefix."""
    if not windows or any(len(w) <= prefix for w in windows):
        raise ValueError(f"every window needs more than prefix={prefix} tokens")
    pair = _as_pair(model, tokenizer)
    scores = pair.score([w[:prefix] for w in windows], [w[prefix:] for w in windows], batch_size=batch_size)
    return math.exp(-sum(lp for lp, _ in scores) / sum(len(w) - prefix for w in windows))


def summarize_text(scores: dict[str, list], intervals: bool = True, seed: int = 0) -> dict:
    """Means per position (``nll``, ``agreement``, ``kl``) of ``windows.text_scores``' per-window sums, with 95%
    bootstrap intervals over windows."""
    n = scores["n"]
    if not sum(n):
        raise ValueError("no scored positions to summarize (text_scores of no windows)")
    out = {"windows": len(n), "positions": int(sum(n))}
    for key, name in (("nll", "nll"), ("agree", "agreement"), ("kl", "kl")):
        out[name] = sum(scores[key]) / sum(n)
        if intervals:
            out[f"{name}_ci"] = bootstrap_ratio(scores[key], n, seed=seed)
    return out


# --------------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# lm-eval: what the task YAMLs in lm_tasks/ name, so the harness scores by the rules above
# --------------------------------------------------------------------------------------------------


def suite_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``overfill_suite``: :func:`answer_matches`, so lm-eval and :func:`exact_match` agree by construction."""
    return {"exact_match": float(answer_matches(results[0], doc["messages"][-1]["content"]))}


def chat_process_results(doc: dict, results: list) -> dict:
    """``overfill_chat``, per document: its answer's summed NLL with its token count (for the per-token mean), and
    whether greedy decoding under teacher forcing reproduces the whole answer."""
    logprob, greedy = results[0]
    return {"nll": (-float(logprob), int(doc["answer_tokens"])), "exact": float(greedy)}


def token_mean(items: list[tuple[float, int]]) -> float:
    """Aggregation of ``overfill_chat``'s ``nll``: summed NLL over summed tokens (each token weighs the same, as in
    :func:`answer_fidelity`)."""
    return sum(n for n, _ in items) / sum(t for _, t in items)
