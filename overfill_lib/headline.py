"""The GPU headline benchmark: the latency numbers that matter most, in order of importance, inside a short slot.

Points run in order (copy bandwidth, batch-1 decode of the 3B pair on the fast path, eager paths, end to end,
throughput, the 8B pair); one whose estimate would overrun ``--budget`` is skipped and the JSON is rewritten after
every point. Random weights on the device, nothing downloaded, only torch and transformers imported::

    python -m overfill_lib.headline --device cuda --out results/gpu/headline.json   # make gpu-headline
    python -m overfill_lib.headline --dry-run                                       # the plan, on any machine
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from overfill_lib import cost, fast_decode, latency
from overfill_lib.artifacts import environment_record, write_json

log = logging.getLogger(__name__)

PROMPT = 128  # tokens of every prompt: one prompt length, so compiled graphs are shared across points
NEW_TOKENS = 128  # new tokens of the per-token points (batch 1 and throughput); the end-to-end points vary it


@dataclass(frozen=True)
class Point:
    """One measurement: ``kind`` is ``copy`` (bandwidth), ``fast`` (``FastGenerator``), ``eager`` (HF ``generate``,
    or the pair's plain loop for ``overfill``)."""

    kind: str
    why: str
    pair: str = ""
    method: str = ""
    batch: int = 1
    new_tokens: int = 0


PAIRS = ("llama-3.2-3b", "llama-3.1-8b")


def plan(pairs: tuple[str, ...] = PAIRS) -> list[Point]:
    """The points, most important first: every kind of point for the first pair, batch-1 decode for the others."""
    main = pairs[0]
    points = [Point("copy", "device copy bandwidth")]
    points += [Point("fast", "per-token decode at batch 1, fast path", main, m, 1, NEW_TOKENS)
               for m in ("overfill", "decoder", "full")]
    points += [Point("eager", "eager HF generate / the pair's plain loop", main, m, 1, 32)
               for m in ("full", "decoder", "overfill")]
    points += [Point("fast", "OverFill end to end against the decoder alone", main, m, 1, n)
               for n in (256, 1024) for m in ("overfill", "decoder")]
    points += [Point("fast", "throughput against batch", main, "overfill", b, NEW_TOKENS) for b in (4, 16, 64)]
    for other in pairs[1:]:
        points += [Point("fast", "the larger pair, per-token decode at batch 1", other, m, 1, NEW_TOKENS)
                   for m in ("overfill", "decoder", "full")]
    return points


# --------------------------------------------------------------------------------------------------
# Time estimates (for the budget and the dry run)
# --------------------------------------------------------------------------------------------------

# Calibrated on an H200 (results/gpu/headline.json, rounded up): a compiled decode step costs a fixed ~2 ms (kernel
# boundaries, the same for the 3B and 8B shapes) plus its bytes at ~4 TB/s; building a random-weight model takes
# 1-3 s per billion parameters, compiling one decode graph (one per model, batch and cache length) 29-37 s; an
# eager step costs ~1 ms per layer (launch-bound).
GPU = {"bandwidth": 4.0e12, "step_fixed_s": 2.0e-3, "build_s_per_b": 4.0, "compile_s": 36.0, "eager_layer_s": 1.0e-3}
# On a CPU the fast path runs eagerly (no compile): only the tiny suite is meant to run there, as a check.
CPU = {"bandwidth": 5e9, "step_fixed_s": 0.0, "build_s_per_b": 30.0, "compile_s": 0.0, "eager_layer_s": 0.5e-3}
WARMUP, REPEATS = 1, 3


def estimate(points: list[Point], configs: dict, device_kind: str = "cuda") -> list[float]:
    """Seconds each point is expected to take, counting model builds and compiled graphs once."""
    a = GPU if device_kind == "cuda" else CPU
    built: set[str] = set()
    graphs: set[tuple] = set()
    out = []
    for p in points:
        if p.kind == "copy":
            out.append(2.0)
            continue
        full_cfg, dec_cfg = configs[p.pair]
        seconds = 0.0
        if p.pair not in built:
            built.add(p.pair)
            params = sum(cost.parameter_breakdown(c)["total"] for c in (full_cfg, dec_cfg))
            seconds += a["build_s_per_b"] * params / 1e9
        steps = (WARMUP + REPEATS) * p.new_tokens
        if p.kind == "fast":
            # One compiled decode step per (model, batch, cache length); OverFill's steps are the decoder's (its
            # prefill is eager), so it shares graphs with the decoder alone.
            key = (p.pair, "full" if p.method == "full" else "decoder", p.batch, PROMPT + p.new_tokens)
            if key not in graphs:
                graphs.add(key)
                seconds += a["compile_s"]
            cfg = full_cfg if p.method == "full" else dec_cfg
            step = cost.decode_step_bytes(cfg, 2, batch=p.batch, kv_positions=PROMPT + p.new_tokens,
                                          kv_config=full_cfg)["total"]
            seconds += steps * (a["step_fixed_s"] + step / a["bandwidth"])
        else:
            cfg = full_cfg if p.method == "full" else dec_cfg
            seconds += 2 * steps * cfg.num_hidden_layers * a["eager_layer_s"]  # e2e(1) and e2e(N) are both timed
        out.append(round(seconds, 1))
    return out


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _configs(suite: str) -> dict:
    if suite == "real":
        return latency.real_size_pairs()
    from transformers import LlamaConfig

    from overfill_lib.pruning import pruned_config

    tiny = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048)
    small = LlamaConfig(**{**tiny.to_dict(), "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3})
    return {"llama-3.2-3b": (tiny, pruned_config(tiny, hidden=0.5, intermediate=0.5)),
            "llama-3.1-8b": (small, pruned_config(small, hidden=0.5, intermediate=0.5))}


def check_args(device: str, budget_s: float, dry_run: bool = False) -> None:
    """Refuse a budget that no point can be held to (NaN compares false, so ``nan`` would enforce nothing) and a
    CUDA device this torch cannot use (torch's own error is an assertion about how it was compiled)."""
    if not math.isfinite(budget_s) or budget_s < 0:
        raise ValueError(f"--budget {budget_s}: the budget must be a finite number of seconds >= 0 (default 330)")
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device ({e}); use cuda, cuda:N or cpu") from None
    if kind == "cuda" and not dry_run and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) {why}. Run it on a GPU machine, or "
                         "use --device cpu --suite tiny (a check of the machinery) or --dry-run (the plan only)")


class _Bench:
    """One pair of random-weight models at a time on ``device`` (the fast path's generator with them), and the
    measurement of one point into ``results``."""

    def __init__(self, device: torch.device, configs: dict, results: dict):
        self.device, self.configs, self.results = device, configs, results
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.loaded: dict = {}

    def unload(self) -> None:
        self.loaded.clear()
        if self.device.type == "cuda":
            torch.compiler.reset()
            torch.cuda.empty_cache()

    def pair(self, name: str) -> dict:
        if self.loaded.get("name") == name:
            return self.loaded
        self.unload()
        full_cfg, dec_cfg = self.configs[name]
        full = latency.build_random_model(full_cfg, self.device, self.dtype).requires_grad_(False)
        decoder = latency.build_random_model(dec_cfg, self.device, self.dtype).requires_grad_(False)
        # On a CPU this only checks the machinery (tiny models): no compile there.
        compile_step = "auto" if self.device.type == "cuda" else False
        self.loaded.update(name=name, full=full, decoder=decoder,
                           gen=fast_decode.FastGenerator(full, decoder, compile=compile_step),
                           prompts=latency.random_prompts(full_cfg.vocab_size))
        nbytes = cost.dtype_bytes(self.dtype)
        self.results["pairs"][name] = {"dtype": str(self.dtype).removeprefix("torch."), "path": self.loaded["gen"].path,
                                       "full": cost.model_summary(full_cfg, nbytes),
                                       "decoder": cost.model_summary(dec_cfg, nbytes)}
        return self.loaded

    def measure(self, p: Point, record: dict) -> None:
        cleanup = self.loaded["gen"].clear_caches if self.loaded else None
        with latency.oom_guard(record, self.device, cleanup):
            if p.kind == "copy":
                self.results["copy_bandwidth"] = latency.copy_bandwidth(self.device)
                record |= {"status": "ok", "bytes_per_s": self.results["copy_bandwidth"]["bytes_per_s"]}
                return
            m = self.pair(p.pair)
            common = dict(batch=p.batch, prompt=PROMPT, new_tokens=p.new_tokens, prompt_fn=m["prompts"],
                          warmup=WARMUP, repeats=REPEATS)
            if p.kind == "fast":
                record |= latency.measure_fast(m["gen"], p.method, copy_bw=self.results["copy_bandwidth"], **common)
            elif p.method == "overfill":
                record |= latency.measure_pair_generate(m["full"], m["decoder"], **common)
            else:
                record |= latency.measure_hf_generate(m[p.method], **common)
            record["method"] = p.method


def run(*, device: str = "cuda", suite: str = "real", budget_s: float = 330.0, out: str | Path | None = None,
        dry_run: bool = False, points: list[Point] | None = None, pairs: tuple[str, ...] = PAIRS) -> dict:
    """Measure ``points`` (default: :func:`plan` of ``pairs``) in order within ``budget_s`` seconds; the results
    dict."""
    check_args(device, budget_s, dry_run)
    started = time.perf_counter()
    configs = _configs(suite)
    points = points or plan(tuple(pairs))
    estimates = estimate(points, configs, torch.device(device).type)
    results = {
        "format": latency.FORMAT, "version": latency.FORMAT_VERSION, "label": f"headline ({suite})",
        "environment": environment_record(device), "budget_s": budget_s, "suite": suite,
        "plan": [asdict(p) | {"estimate_s": e} for p, e in zip(points, estimates)],
        "estimated_total_s": round(sum(estimates), 1), "copy_bandwidth": None, "pairs": {}, "records": [],
    }
    if dry_run:
        return results
    out = Path(out) if out is not None else None
    bench = _Bench(torch.device(device), configs, results)
    for p, est in zip(points, estimates):
        record = asdict(p) | {"prompt": PROMPT, "estimate_s": est}
        elapsed = time.perf_counter() - started
        if elapsed + est > budget_s:
            reason = f"{elapsed:.0f} s spent, about {est:.0f} s more would overrun the {budget_s:.0f} s budget"
            results["records"].append(record | {"status": "skipped", "reason": reason})
            continue
        t0 = time.perf_counter()
        try:
            bench.measure(p, record)
        except Exception as e:  # noqa: BLE001 - one broken point must not cost the slot's later points
            # The slot is short and paid for: record the failure, say it loudly, go on; main() exits non-zero.
            first_line = (str(e).splitlines() or [""])[0][:300]
            record |= {"status": "error", "error": f"{type(e).__name__}: {first_line}"}
            log.exception("%s %s %s batch %d failed", p.pair or "device", p.kind, p.method, p.batch)
            bench.unload()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        results["records"].append(record)
        log.info("%s %s %s batch %d, %d new tokens: %s in %.0f s (estimated %.0f)", p.pair or "device", p.kind,
                 p.method, p.batch, p.new_tokens, record.get("status"), record["seconds"], est)
        if out is not None:
            write_json(out, results)  # after every point: a run cut off keeps what it measured
    results["total_s"] = round(time.perf_counter() - started, 1)
    if out is not None:
        write_json(out, results)
    return results


def is_headline(results: dict) -> bool:
    """Whether a latency-format results JSON (``results/gpu/``) was written by this benchmark, not by
    :func:`overfill_lib.latency.run_suite` (whose sweeps its figures read)."""
    return "plan" in results and "estimated_total_s" in results


def rows(results: dict) -> list[dict]:
    """One row per point of a headline results JSON, for a table: ms per token, decode tokens per second and the
    share of the copy bandwidth where measured, the status (and why) where not."""
    out = []
    for r in results["records"]:
        if r["kind"] == "copy":
            continue
        ok = r.get("status") == "ok"
        out.append({"pair": r["pair"], "kind": r["kind"], "method": r["method"], "batch": r["batch"],
                    "new tokens": r["new_tokens"], "status": r.get("status"),
                    "ms per token": round(r["per_token_s"]["median"] * 1e3, 3) if ok else None,
                    "tokens/s": round(r.get("decode_tokens_per_s") or r["tokens_per_s"], 1) if ok else None,
                    "share of copy bandwidth": (round(r["bandwidth_fraction"], 3)
                                                if ok and r.get("bandwidth_fraction") is not None else None),
                    "path": r.get("path"), "note": r.get("reason") or r.get("error")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--suite", choices=("real", "tiny"), default="real",
                        help="real: Llama-3.2-3B / 3.1-8B shapes; tiny: the same plan on tiny models (a CPU check)")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds; points that would overrun are skipped")
    parser.add_argument("--out", type=Path, help="results JSON, rewritten after every point")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS),
                        help="the pairs to measure, the first in full (default: both, the 8B pair last, batch-1 "
                             "decode only); --pairs llama-3.1-8b gives a second short slot to the larger pair")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its estimated times only")
    args = parser.parse_args(argv)
    try:
        check_args(args.device, args.budget, args.dry_run)
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = run(device=args.device, suite=args.suite, budget_s=args.budget, out=args.out, dry_run=args.dry_run,
                  pairs=tuple(args.pairs))
    for row in results["plan"] if args.dry_run else results["records"]:
        print(f"{row['estimate_s']:7.1f} s  {row['kind']:5s} {row['pair'] or 'device':13s} {row['method']:8s} "
              f"batch {row['batch']:2d} new {row['new_tokens']:4d}  {row.get('status', row['why'])}")
    print(f"estimated total {results['estimated_total_s']:.0f} s against a budget of {args.budget:.0f} s")
    failed = [r for r in results["records"] if r.get("status") == "error"]
    if failed:
        print(f"{len(failed)} point(s) failed: " + "; ".join(r["error"] for r in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
