"""Where a compiled CPU decode step spends its time: torch.profiler over a few greedy steps of the fast path.

For a preset's full model (or decoder) in fp32, with int8 weights or w8a8, compiled and warmed first; prints the
operators by self CPU time and the wall time per step with and without the profiler, to say what is left in a step
that misses a target (``benchmarks/cpu_decode.py``).

    python -m benchmarks.profile_cpu_step --preset smollm2-135m --dtype float32 --dtype int8
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from overfill_lib import pipeline, quantize
from overfill_lib.artifacts import load_model
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.presets import load_preset

PROMPT = "Explain why the sky is blue, briefly."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtype", action="append", choices=("float32", "int8", "w8a8"))
    parser.add_argument("--method", default="full", choices=("full", "decoder", "overfill"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rows", type=int, default=18)
    parser.add_argument("--kernels", action="store_true",
                        help="name each of inductor's generated C++ kernels in the profile "
                             "(cpp.enable_kernel_profile), instead of one row for the whole compiled graph")
    parser.add_argument("--width", type=int, default=60, help="characters of each operator's name in the table")
    args = parser.parse_args(argv)
    if args.kernels:
        inductor_config.cpp.enable_kernel_profile = True
    preset = load_preset(args.preset)
    full_dir, decoder_dir = pipeline.full_model(preset)[0], pipeline.pruned_decoder(preset)
    for dtype in args.dtype or ["float32", "int8"]:
        full, tokenizer = load_model(full_dir, role="full model")
        decoder, _ = load_model(decoder_dir, role="decoder")
        scheme = quantize.DECODER_WEIGHTS.get(dtype)  # int8 or w8a8: quantized from fp32
        if scheme:
            full, decoder = quantize.quantize_int8(full, scheme), quantize.quantize_int8(decoder, scheme)
        for model in (full, decoder):
            model.requires_grad_(False)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        gen = FastGenerator(full, decoder, compile=True)
        t = time.perf_counter()
        gen.generate(ids, method=args.method, max_new_tokens=args.new_tokens, eos_token_id=None)
        compile_s = time.perf_counter() - t
        plain = [gen.generate(ids, method=args.method, max_new_tokens=args.new_tokens, eos_token_id=None)
                 .timings.per_token_s for _ in range(3)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = gen.generate(ids, method=args.method, max_new_tokens=args.new_tokens, eos_token_id=None)
        print(f"\n{args.preset} {args.method} {dtype}: path {out.path}; first call {compile_s:.1f} s; "
              f"{1e3 * min(plain):.2f} ms per token (best of 3, no profiler), {1e3 * out.timings.per_token_s:.2f} "
              f"under the profiler; {args.new_tokens} steps profiled; {torch.get_num_threads()} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=args.width))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
