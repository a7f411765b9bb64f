"""Dense distillation on text windows, in OverFill's layout.

A window is ``window`` consecutive tokens of real text (``stdlib_corpus``): the full model prefills its first
``context`` tokens, and the decoder reads that cache and continues over the rest, the ``continuation``. At every
continuation position the decoder is taught the full model's next-token distribution (KL), so each window gives
``continuation - 1`` dense targets with no generation. The pruned baseline reads the same window alone and is
taught the same distributions at the same positions. Continuation token 0 is the full model's own prediction in
the pair (its KL is 0), so both are scored on tokens 1..T-1.

The full model's distribution at a position depends only on the window, so it is computed once per window
(:class:`TeacherCache`) and reused by every width, seed and method: its ``teacher_topk`` most likely tokens and
their log-probabilities. The KL is then taken over those k tokens plus one bucket for the rest of the vocabulary
(:func:`topk_kl`): an exact KL between the two distributions coarsened to k + 1 outcomes, never above the full
KL, and equal to it when the teacher's mass outside the top k is zero. ``TeacherCache.record`` says how much
mass the top k held.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from overfill_lib.artifacts import read_json, weights_fingerprint, write_json
from overfill_lib.config import WindowSpec
from overfill_lib.scoring import summarize_text

log = logging.getLogger(__name__)

SHARD = 256  # windows per teacher-cache file: a killed build loses at most one shard
LAYOUTS = ("pair", "causal")  # the decoder reads the full model's cache of the context, or the whole window alone


def token_windows(texts, tokenizer, spec: WindowSpec, limit: int | None = None) -> list[list[int]]:
    """Windows over the texts joined by the end-of-text token, one every ``continuation`` tokens: each token is a
    continuation token of exactly one window (packing, no padding); a window's context is the text before it."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} keeps no windows: give a positive number of windows (or None for all)")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to cut into windows (an empty corpus split?)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to join the texts with: give the model's own tokenizer")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        stream += [*ids, eos]
    starts = range(0, len(stream) - spec.window + 1, spec.continuation)
    windows = [stream[s : s + spec.window] for s in starts][:limit]
    if not windows:
        raise ValueError(f"the {len(texts)} text(s) hold {len(stream)} tokens, fewer than one window of {spec.window}: "
                         "give more text or a smaller window")
    return windows


def check_model(model, spec: WindowSpec, max_id: int, what: str = "the model") -> None:
    """Refuse a model the windows cannot go through: a token id it does not embed, a ``teacher_topk`` above its
    vocabulary, or a window longer than its position table (a rotary model would run on, on positions it never
    saw, and every cached distribution would be of text it cannot read)."""
    from overfill_lib.generation import vocab_size_of

    vocab = vocab_size_of(model)
    if vocab is not None and max_id >= vocab:
        raise ValueError(f"the windows hold token id {max_id}, outside {what}'s vocabulary of {vocab}: cut the windows "
                         "with the model's own tokenizer")
    if vocab is not None and spec.teacher_topk > vocab:
        raise ValueError(f"teacher_topk={spec.teacher_topk} is more than {what}'s vocabulary of {vocab} tokens: lower "
                         "recovery.teacher_topk")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions and spec.window > positions:
        raise ValueError(f"a window of {spec.window} tokens is longer than {what}'s {positions} positions "
                         "(max_position_embeddings): lower recovery.window (and context)")


def windows_fingerprint(windows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(torch.tensor(w, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The loss


def topk_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position over the teacher's top-k tokens plus one bucket for the rest.

    ``student_logits`` [..., vocab]; ``teacher_ids``/``teacher_logprobs`` [..., k] (log-probabilities under the
    teacher's full softmax). Returns [...] (fp32)."""
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids.long())
    log_p = teacher_logprobs.float()
    head = (log_p.exp() * (log_p - log_q)).sum(-1)
    # The rest of the vocabulary as one outcome: log(1 - sum p) for both, kept finite when the top k hold it all.
    tiny = torch.finfo(torch.float32).tiny
    log_p_rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(log_p, -1)), min=tiny))
    log_q_rest = torch.log(torch.clamp(-torch.expm1(torch.logsumexp(log_q, -1)), min=tiny))
    return head + log_p_rest.exp() * (log_p_rest - log_q_rest)


def window_loss(model, batch: dict, layout: str, ce_weight: float = 0.0):
    """Mean window loss over continuation tokens 1..T-1: top-k KL to the cached teacher (+ ``ce_weight`` x the
    cross-entropy on the text itself). ``model``: the pair (``pair`` layout) or the decoder alone (``causal``).
    Returns (loss, scored positions)."""
    ids, lp = batch["teacher_ids"][:, 1:], batch["teacher_logprobs"][:, 1:]
    if layout == "pair":
        logits = model.forward_continuation(batch["context_ids"], batch["continuation_ids"]).logits[:, 1:]
        targets = batch["continuation_ids"][:, 1:]
    else:
        t = batch["teacher_ids"].shape[1]  # continuation length: the window's last t tokens
        context = batch["input_ids"].shape[1] - t
        # Only positions context..window-2 are scored: the LM head (a fifth of a small model's weights) skips the rest.
        logits = model(input_ids=batch["input_ids"], logits_to_keep=t, use_cache=False).logits[:, :-1]
        targets = batch["input_ids"][:, context + 1 :]
    loss = topk_kl(logits, ids.to(logits.device), lp.to(logits.device)).mean()
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(logits.float().flatten(0, 1), targets.to(logits.device).flatten())
    return loss, targets.numel()


# ----------------------------------------------------------------------------------------------
# The full model's distributions, computed once per window


@torch.inference_mode()
def teacher_topk(full, windows: torch.Tensor, spec: WindowSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The full model's top-k next-token ids (int32) and log-probabilities (fp16) at each continuation position
    (window positions context-1 .. window-2, predicting continuation tokens 0..T-1): [batch, T, k] each."""
    logits = full(input_ids=windows.to(full.device), logits_to_keep=spec.continuation + 1, use_cache=False).logits
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    top = logprobs.topk(spec.teacher_topk, dim=-1)  # sorted: index 0 is the full model's greedy token
    return top.indices.to(torch.int32).cpu(), top.values.to(torch.float16).cpu()


class TeacherCache:
    """The full model's top-k distributions for a list of windows, in ``directory`` as safetensors shards of
    :data:`SHARD` windows, built resumably (a shard is written whole or not at all) and tied to the full model's
    weights and the windows by ``record.json``; a folder made for other weights or windows is refused."""

    def __init__(self, directory: str | Path, spec: WindowSpec, windows: list[list[int]], full_fingerprint: str):
        if not windows:
            raise ValueError("a teacher cache needs at least one window (token_windows cuts them from text)")
        other = next((i for i, w in enumerate(windows) if len(w) != spec.window), None)
        if other is not None:
            raise ValueError(f"window {other} has {len(windows[other])} tokens, not the spec's {spec.window}: the "
                             "cached distributions would be taken at the wrong positions; cut the windows with "
                             "token_windows and the same WindowSpec")
        self.directory = Path(directory)
        self.spec = spec
        self.windows = windows
        self.request = {"full_model": full_fingerprint, "windows": windows_fingerprint(windows), "count": len(windows),
                        "window": spec.window, "context": spec.context, "topk": spec.teacher_topk}
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        self._id_range: tuple[int, int] | None = None

    def check_model(self, model, what: str = "the model") -> None:
        """:func:`check_model` against these windows (and refuse a negative id, which no model embeds)."""
        if self._id_range is None:
            self._id_range = (min(map(min, self.windows)), max(map(max, self.windows)))
        low, high = self._id_range
        if low < 0:
            raise ValueError(f"the windows hold token id {low}: ids are >= 0; cut the windows with token_windows")
        check_model(model, self.spec, high, what)

    @property
    def record_path(self) -> Path:
        return self.directory / "record.json"

    def _shard_path(self, i: int) -> Path:
        return self.directory / f"shard-{i:05d}.safetensors"

    def _check_request(self) -> dict:
        if not self.record_path.is_file():
            return {}
        record = read_json(self.record_path)
        if record.get("request") != self.request:
            raise ValueError(f"{self.directory} holds the teacher cache of other windows or weights "
                             f"({record.get('request')} vs {self.request}); delete the folder to rebuild it")
        return record

    def build(self, full, batch_size: int = 8) -> TeacherCache:
        """Compute the missing shards with ``full`` (whose weights must match the fingerprint given)."""
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        if weights_fingerprint(full) != self.request["full_model"]:
            raise ValueError("the full model given is not the one this teacher cache is for (weights fingerprint)")
        self.check_model(full, "the full model")
        record = self._check_request()
        self.directory.mkdir(parents=True, exist_ok=True)
        if not record:
            write_json(self.record_path, {"request": self.request, "complete": False})
        shards = range(0, (len(self.windows) + SHARD - 1) // SHARD)
        missing = [i for i in shards if not self._shard_path(i).is_file()]
        mass = []
        for i in tqdm(missing, desc="teacher cache", unit="shard", disable=not missing):
            rows = self.windows[i * SHARD : (i + 1) * SHARD]
            ids, lps = [], []
            for b in range(0, len(rows), batch_size):
                top_ids, top_lp = teacher_topk(full, torch.tensor(rows[b : b + batch_size]), self.spec)
                ids.append(top_ids)
                lps.append(top_lp)
            tensors = {"ids": torch.cat(ids), "logprobs": torch.cat(lps)}
            mass.append(float(tensors["logprobs"].float().exp().sum(-1).mean()))
            tmp = self._shard_path(i).with_suffix(".tmp")
            save_file(tensors, str(tmp))
            tmp.replace(self._shard_path(i))
        record = read_json(self.record_path)
        if not record.get("complete"):
            found = [float(self.shard(i)["logprobs"].float().exp().sum(-1).mean()) for i in shards]
            write_json(self.record_path, {"request": self.request, "complete": True,
                                          "topk_mass_mean": round(sum(found) / len(found), 5),
                                          "topk_mass_min_shard": round(min(found), 5)})
        return self

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._shards:
            from safetensors.torch import load_file

            path = self._shard_path(i)
            try:
                self._shards = {i: load_file(str(path))}  # one shard in memory at a time
            except Exception as e:  # safetensors' own errors name no file
                raise ValueError(f"teacher-cache shard {path} cannot be read ({type(e).__name__}: {e}); delete it and "
                                 "run again: the next build computes the missing shards") from e
        return self._shards[i]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.shard(index // SHARD)
        return found["ids"][index % SHARD], found["logprobs"][index % SHARD]

    @property
    def complete(self) -> bool:
        """Built whole: the record says so and every shard is there (a deleted shard is computed again)."""
        shards = range((len(self.windows) + SHARD - 1) // SHARD)
        return (self.record_path.is_file() and read_json(self.record_path).get("complete", False)
                and all(self._shard_path(i).is_file() for i in shards))

    def summary(self) -> dict:
        return read_json(self.record_path)


# ----------------------------------------------------------------------------------------------
# Training data


class WindowDataset(torch.utils.data.Dataset):
    """Windows with their cached teacher distributions, as rows for :class:`WindowCollator`."""

    def __init__(self, windows: list[list[int]], cache: TeacherCache):
        if len(cache.windows) != len(windows):
            raise ValueError("the teacher cache was built for another list of windows")
        self.windows, self.cache = windows, cache

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        ids, lp = self.cache[i]
        return {"window": self.windows[i], "teacher_ids": ids, "teacher_logprobs": lp}


class WindowCollator:
    """Batches of whole windows (all of one length: no padding) in one of the two layouts: ``pair``, the context
    for the full model and the continuation for the decoder; ``causal``, the whole window for the decoder alone."""

    def __init__(self, context: int, layout: str):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown window layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        self.context, self.layout = context, layout

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([r["window"] for r in rows], dtype=torch.long)
        batch = {"teacher_ids": torch.stack([r["teacher_ids"] for r in rows]),
                 "teacher_logprobs": torch.stack([r["teacher_logprobs"] for r in rows])}
        if self.layout == "pair":
            return {"context_ids": ids[:, : self.context], "continuation_ids": ids[:, self.context :], **batch}
        return {"input_ids": ids, **batch}


# ----------------------------------------------------------------------------------------------
# Scoring


@torch.inference_mode()
def text_scores(model, cache: TeacherCache, indices: list[int] | None = None, batch_size: int = 8) -> dict[str, list]:
    """Per window of ``cache`` (those at ``indices``, default all), over continuation tokens 1..T-1: ``nll`` (sum, of the text's own next token), ``agree`` (count
    of positions whose greedy token is the full model's), ``kl`` (sum, top-k KL to the full model), and ``n``; and
    ``kl_at``/``agree_at``: the same per position (index i: the decoder has read i + 1 continuation tokens), for
    how the gap to the full model grows with distance from the prefill.

    ``model``: an OverFill pair (its full model prefills the context), or a causal LM reading the window alone
    (a pruned decoder; the full model itself gives the reference level)."""
    from overfill_lib.pair import OverFillModel

    spec = cache.spec
    is_pair = isinstance(model, OverFillModel)
    was_training = model.training
    model.eval()
    out: dict[str, list] = {"nll": [], "agree": [], "kl": [], "n": [], "kl_at": [], "agree_at": []}
    indices = list(range(len(cache.windows))) if indices is None else list(indices)
    if not indices:
        raise ValueError("no windows to score: give at least one index (or None for all)")
    outside = [i for i in indices if not (isinstance(i, int) and 0 <= i < len(cache.windows))]
    if outside:
        raise ValueError(f"window indices {outside[:5]} are not windows of this cache (0..{len(cache.windows) - 1})")
    for half, what in ((model.full, "the full model"), (model.decoder, "the decoder")) if is_pair else ((model, "the model"),):
        cache.check_model(half, what)
    try:
        for b in range(0, len(indices), batch_size):
            rows = indices[b : b + batch_size]
            ids = torch.tensor([cache.windows[i] for i in rows])
            t_ids = torch.stack([cache[i][0] for i in rows])[:, 1:]
            t_lp = torch.stack([cache[i][1] for i in rows])[:, 1:]
            if is_pair:
                logits = model.forward_continuation(ids[:, : spec.context], ids[:, spec.context :]).logits[:, 1:]
            else:
                device = next(model.parameters()).device
                logits = model(input_ids=ids.to(device), logits_to_keep=spec.continuation, use_cache=False).logits[:, :-1]
            targets = ids[:, spec.context + 1 :].to(logits.device)
            logprobs = F.log_softmax(logits.float(), -1)
            nll = -logprobs.gather(-1, targets[..., None]).squeeze(-1)
            agree = logprobs.argmax(-1) == t_ids[..., 0].to(logits.device).long()
            kl = topk_kl(logits, t_ids.to(logits.device), t_lp.to(logits.device))
            out["nll"] += nll.sum(-1).tolist()
            out["agree"] += agree.sum(-1).tolist()
            out["kl"] += kl.sum(-1).tolist()
            out["n"] += [targets.shape[1]] * len(rows)
            out["kl_at"] += kl.tolist()
            out["agree_at"] += agree.int().tolist()
    finally:
        model.train(was_training)
    return out


# text_scores' summary (means with bootstrap intervals over windows) is scoring.summarize_text; named here too.
summarize = summarize_text
