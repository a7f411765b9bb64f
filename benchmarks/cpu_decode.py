"""CPU decode against the memory roofline: plain ``generate``, the eager fast path and the compiled one, side by side.

For each preset (its full model and pruned decoder, as :mod:`overfill_lib.pipeline` builds them) and each dtype (fp32,
bf16, int8 weights with fp32 activations, and w8a8: int8 weights and activations, :mod:`overfill_lib.quantize`), the
full model, the decoder and OverFill
generate greedily from one chat prompt, batch 1, every path in turn within each repetition (interleaved, so a noisy
moment hits all alike). Printed and written to ``--out``: median ms per generated
token, the bytes one decode step reads (:mod:`overfill_lib.cost`: weights and static KV cache) over that time as a
fraction of the read bandwidth measured in the same run (a large tensor sum, once per repetition), the compiled fast
path against plain ``generate``, OverFill against the decoder alone, and whether each fast path's greedy tokens equal
the plain path's in the same dtype. Figures, not a test: the latency issue's CPU targets.

    python -m benchmarks.cpu_decode --preset tiny --preset smollm2-135m --out results/cpu/decode.json

Run it on a quiet machine and not under ``OMP_WAIT_POLICY=PASSIVE`` (``make test`` sets that): sleeping OpenMP
threads add a wake-up to each of the step's few hundred parallel kernels and about double its time.

llama.cpp is timed beside the workbook when its ``llama-bench`` and ``llama-quantize`` are found
(:mod:`overfill_lib.llama_cpp`; ``benchmarks/build_llama_cpp.sh`` builds them, ``--no-llama-cpp`` skips them), for a
preset whose full model is a GGUF file: that file and its requantizations (F32, BF16, Q8_0), the full model, the same
new tokens and threads (llama-bench from an empty context: its -d crashes in this build), one llama-bench repetition per
precision at the end of every interleaved round. Without the binaries the benchmark says so and times the workbook
alone.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from overfill_lib import cost, fast_decode, int8_kernel, llama_cpp, pipeline, quantize
from overfill_lib.artifacts import PROJECT_ROOT, environment_record, load_model, weights_fingerprint, write_json
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.pair import OverFillModel
from overfill_lib.presets import load_preset

log = logging.getLogger(__name__)

PROMPT = "Explain why the sky is blue, briefly."
METHODS = ("full", "decoder", "overfill")
PATHS = ("plain", "eager", "compiled")  # plain and compiled are always timed; --paths may leave eager out
# plain: HF generate (full, decoder) or the pair's plain loop (OverFill)
DTYPES = ("float32", "bfloat16", "int8", "w8a8")


@functools.cache
def _read_buffer(megabytes: int) -> torch.Tensor:
    return torch.ones(megabytes * 2**20 // 4)  # one per run, so every sample reads the same pages


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second a tensor sum reads from a buffer far larger than the last-level cache (best of ``repeats``)."""
    x = _read_buffer(megabytes)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def _plain(first, second, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds per token after the first, and the tokens: HF ``generate`` for one model, the plain loop for a pair."""
    mask = torch.ones_like(ids)
    if first is second:
        seconds = []
        for n in (1, new_tokens):
            t = time.perf_counter()
            # eos_token_id=None as an argument (not in a GenerationConfig, which the model's own eos would fill in)
            out = first.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=None)
            seconds.append(time.perf_counter() - t)
        return (seconds[1] - seconds[0]) / (new_tokens - 1), out[:, ids.shape[1]:]
    out = OverFillModel(first, second).generate(ids, mask, max_new_tokens=new_tokens, do_sample=False,
                                                eos_token_id=[])
    return out.timings.per_token_decode_s, out.new_tokens


class LlamaPeer:
    """llama.cpp's full model at some precisions, one ``llama-bench`` repetition each time it is called (at the end of
    every interleaved round), after an untimed context of ``depth`` tokens (0: llama-bench's own default)."""

    def __init__(self, tools: llama_cpp.Tools, files: dict[str, dict], directory: Path, *, new_tokens: int,
                 depth: int, threads: int):
        self.tools, self.files, self.directory = tools, files, directory
        self.new_tokens, self.depth, self.threads = new_tokens, depth, threads
        self.samples: dict[str, list[float]] = {}
        self.runs: dict[str, dict] = {}
        self.timed_with: dict[str, str] = {}

    def __call__(self, precisions: list[str], dtype: str) -> None:
        for precision in precisions:
            run = llama_cpp.bench(self.tools, self.directory / self.files[precision]["file"],
                                  new_tokens=self.new_tokens, depth=self.depth, threads=self.threads)
            self.samples.setdefault(precision, []).extend(run["samples_s_per_token"])
            self.runs[precision] = run
            self.timed_with[precision] = dtype

    def summary(self, kv_config, read_bandwidth: dict[str, float]) -> dict:
        timings = {}
        for precision, samples in self.samples.items():
            s = statistics.median(samples)
            step = llama_cpp.step_bytes(self.files[precision], kv_config, self.depth + self.new_tokens)
            bandwidth = read_bandwidth[self.timed_with[precision]]
            timings[precision] = {"ms_per_token": 1e3 * s, "samples_ms": [1e3 * x for x in samples],
                                  "step_bytes": step, "bytes_per_s": step / s,
                                  "fraction_of_read_bandwidth": step / s / bandwidth,
                                  "timed_in_rounds_of": self.timed_with[precision],
                                  **{k: v for k, v in self.runs[precision].items() if k != "samples_s_per_token"}}
        return {"timings": timings, "files": self.files, "build": self.tools.version(), "depth": self.depth,
                "what": "llama-bench -p 0 -n NEW [-d DEPTH] -t THREADS -r 1 -o json per round: NEW decode steps after "
                        "an untimed context of DEPTH tokens (depth), random tokens fed (no sampling), F16 KV "
                        "cache; step_bytes: the file's tensor bytes (the tied head reads the embedding table) and the "
                        "F16 KV cache; tokens are not compared (llama-bench does not generate text)"}


def measure(full, decoder, ids: torch.Tensor, new_tokens: int, repeats: int, paths=PATHS, peer=None) -> dict:
    """Every method on every path, ``repeats`` interleaved rounds, for one pair already in the dtype to time
    (int8 weights: both models through :func:`overfill_lib.quantize.quantize_int8`). ``peer``: called once at the end
    of every round (llama.cpp's runs, interleaved with the workbook's)."""
    dtype = next(full.parameters()).dtype  # of the activations and the KV cache
    batch = ids.shape[0]
    weights = quantize.weights_of(full)  # "float", "int8" or "w8a8"
    quantized = weights != "float"
    activations = "int8" if weights == "w8a8" else "float"
    for model in (full, decoder):  # the pair's plain loop freezes the full model: a guard change would recompile
        model.requires_grad_(False)
    models = {"full": (full, full), "decoder": (decoder, decoder), "overfill": (full, decoder)}
    fast = {path: FastGenerator(full, decoder, compile=path == "compiled") for path in ("eager", "compiled")
            if path in paths}
    compile_s, cache = {}, fast_decode.compile_cache_counts()
    for method in METHODS:  # compile (and warm) every step before anything is timed
        t = time.perf_counter()
        for gen in fast.values():
            gen.generate(ids, method=method, max_new_tokens=new_tokens, eos_token_id=None)
        compile_s[method] = round(time.perf_counter() - t, 1)
        # and the plain path, whose per-token time is a difference of two calls: a first call's setup in the shorter
        # one made it zero or negative for the test's tiny models
        _plain(*models[method], ids, new_tokens)
    cache = {k: v - cache[k] for k, v in fast_decode.compile_cache_counts().items()}
    seconds: dict[tuple[str, str], list[float]] = {}
    same = {(m, p): True for m in METHODS for p in fast}
    bandwidth = []
    for _ in range(repeats):
        bandwidth.append(read_bandwidth())
        for method in METHODS:
            per_token, tokens = _plain(*models[method], ids, new_tokens)
            seconds.setdefault((method, "plain"), []).append(per_token)
            for path, gen in fast.items():
                out = gen.generate(ids, method=method, max_new_tokens=new_tokens, eos_token_id=None)
                seconds.setdefault((method, path), []).append(out.timings.per_token_s)
                same[method, path] &= torch.equal(out.new_tokens, tokens)
        if peer is not None:
            peer()
    read_bw = statistics.median(bandwidth)
    nbytes = cost.dtype_bytes(dtype)
    result = {"dtype": weights if quantized else str(dtype).removeprefix("torch."),
              "activations": str(dtype).removeprefix("torch."), "read_bandwidth_bytes_per_s": read_bw,
              # which int8 product ran, eagerly and compiled: the project's kernel or F.linear (inductor's reduction)
              "int8_kernel": {"isa": int8_kernel.isa(), "eager": int8_kernel.use_kernel(False, activations),
                              "compiled": int8_kernel.use_kernel(True, activations)} if quantized else None,
              # compiled, the full model's fp32 weights: inductor's GEMM template (AVX-512) or its reductions
              "fp32_gemm_template": fast_decode.fp32_gemm_template(full),
              "read_bandwidth_samples": bandwidth, "compile_and_warm_s": compile_s, "compile_cache": cache,
              "batch": batch, "paths": list(paths),
              "methods": {}}
    for method in METHODS:
        step_model = full if method == "full" else decoder
        step = cost.decode_step_bytes(step_model.config, nbytes, batch=batch, kv_positions=ids.shape[1] + new_tokens,
                                      kv_config=full.config, weight_bytes_per_value=1 if quantized else None)["total"]
        row = {"step_bytes": step}
        for path in paths:
            s = statistics.median(seconds[method, path])
            row[path] = {"ms_per_token": 1e3 * s, "tokens_per_s": batch / s,
                         "samples_ms": [1e3 * x for x in seconds[method, path]],
                         "bytes_per_s": step / s, "fraction_of_read_bandwidth": step / s / read_bw}
            if path != "plain":
                row[path]["tokens_equal_plain"] = same[method, path]
        row["compiled_over_plain"] = row["compiled"]["ms_per_token"] / row["plain"]["ms_per_token"]
        result["methods"][method] = row
    m = result["methods"]
    result["overfill_over_decoder"] = {p: m["overfill"][p]["ms_per_token"] / m["decoder"][p]["ms_per_token"]
                                       for p in paths}
    return result


def report(name: str, r: dict) -> None:
    bandwidth = r["read_bandwidth_bytes_per_s"] / 1e9
    paths = r.get("paths", PATHS)
    print(f"\n{name}, {r['dtype']}: read bandwidth {bandwidth:.1f} GB/s (median of the run)")
    print(f"{'':9s} {'MB/step':>8s} " + " ".join(f"{p + ' ms':>11s}" for p in paths)
          + f" {'compiled/plain':>15s} {'compiled GB/s':>14s} {'of read bw':>11s}  fast tokens == plain")
    for method, row in r["methods"].items():
        c = row["compiled"]
        tokens = ", ".join(f"{p} {'yes' if row[p]['tokens_equal_plain'] else 'NO'}" for p in paths if p != "plain")
        times = " ".join(f"{row[p]['ms_per_token']:11.2f}" for p in paths)
        print(f"{method:9s} {row['step_bytes'] / 1e6:8.1f} {times} {row['compiled_over_plain']:15.2f} "
              f"{c['bytes_per_s'] / 1e9:14.1f} {c['fraction_of_read_bandwidth']:11.0%}  {tokens}")
    o = r["overfill_over_decoder"]
    print("OverFill / decoder alone: " + ", ".join(f"{p} {o[p]:.2f}x" for p in paths))


def report_peer(name: str, peer: dict, dtypes: dict) -> None:
    """llama.cpp's full model beside the workbook's compiled full model, decoder and OverFill, per precision."""
    print(f"\n{name}: llama.cpp full model vs the workbook's compiled fast path (ms per token; x: llama.cpp's full "
          "model time over this one's)")
    for precision, t in peer["timings"].items():
        dtype = llama_cpp.PRECISIONS[precision]
        line = (f"{precision:5s} llama.cpp full {t['ms_per_token']:7.2f} ms ({t['step_bytes'] / 1e6:6.1f} MB/step, "
                f"{t['fraction_of_read_bandwidth']:4.0%} of read bw)")
        for method, m in (dtypes.get(dtype) or {}).get("methods", {}).items():
            ms = m["compiled"]["ms_per_token"]
            line += f" | {dtype} {method} {ms:6.2f} ({t['ms_per_token'] / ms:.2f}x)"
        print(line)


def peer_batched(peer: LlamaPeer, args, prompt_tokens: int, batched: dict) -> dict:
    """llama.cpp's decode throughput at the run's batch sizes (``llama-batched-bench``, one run per precision whose
    workbook dtype was timed batched), printed beside the workbook's compiled tokens per second."""
    out = {}
    for precision, dtype in llama_cpp.PRECISIONS.items():
        if precision not in peer.files or dtype not in batched:
            continue
        rows = llama_cpp.batched_bench(args.llama_cpp_bin, peer.directory / peer.files[precision]["file"],
                                       prompt=prompt_tokens, new_tokens=args.new_tokens, batches=sorted(args.batch),
                                       threads=peer.threads)
        if rows is None:
            print("llama.cpp batched: no llama-batched-bench beside llama-bench; build it with "
                  f"{llama_cpp.BUILD_SCRIPT}")
            return {}
        out[precision] = {str(b): r for b, r in rows.items()}
        for b, r in rows.items():
            ours = batched.get(dtype, {}).get(str(b), {}).get("methods", {})
            line = f"{precision:5s} batch {b:2d}: llama.cpp full {r['tokens_per_s']:7.1f} tok/s"
            for method, m in ours.items():
                line += f" | {dtype} {method} {m['compiled']['tokens_per_s']:7.1f}"
            print(line)
    return out


def _relative(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def llama_peer(preset, tools, args, depth: int) -> LlamaPeer | None:
    """llama.cpp's GGUF files for ``preset`` (its full model's GGUF source), or None (and why) when it has none."""
    source = preset.full_model.gguf
    if source is None:
        print(f"llama.cpp peer: {preset.name} has no full_model.gguf source; workbook alone")
        return None
    directory = args.gguf_dir or preset.workdir / "llama_cpp"
    files = llama_cpp.prepare_ggufs(source, directory, tools, args.llama_precision)  # a typed gguf_models.GGUFSource
    return LlamaPeer(tools, files, Path(directory), new_tokens=args.new_tokens, depth=args.llama_depth,
                     threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="repeatable; default: tiny and smollm2-135m")
    parser.add_argument("--dtype", action="append", choices=DTYPES,
                        help="repeatable; int8: int8 weights, fp32 activations; w8a8: int8 activations too "
                             "(overfill_lib.quantize); default: all")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help="paths to time (plain and compiled always are); default: all")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="batch sizes (default 1); each beyond 1 times every dtype again on that many copies of "
                             "the prompt, and llama.cpp's llama-batched-bench at the same sizes when it is built")
    parser.add_argument("--compile-cache", type=Path, default=fast_decode.DEFAULT_COMPILE_CACHE,
                        help="inductor's cache directory, kept across runs (default: %(default)s); a warm cache "
                             "skips the C++ compile of every graph it has seen")
    parser.add_argument("--no-llama-cpp", action="store_true", help="do not time llama.cpp even when it is built")
    parser.add_argument("--llama-precision", action="append", choices=list(llama_cpp.PRECISIONS),
                        help="repeatable; llama.cpp's precisions to time; default: all")
    parser.add_argument("--llama-cpp-bin", type=Path, help="llama.cpp's bin/ (default: $LLAMA_CPP_BIN or "
                                                           "build/llama.cpp/bin)")
    parser.add_argument("--llama-depth", type=int, default=0,
                        help="llama-bench's untimed context (-d) before the timed steps; default 0: the llama-bench of "
                             "llama-cpp-python 0.3.36 crashes with -d (segfault) on this project's machine")
    parser.add_argument("--gguf-dir", type=Path, help="where the GGUF files are made (default: <workdir>/llama_cpp)")
    parser.add_argument("--out", type=Path, help="results JSON, rewritten after every preset and dtype")
    args = parser.parse_args(argv)
    args.batch = sorted(set(args.batch))
    if 1 not in args.batch or any(b < 1 for b in args.batch):
        parser.error(f"--batch {args.batch}: batch sizes are >= 1 and include 1 (the llama.cpp comparison's)")
    cache_dir = fast_decode.use_compile_cache(args.compile_cache)
    args.paths = [p for p in PATHS if p in {"plain", "compiled", *args.paths}]
    args.llama_precision = args.llama_precision or list(llama_cpp.PRECISIONS)
    logging.basicConfig(level=logging.WARNING)
    policy = os.environ.get("OMP_WAIT_POLICY")
    if (policy or "").upper() == "PASSIVE":
        log.warning("OMP_WAIT_POLICY=PASSIVE: every parallel kernel pays a thread wake-up; unset it for figures")
    tools = None if args.no_llama_cpp else llama_cpp.find_tools(args.llama_cpp_bin)
    if tools is None and not args.no_llama_cpp:
        print(llama_cpp.missing_message(args.llama_cpp_bin))
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    int8_kernel.load()
    # what code ran: ATEN_CPU_CAPABILITY=avx2 caps torch's kernels, inductor's and the project's kernel at AVX2; MKL's
    # and oneDNN's own settings cap theirs
    isa = {"inductor": str(pick_vec_isa()) or "none", "int8_kernel": int8_kernel.isa(),
           **{name.lower(): os.environ.get(name)
              for name in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")}}
    results = {"benchmark": "cpu_decode", "environment": environment_record("cpu"), "isa": isa,
               "omp_wait_policy": policy, "prompt": PROMPT, "new_tokens": args.new_tokens, "repeats": args.repeats,
               "batch": 1, "batches": sorted(args.batch), "compile_cache": _relative(cache_dir),
               "threads": torch.get_num_threads(), "presets": {}}
    for name in args.preset or ["tiny", "smollm2-135m"]:
        preset = load_preset(name)
        full_dir, decoder_dir = pipeline.full_model(preset)[0], pipeline.pruned_decoder(preset)
        full, tokenizer = load_model(full_dir, role="full model")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        results["presets"][name] = record = {
            "prompt_tokens": ids.shape[1], "full_dir": _relative(full_dir), "decoder_dir": _relative(decoder_dir),
            "full_weights": weights_fingerprint(full),
            "decoder_weights": weights_fingerprint(load_model(decoder_dir, role="decoder")[0]), "dtypes": {}}
        kv_config = full.config
        peer = llama_peer(preset, tools, args, ids.shape[1]) if tools is not None else None
        dtypes = args.dtype or list(DTYPES)
        rounds = llama_cpp.rounds_for(args.llama_precision, dtypes)
        for dtype in dtypes:
            scheme = quantize.DECODER_WEIGHTS.get(dtype)  # int8 or w8a8: quantized from fp32
            load_dtype = torch.float32 if scheme else getattr(torch, dtype)
            full, _ = load_model(full_dir, dtype=load_dtype, role="full model")
            decoder, _ = load_model(decoder_dir, dtype=load_dtype, role="decoder")
            if scheme:
                full, decoder = quantize.quantize_int8(full, scheme), quantize.quantize_int8(decoder, scheme)
            r = measure(full, decoder, ids, args.new_tokens, args.repeats, args.paths,
                        peer=functools.partial(peer, rounds[dtype], dtype) if peer is not None and rounds[dtype] else None)
            record["dtypes"][dtype] = r
            report(name, r)
            for b in sorted(set(args.batch) - {1}):  # after batch 1, whose rounds interleave llama-bench
                rb = measure(full, decoder, ids.repeat(b, 1), args.new_tokens, args.repeats, args.paths)
                record.setdefault("batched", {}).setdefault(dtype, {})[str(b)] = rb
                report(f"{name} batch {b}", rb)
            if peer is not None:
                bandwidth = {d: v["read_bandwidth_bytes_per_s"] for d, v in record["dtypes"].items()}
                record["llama_cpp"] = peer.summary(kv_config, bandwidth)
            if args.out:
                write_json(args.out, results)
        if peer is not None:
            report_peer(name, record["llama_cpp"], record["dtypes"])
            if len(args.batch) > 1:
                record["llama_cpp_batched"] = peer_batched(peer, args, ids.shape[1], llama_cpp.timed_by_batch(record))
                if args.out:
                    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
