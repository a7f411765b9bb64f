"""The int8 CPU kernel: the same product as an independent float64 computation on every instruction set this CPU
has (int8, fp32, bf16 and 4-bit weights; int8 activations), whatever the thread count; used by Int8Linear, W8A8Linear
and (compiled, where the rule says) bf16 models' steps; and a build that cannot happen is said, not hidden."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from overfill_lib import int8_kernel
from overfill_lib.quantize import KERNEL_ROWS, Int8Linear

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the int8 kernel cannot be built (Int8Linear uses F.linear)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel():
    assert int8_kernel.load(), "the int8 kernel did not build although a C++ compiler is here"
    return torch.ops.overfill.int8_linear


def test_every_instruction_set_computes_the_product_of_an_independent_reference(kernel):
    best = torch.ops.overfill.int8_kernel_isa()
    assert int8_kernel.isa() == int8_kernel.ISA_NAMES[best]
    g = torch.Generator().manual_seed(0)
    # K not a multiple of any vector width, N not a multiple of the 4-channel block, rows across the 4-row blocks.
    for rows, n, k, with_bias in [(1, 43, 37, True), (3, 9, 16, False), (5, 130, 200, True), (16, 7, 576, True)]:
        x = torch.randn(rows, k, generator=g)
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale, bias = torch.rand(n, generator=g) / 100, torch.randn(n, generator=g)
        ref = (x.double() @ w.double().T) * scale.double() + (bias.double() if with_bias else 0)
        for isa in range(best + 1):
            y = kernel(x, w, scale, bias if with_bias else None, isa)
            assert y.shape == (rows, n) and y.dtype == torch.float32
            # fp32 sums of k products of size |x| * 127 * scale: a few ulps of the largest partial sum.
            tol = 1e-6 * k * float(x.abs().amax() * 127 * scale.amax())
            assert torch.allclose(y.double(), ref, rtol=0, atol=tol), (isa, rows, n, k)
            # The same loop on fp32 weights (f32_linear).
            wf = w.float() * scale[:, None]
            yf = torch.ops.overfill.f32_linear(x, wf, bias if with_bias else None, isa)
            assert torch.allclose(yf.double(), ref, rtol=0, atol=tol), ("f32", isa, rows, n, k)
            # And on bf16 weights (bf16_linear), against their exact float64 values.
            wb = wf.bfloat16()
            yb = torch.ops.overfill.bf16_linear(x, wb, bias if with_bias else None, isa)
            ref_b = x.double() @ wb.double().T + (bias.double() if with_bias else 0)
            assert torch.allclose(yb.double(), ref_b, rtol=0, atol=tol), ("bf16", isa, rows, n, k)
    with pytest.raises(RuntimeError, match="not available on this CPU"):
        kernel(x, w, scale, None, best + 1)


def test_the_4bit_product_equals_an_independent_reference_on_every_instruction_set(kernel):
    best = torch.ops.overfill.int8_kernel_isa()
    g = torch.Generator().manual_seed(2)
    for rows, n, k in [(1, 43, 64), (3, 9, 96), (5, 130, 576)]:
        x = torch.randn(rows, k, generator=g)
        values = torch.randint(-8, 8, (n, k), generator=g)
        group_scale, bias = torch.rand(n, k // 32, generator=g), torch.randn(n, generator=g)
        weight = (values.double().view(n, k // 32, 32) * group_scale.double()[..., None]).view(n, k)
        ref = x.double() @ weight.T + bias.double()
        for isa in range(best + 1):
            y = torch.ops.overfill.int4_linear(x, int8_kernel.pack_int4(values), group_scale, bias, isa)
            assert torch.allclose(y.double(), ref, rtol=0, atol=1e-5 * k), (isa, rows, n, k)
    with pytest.raises(ValueError, match="multiple of 32"):
        int8_kernel.pack_int4(torch.zeros(2, 40, dtype=torch.long))


def test_the_result_does_not_depend_on_the_thread_count_and_keeps_leading_dimensions(kernel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 512, generator=g)
    w = torch.randint(-127, 128, (1024, 512), generator=g, dtype=torch.int8)
    scale = torch.rand(1024, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x, w, scale)
        torch.set_num_threads(max(2, threads))
        many = kernel(x, w, scale)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (2, 1, 1024) and torch.equal(one, many)


def test_bad_inputs_are_refused_by_name(kernel):
    w = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="fp32 CPU input"):
        kernel(torch.zeros(1, 8, dtype=torch.bfloat16), w, torch.ones(4))
    with pytest.raises(RuntimeError, match="8"):
        kernel(torch.zeros(1, 9), w, torch.ones(4))
    with pytest.raises(RuntimeError, match="int8"):
        kernel(torch.zeros(1, 8), w.float(), torch.ones(4))


def test_int8_linear_uses_the_kernel_up_to_its_row_limit_and_agrees_with_the_gemm_beyond(kernel):
    if int8_kernel.isa() == "baseline":
        pytest.skip("on a CPU without AVX2 the layers use F.linear (the kernel's portable path is slower)")
    torch.manual_seed(0)
    q = Int8Linear.from_linear(nn.Linear(96, 24))
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    small, big = torch.randn(KERNEL_ROWS, 96), torch.randn(KERNEL_ROWS + 1, 96)
    with Count():
        y = q(small)
    assert torch.ops.overfill.int8_linear.default in calls or torch.ops.overfill.int8_linear in calls
    calls.clear()
    with Count():
        q(big)
    assert not any("overfill" in str(f) for f in calls)
    # The GEMM on converted weights and the kernel compute the same product.
    gemm = torch.nn.functional.linear(small, q.qweight.float()) * q.scale + q.bias
    assert torch.allclose(y, gemm, atol=1e-5)


@pytest.mark.parametrize("in_compiled_step", [True, False])
def test_a_compiled_step_calls_the_kernel_where_the_rule_says(kernel, monkeypatch, in_compiled_step):
    """Under torch.compile (the fast decode step) the layer is one call of the kernel (AVX2, or ``always``), traced
    without a graph break, or inductor's reduction of F.linear (AVX-512)."""
    if int8_kernel.isa() == "baseline":
        pytest.skip("on a CPU without AVX2 the layers use F.linear")
    monkeypatch.setitem(int8_kernel._state, "in_compiled_step", in_compiled_step)
    torch._dynamo.reset()
    q = Int8Linear.from_linear(nn.Linear(96, 24))
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    x = torch.randn(1, 96)
    assert torch.allclose(torch.compile(q, backend=backend, fullgraph=True)(x), q(x), atol=1e-5)
    assert ("overfill.int8_linear" in traced) == in_compiled_step
    assert ("<built-in function linear>" in traced) == (not in_compiled_step)


@pytest.mark.parametrize("in_compiled_step", [True, False])
def test_a_compiled_bf16_product_goes_to_the_kernel_where_the_rule_says(kernel, monkeypatch, in_compiled_step):
    """In the compiled CPU step (fast_decode.MatVecAsReduction) a one-row product on bf16 weights is one call of the
    kernel's bf16_linear where the rule puts the kernel in compiled steps (AVX2), else inductor's reduction; the same
    values up to the order of the fp32 sums and bf16's rounding of the output."""
    from overfill_lib.fast_decode import MatVecAsReduction

    if int8_kernel.isa() == "baseline":
        pytest.skip("on a CPU without AVX2 the compiled step keeps inductor's reduction")
    monkeypatch.setitem(int8_kernel._state, "in_compiled_step", in_compiled_step)
    torch._dynamo.reset()
    torch.manual_seed(0)
    linear = nn.Linear(96, 24).to(torch.bfloat16)
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    def step(x):
        with MatVecAsReduction():
            return linear(x)

    x = torch.randn(1, 96).to(torch.bfloat16)
    y = torch.compile(step, backend=backend, fullgraph=True)(x)
    assert y.dtype == torch.bfloat16
    exact = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    torch.testing.assert_close(y.float(), exact, atol=0.05, rtol=0.02)
    assert ("overfill.bf16_linear" in traced) == in_compiled_step


def test_a_bf16_model_decodes_through_the_kernel_where_the_rule_says(kernel, monkeypatch):
    """End to end on the fast path: with the kernel in compiled steps, each compiled step of a bf16 model multiplies
    every linear layer (7 per layer and the head) through bf16_linear once; the prefill's many rows stay GEMMs."""
    from overfill_lib.fast_decode import PATH_COMPILED, FastGenerator
    from tests.tiny_models import random_batch, tiny_model

    if int8_kernel.isa() == "baseline":
        pytest.skip("on a CPU without AVX2 the compiled step keeps inductor's reduction")
    monkeypatch.setitem(int8_kernel._state, "in_compiled_step", True)
    model = tiny_model("llama", seed=0).to(torch.bfloat16).requires_grad_(False)
    ids = random_batch(model, 1, 9, seed=3)
    generator = FastGenerator(model, None, compile=True)
    # The first call compiles (and compiling runs the step too); the second, the same shapes, only decodes.
    generator.generate(ids, torch.ones_like(ids), method="full", max_new_tokens=8, eos_token_id=[])
    with torch.profiler.profile() as prof:
        out = generator.generate(ids, torch.ones_like(ids), method="full", max_new_tokens=8, eos_token_id=[])
    assert out.path == PATH_COMPILED and out.new_tokens.shape == (1, 8)
    calls = sum(e.count for e in prof.key_averages() if e.key == "overfill::bf16_linear")
    assert calls == 7 * (7 * model.config.num_hidden_layers + 1)  # 7 compiled steps after the prefill's token


def test_aten_cpu_capability_caps_the_kernels_instruction_set_as_it_caps_torchs(kernel):
    """ATEN_CPU_CAPABILITY=avx2 runs the kernel's AVX2 path (and so, by the rule, in compiled steps), =default its
    baseline one (never in compiled steps): one variable runs a process as on a smaller CPU."""
    best = torch.ops.overfill.int8_kernel_isa()
    code = ("from overfill_lib import int8_kernel; int8_kernel.load(); "
            "print(int8_kernel.isa(), int8_kernel.use_kernel(compiling=True))")
    for capability, expected in (("default", 0), ("avx2", min(best, 1))):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                              env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
        assert done.stdout.split() == [int8_kernel.ISA_NAMES[expected], str(expected == 1)], (capability, done.stdout)


def test_the_setting_is_checked():
    done = subprocess.run([sys.executable, "-c", "from overfill_lib import int8_kernel; int8_kernel.load()"],
                          cwd=ROOT, env={**os.environ, "OVERFILL_INT8_KERNEL": "yes"}, capture_output=True, text=True,
                          check=False)
    assert done.returncode != 0 and "OVERFILL_INT8_KERNEL='yes'" in done.stderr and "always" in done.stderr


def test_a_kernel_that_cannot_be_built_is_said_and_int8_layers_still_run(tmp_path):
    """A broken compiler: build() raises with the compiler's words; load() logs why and Int8Linear falls back."""
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from overfill_lib import int8_kernel\n"
        "from overfill_lib.quantize import Int8Linear\n"
        "q = Int8Linear.from_linear(torch.nn.Linear(8, 4))\n"
        "assert not int8_kernel.loaded()\n"
        "print(q(torch.randn(1, 8)).shape)\n"
    )
    env = {**os.environ, "CXX": "false", "OVERFILL_KERNEL_CACHE": str(tmp_path)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 4])" in done.stdout
    assert "without the int8 CPU kernel" in done.stderr and "failed" in done.stderr
    assert not list(tmp_path.glob("*.so"))  # nothing half-written is left to be loaded later


def _w8a8_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias) -> torch.Tensor:
    """Q8_0's product written out: each row of x, block by block of 32 (a shorter last one), rounded to int8 steps of
    its absmax / 127 (fp32, as the kernel computes it), integer dot products, then the steps and scales in float64."""
    rows, k = x.shape
    out = torch.zeros(rows, w.shape[0], dtype=torch.float64)
    for r in range(rows):
        for start in range(0, k, 32):
            block = x[r, start:start + 32]
            step = block.abs().max() / 127  # fp32
            q = torch.zeros_like(block) if step == 0 else torch.round(block / step)
            products = (q.to(torch.int64)[None, :] * w[:, start:start + 32].to(torch.int64)).sum(1)
            out[r] += products.double() * float(step)
    out = out * scale.double()
    return out if bias is None else out + bias.double()


def test_the_w8a8_product_equals_an_independent_q8_0_computation_on_every_instruction_set(kernel):
    from overfill_lib.quantize import W8A8Linear

    best = torch.ops.overfill.int8_kernel_isa()
    g = torch.Generator().manual_seed(3)
    # K below, at and past whole blocks (and an all-zero block), N across the 4-channel block, rows up to 16.
    for rows, n, k, with_bias in [(1, 43, 37, True), (3, 9, 32, False), (5, 130, 200, True), (16, 7, 576, True)]:
        x = torch.randn(rows, k, generator=g)
        x[0, :min(k, 32)] = 0
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale, bias = torch.rand(n, generator=g) / 100, torch.randn(n, generator=g)
        b = bias if with_bias else None
        ref = _w8a8_reference(x, w, scale, b)
        tol = 1e-6 * k * float(x.abs().amax() * 127 * scale.amax())
        for isa in range(best + 1):
            y = torch.ops.overfill.w8a8_linear(x, w, scale, b, isa)
            assert y.shape == (rows, n) and torch.allclose(y.double(), ref, rtol=0, atol=tol), (isa, rows, n, k)
        layer = W8A8Linear(w, scale, b)
        assert torch.allclose(layer.converted(x).double(), ref, rtol=0, atol=tol)  # the torch path, same rounding
        assert torch.allclose(layer(x).double(), ref, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="-127, 127"):
        W8A8Linear(torch.full((2, 32), -128, dtype=torch.int8), torch.ones(2))


def test_every_instruction_set_rounds_the_activations_as_torch_does(kernel):
    """With one weight per channel the product is each rounded activation times its step, exactly, so any
    difference in the rounding (the vectorised AVX2 rounding against the scalar loop and torch's
    round_activations) shows bit for bit: ties (x / step = k + 0.5, round half to even), an all-zero block, a
    partial last block."""
    from overfill_lib.quantize import W8A8Linear

    k = 2 * 32 + 5
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, k, generator=g) * 3
    x[0, :32] = torch.arange(32) - 15.5  # absmax 16.5 -> step 16.5 / 127: many values land near ties
    x[1, :32] = torch.cat([torch.tensor([127.0]), torch.arange(31) + 0.5])  # step 1: exact ties k + 0.5
    x[2, 32:64] = 0
    w = torch.eye(k, dtype=torch.int8)
    scale = torch.ones(k)
    layer = W8A8Linear(w, scale)
    torch_path = layer.converted(x)
    for isa in range(torch.ops.overfill.int8_kernel_isa() + 1):
        assert torch.equal(torch.ops.overfill.w8a8_linear(x, w, scale, None, isa), torch_path), isa
    assert torch.equal(torch_path[1, 1:32], torch.round(torch.arange(31) + 0.5))  # half to even: 0, 2, 2, 4, ...


@pytest.mark.parametrize("batch", [1, 3])
def test_a_compiled_w8a8_step_calls_the_kernel_and_matches_eager(kernel, batch):
    from overfill_lib.quantize import W8A8Linear

    if int8_kernel.isa() == "baseline":
        pytest.skip("on a CPU without AVX2 the layers use the torch rounding and F.linear")
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = W8A8Linear.from_linear(nn.Linear(100, 24))
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    x = torch.randn(batch, 100)
    assert torch.allclose(torch.compile(q, backend=backend, fullgraph=True)(x), q(x), atol=1e-5)
    assert "overfill.w8a8_linear" in traced
