"""Why the int8 decode step on a CPU is slower than llama.cpp's Q8_0: its matrix-vector products, one at a time.

At SmolLM2-135M's shapes (the LM head and a layer's projections), batch 1, 2 threads, interleaved repetitions, medians:

- ``reduction``: the compiled step's form (``fast_decode.MatVecAsReduction``), ``(x * W).sum(-1) * scale`` with ``W``
  int8 converted as it is read, or fp32;
- ``split<G>``: the same sum split into ``K / G`` rows of ``G``, so that inductor keeps ``G / 16`` vector
  accumulators instead of one;
- ``int_mm``: torch's int8 x int8 -> int32 kernel (``torch._int_mm``, oneDNN), eager, on an int8 activation row
  (what Q8_0 does: the activation is quantized too);
- ``kernel_<isa>``: the project's int8 kernel (:mod:`overfill_lib.int8_kernel`), eager, in every instruction set this
  CPU runs (``kernel_avx2`` on an AVX-512 machine is what an AVX2-only one would run); ``int4_kernel_<isa>``: its
  4-bit product (32 weights per fp32 scale), timed to see whether 4-bit weights would pay; ``w8a8_kernel_<isa>``:
  its int8 x int8 product (the activation row rounded per block of 32 inside the call, as Q8_0 does);
  ``f32_kernel``: its fp32 path (``f32_linear``), the same loop on fp32 weights.

``--step`` also times the compiled full-model step with int8 weights, interleaved: through the kernel (what
``Int8Linear`` does), through inductor's fused reduction (``Int8Linear.converted``, the path before the kernel), a
prototype that routes every linear layer but the LM head through ``torch._int_mm`` with the activation row quantized
per token, and the w8a8 model (``quantize.W8A8Linear``: int8 activations per block of 32, through the kernel's
``w8a8_linear``), and the fp32 step as compiled (``fast_decode.MatVecAsReduction``: inductor's GEMM template with
AVX-512, its reductions otherwise) or through the kernel's ``f32_linear`` in every linear layer; ``--step
--emulate-avx2`` times an AVX2 machine emulated (inductor's 256-bit code against the kernel's AVX2 path).

    python -m benchmarks.int8_matvec [--step]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from overfill_lib import int8_kernel
from overfill_lib.fast_decode import MatVecAsReduction
from overfill_lib.quantize import KERNEL_ROWS

SHAPES = [(49152, 576), (1536, 576), (576, 1536), (576, 576)]  # LM head, gate/up, down, q/o


def reduction(x, w, s):
    with MatVecAsReduction():  # the compiled step's own rule for a one-row linear
        return F.linear(x, w.to(x.dtype)) * s


def split(g: int):
    def f(x, w, s):
        n, k = w.shape
        return (x.reshape(k // g, g) * w.view(n, k // g, g).to(x.dtype)).sum(-2, dtype=torch.float32).sum(-1) * s
    return f


def int_mm(xq, w, s):
    return torch._int_mm(xq, w.t()).float() * s


def median_ms(fns: dict, args: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(*args[k])
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def kernels(repeats: int) -> None:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 256  # one graph per shape and variant
    torch._dynamo.config.cache_size_limit = 256
    for (n, k) in SHAPES:
        for dtype in ("int8", "fp32"):
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8) if dtype == "int8" else torch.randn(n, k)
            s, x = torch.rand(n) / 100, torch.randn(1, k)
            ref = (x.double() @ w.double().T).float() * s
            fns = {"reduction": reduction, "split32": split(32), "split64": split(64), "split192": split(192)}
            fns = {name: torch.compile(f, fullgraph=True, dynamic=False) for name, f in fns.items()}
            args = {name: (x, w, s) for name in fns}
            if dtype == "fp32" and int8_kernel.load():  # the kernel's fp32 path (f32_linear), eager
                fns["f32_kernel"] = lambda x, w, s: torch.ops.overfill.f32_linear(x, w) * s
                args["f32_kernel"] = (x, w, s)
            if dtype == "int8":
                fns["int_mm"] = int_mm
                args["int_mm"] = (torch.randint(-127, 128, (1, k), dtype=torch.int8), w, s)
                if int8_kernel.load():
                    packed, group_scale = int8_kernel.pack_int4(torch.randint(-7, 8, (n, k))), torch.rand(n, k // 32)
                    for isa in range(torch.ops.overfill.int8_kernel_isa() + 1):
                        name = f"kernel_{int8_kernel.ISA_NAMES[isa]}"
                        fns[name] = functools.partial(torch.ops.overfill.int8_linear, isa=isa)
                        args[name] = (x, w, s)
                        # 4-bit weights (half the bytes, group scales): timed, not checked against ref
                        fns[f"int4_{name}"] = functools.partial(torch.ops.overfill.int4_linear, isa=isa)
                        args[f"int4_{name}"] = (x, packed, group_scale)
                        if isa <= 1:  # one AVX2 path serves AVX-512 machines too
                            fns[f"w8a8_{name}"] = functools.partial(torch.ops.overfill.w8a8_linear, isa=isa)
                            args[f"w8a8_{name}"] = (x, w, s)
            with torch.no_grad():
                for name, f in fns.items():
                    y = f(*args[name])
                    checked = name != "int_mm" and not name.startswith(("int4", "w8a8"))  # other products
                    if checked and (y - ref).abs().max() > 1e-4 * ref.abs().max():
                        raise AssertionError(f"{name} {dtype} {n}x{k} does not compute x @ W.T")
                found = median_ms(fns, args, repeats)
            nbytes = w.numel() * w.element_size()
            size = {name: (nbytes // 2 + n * (k // 32) * 4 if name.startswith("int4") else nbytes) for name in found}
            print(f"{dtype} {n}x{k} ({nbytes / 1e6:.1f} MB): " + "  ".join(
                f"{name} {ms:.3f} ms {size[name] / ms / 1e6:.1f} GB/s" for name, ms in found.items()), flush=True)


def _int_mm_forward(self, x):
    """An Int8Linear with its activation row quantized to int8 per token (absmax), through torch._int_mm."""
    rows = x.reshape(-1, x.shape[-1])
    step = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    xq = torch.round(rows / step).clamp(-127, 127).to(torch.int8)
    y = (torch._int_mm(xq, self.qweight.t()).to(x.dtype) * step * self.scale).reshape(*x.shape[:-1], -1)
    return y if self.bias is None else y + self.bias


# label -> how the int8 layers multiply: what --step times, interleaved
STEP_VARIANTS = {
    "kernel": "kernel",  # forced into the step, whatever int8_kernel.use_kernel picks on this CPU
    "inductor's reduction": "reduction",
    "int8 x int8 (torch._int_mm)": "int_mm",
    "w8a8 (int8 activations per block of 32, kernel)": "w8a8",
    "w8a8, torch's rounding and inductor's reduction": "w8a8_reduction",
    "fp32 weights, as the compiled step multiplies them": "f32_compiled",
    "fp32 weights, kernel (f32_linear)": "f32_kernel",
}
# --emulate-avx2: inductor writes 256-bit code (cpp.simdlen=256) for the whole process, as on a CPU without AVX-512.
# Its own process: with another width in the same one, dynamo would reuse the graph it already has.
AVX2_VARIANTS = {"inductor's reduction (AVX2 emulated)": "reduction",
                 "kernel, AVX2 path (AVX2 emulated)": "kernel_avx2",
                 "w8a8 (AVX2 emulated)": "w8a8"}


def _route(full, how: str) -> None:
    from overfill_lib import quantize

    head = full.get_output_embeddings()
    if how == "f32_kernel":
        for module in full.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = functools.partial(_f32_forward, module)
        return
    for module in full.modules():
        if not isinstance(module, quantize.Int8Linear):
            continue
        if how in ("reduction", "w8a8_reduction"):
            module.forward = module.converted
        elif how == "int_mm" and module is not head:
            module.forward = _int_mm_forward.__get__(module)
        elif how.startswith("kernel"):  # in every layer, compiled or not: best instruction set, or AVX2's
            module.forward = functools.partial(_kernel_forward, module, 1 if how == "kernel_avx2" else -1)


def _kernel_forward(module, isa: int, x):
    """Int8Linear.forward with the kernel forced (and its instruction set chosen); more rows still go to the GEMM."""
    if x.numel() > KERNEL_ROWS * module.in_features:
        return module.converted(x)
    return torch.ops.overfill.int8_linear(x, module.qweight, module.scale, module.bias, isa)


def _f32_forward(module, x):
    """nn.Linear.forward through the kernel's f32_linear up to KERNEL_ROWS rows (a GEMM otherwise)."""
    if x.numel() > KERNEL_ROWS * module.in_features:
        return F.linear(x, module.weight, module.bias)
    return torch.ops.overfill.f32_linear(x, module.weight, module.bias)


def step(preset_name: str, new_tokens: int, rounds: int = 5, emulate_avx2: bool = False, variants=None) -> None:
    """The compiled full-model step with int8 weights, each variant on its own copy of the model, ``rounds``
    interleaved rounds, medians: STEP_VARIANTS, or with ``emulate_avx2`` AVX2_VARIANTS."""
    import torch._inductor.config as inductor_config

    from overfill_lib import pipeline, quantize
    from overfill_lib.artifacts import load_model
    from overfill_lib.fast_decode import FastGenerator, use_compile_cache
    from overfill_lib.presets import load_preset

    if emulate_avx2:
        inductor_config.cpp.simdlen = 256
    use_compile_cache()
    preset = load_preset(preset_name)
    messages = [{"role": "user", "content": "Explain why the sky is blue, briefly."}]
    runs = {}
    for label, how in (AVX2_VARIANTS if emulate_avx2 else STEP_VARIANTS).items():
        if variants and how not in variants:
            continue
        if how in ("kernel", "kernel_avx2", "w8a8", "f32_kernel") and not int8_kernel.load():
            print(f"{label}: skipped (the int8 kernel is not built)")
            continue
        full, tokenizer = load_model(pipeline.full_model(preset)[0], role="full model")
        scheme = quantize.W8A8 if how.startswith("w8a8") else quantize.QUANTIZATION
        full = (full if how.startswith("f32") else quantize.quantize_int8(full, scheme)).requires_grad_(False)
        _route(full, how)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        generator = FastGenerator(full, None, compile=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = generator.generate(ids["input_ids"], ids["attention_mask"], method="full", max_new_tokens=new_tokens)
        print(f"{label}: compiled and warmed in {time.perf_counter() - t0:.0f} s; "
              f"{tokenizer.decode(out.new_tokens[0])[:60]!r}", flush=True)
        runs[label] = (generator, ids, [])
    with torch.inference_mode():
        for _ in range(rounds):
            for generator, ids, per_token in runs.values():
                out = generator.generate(ids["input_ids"], ids["attention_mask"], method="full",
                                         max_new_tokens=new_tokens)
                per_token.append(out.timings.per_token_s * 1e3)
    for label, (_, _, per_token) in runs.items():
        print(f"{label}: {statistics.median(per_token):.2f} ms per token (median of {rounds} interleaved rounds)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--step", action="store_true", help="also the compiled full-model step, every variant")
    parser.add_argument("--emulate-avx2", action="store_true",
                        help="with --step: inductor's 256-bit code, the reduction against the kernel's AVX2 path "
                             "(run it in its own process)")
    parser.add_argument("--variant", action="append", choices=sorted(set(STEP_VARIANTS.values())),
                        help="with --step: repeatable; only these variants (default: all)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the matrix-by-matrix timings")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.no_kernels:
        kernels(args.repeats)
    if args.step:
        step(args.preset, args.new_tokens, emulate_avx2=args.emulate_avx2, variants=args.variant)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
