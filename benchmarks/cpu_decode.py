"""CPU decode against the memory roofline: per-token time and read bandwidth, plain ``generate`` vs the fast path.

Prints, for the full model, the decoder and OverFill, in fp32 and bf16: median ms per generated token over
interleaved repetitions, the weight bytes one step reads (``cost``), and that as a fraction of the read bandwidth
measured in the same run (a large tensor sum). Greedy tokens of the fast path are checked against the plain loop in
the same dtype (a difference is printed). Not a test: figures for the latency issue's CPU targets.

    python -m benchmarks.cpu_decode --full artifacts/smollm2-135m/full --decoder artifacts/smollm2-135m/pruned_decoder
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from overfill_lib import cost
from overfill_lib.artifacts import load_model
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.pair import OverFillModel


def read_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    t = time.perf_counter()
    for _ in range(repeats):
        x.sum()
    return repeats * x.numel() * 4 / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", required=True)
    parser.add_argument("--decoder", required=True)
    parser.add_argument("--prompt", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(100, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} thread(s)")
    for dtype in (torch.float32, torch.bfloat16):
        full, _ = load_model(args.full, dtype=dtype)
        decoder, _ = load_model(args.decoder, dtype=dtype)
        fast = FastGenerator(full, decoder, compile=False)
        cases = {"full": (full, full), "decoder": (decoder, decoder), "overfill": (full, decoder)}
        times: dict[tuple[str, str], list[float]] = {}
        same: dict[str, bool] = {}
        for _ in range(args.repeats):  # interleaved, so a noisy moment hits every case alike
            for method, (first, second) in cases.items():
                plain = OverFillModel(first, second).generate(ids, mask, max_new_tokens=args.new_tokens,
                                                              do_sample=False)
                out = fast.generate(ids, mask, method=method, max_new_tokens=args.new_tokens)
                n = min(out.new_tokens.shape[1], plain.new_tokens.shape[1])
                same[method] = same.get(method, True) and torch.equal(out.new_tokens[:, :n], plain.new_tokens[:, :n])
                per_token = plain.timings.decode_s / max(1, plain.timings.decode_steps)
                times.setdefault((method, "plain"), []).append(per_token)
                times.setdefault((method, "fast"), []).append(out.timings.per_token_s)
        for method, (first, second) in cases.items():
            step = cost.weight_bytes(second.config, cost.dtype_bytes(dtype))
            for path in ("plain", "fast"):
                ms = statistics.median(times[method, path])
                print(f"{str(dtype).removeprefix('torch.'):9s} {method:9s} {path:6s} {1e3 * ms:7.2f} ms/token  "
                      f"{step / 1e6:6.1f} MB/step  {step / ms / bandwidth:5.1%} of read bandwidth"
                      + ("" if same[method] else "  (fast and plain greedy tokens differ)"))


if __name__ == "__main__":
    main()
