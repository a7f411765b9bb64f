"""How closely a model or a pair continues as the full model would, on the full model's own greedy answers.

By teacher forcing: ``nll`` per answer token, ``agreement`` (the share of positions where the greedy token is the
full model's: also the acceptance rate as a greedy speculative draft) and ``exact`` (answers reproduced token for
token). ``split_perplexity`` does the same for plain text read in two parts.
"""

from __future__ import annotations

import math

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


@torch.inference_mode()
def answer_fidelity(model, tokenizer, records, batch_size: int = 8) -> dict:
    """``nll``, ``agreement`` and ``exact`` of ``model`` (a causal LM or an OverFill pair) on chat ``records``
    whose last turn is the full model's answer (see the module docstring)."""
    if not records:
        raise ValueError("answer_fidelity needs at least one record; got none.")
    pair = _as_pair(model, tokenizer)
    was_training = pair.decoder.training
    pair.eval()
    contexts, answers = split_records(tokenizer, records)
    pad = generation.pad_token_for(pair.full, tokenizer)
    nll = hits = tokens = exact = 0.0
    order = sorted(range(len(answers)), key=lambda i: len(contexts[i]) + len(answers[i]))  # less padding
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ctx, ctx_mask = generation.pad_sequences([contexts[i] for i in idx], pad, side="left")
            ans, ans_mask = generation.pad_sequences([answers[i] for i in idx], pad, side="right")
            out = pair.forward_continuation(ctx, ans, ctx_mask, ans_mask)
            logprobs = torch.log_softmax(out.logits.float(), -1)
            ans, mask = ans.to(logprobs.device), out.continuation_mask.bool()
            nll -= float(logprobs.gather(-1, ans[..., None]).squeeze(-1).masked_fill(~mask, 0).sum())
            agree = (logprobs.argmax(-1) == ans) & mask
            hits += float(agree.sum())
            tokens += float(mask.sum())
            exact += float((agree | ~mask).all(-1).sum())
    finally:
        pair.train(was_training)
    return {"nll": nll / tokens, "agreement": hits / tokens, "exact": exact / len(records),
            "answers": len(records), "tokens": int(tokens)}


@torch.inference_mode()
def split_perplexity(model, windows: list[list[int]], prefix: int, batch_size: int = 8, tokenizer=None) -> float:
    """Perplexity of each window's tokens after its first ``prefix``, which the pair's full model reads (or the
    model itself, alone). The first scored token comes from whichever model read the prefix."""
    if not windows or any(len(w) <= prefix for w in windows):
        raise ValueError(f"every window needs more than prefix={prefix} tokens")
    pair = _as_pair(model, tokenizer)
    scores = pair.score([w[:prefix] for w in windows], [w[prefix:] for w in windows], batch_size=batch_size)
    return math.exp(-sum(lp for lp, _ in scores) / sum(len(w) - prefix for w in windows))
