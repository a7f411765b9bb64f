"""Timing on any device: seconds per call with warmup, the spread reported with every timing, and the device's copy
bandwidth (the ceiling a memory-bound decode step is compared with). Only torch is imported, for bare GPU machines."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted sequence."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def summarize(samples: Iterable[float]) -> dict[str, float | int]:
    """Median with the 10th and 90th percentiles (the spread reported with every timing)."""
    values = sorted(float(s) for s in samples)
    if not values:
        raise ValueError("summarize needs at least one sample")
    return {"median": _quantile(values, 0.5), "p10": _quantile(values, 0.1), "p90": _quantile(values, 0.9), "n": len(values)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeated(fn: Callable[[], Any], device: torch.device, *, warmup: int, repeats: int, inner: int = 1,
                  before: Callable[[], Any] | None = None) -> list[float]:
    """Seconds per call of ``fn`` (``inner`` calls per sample), after ``warmup`` untimed calls.

    CUDA events around each sample on GPU (no host sync inside a sample), ``perf_counter`` on CPU.
    ``before`` runs ahead of every call and sample, outside the timed region (e.g. a cache rollback).
    """
    device = torch.device(device)
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
            synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000.0 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return samples


def default_copy_bytes(device: torch.device) -> int:
    return (1 << 30) if torch.device(device).type == "cuda" else (256 << 20)


@torch.inference_mode()
def copy_bandwidth(device: str | torch.device, nbytes: int | None = None, *, warmup: int = 3, repeats: int = 10) -> dict:
    """The device's measured copy bandwidth: a large tensor clone moves 2 x its bytes (read + write).

    This is the practical ceiling a decode step is compared with (an H100's is below its spec sheet).
    """
    device = torch.device(device)
    nbytes = int(nbytes or default_copy_bytes(device))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_repeated(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    del src, dst
    stats = summarize(seconds)
    moved = 2 * nbytes
    return {
        "bytes": nbytes,
        "bytes_moved": moved,
        "seconds": stats,
        "bytes_per_s": moved / stats["median"],
        "bytes_per_s_p10": moved / stats["p90"],
        "bytes_per_s_p90": moved / stats["p10"],
        "method": "tensor copy_ (read + write)",
    }
