"""The CPU int8 matrix-vector kernel behind :class:`overfill_lib.quantize.Int8Linear` (``int8_kernel.cpp``).

Built on first use with the C++ compiler that ``torch.compile`` already needs on a CPU (``CXX``, else ``c++``),
against the installed torch, into a cache folder (``OVERFILL_KERNEL_CACHE``, else ``~/.cache/overfill/kernels``),
one file per source, torch version and Python ABI, written whole (a temporary name, then renamed). Loading registers
``torch.ops.overfill.int8_linear`` (with a shape-only implementation, so that dynamo traces it and inductor calls
it from a compiled decode step). The instruction set is picked when it runs: AVX-512, AVX2 with FMA, or the
platform's baseline vectors (SSE2, NEON), at most what ``ATEN_CPU_CAPABILITY`` allows torch's own kernels (``avx2``,
``default``): with inductor, which follows that setting too, one variable runs a process as on a smaller CPU.
``torch.ops.overfill.int4_linear`` is the same product on 4-bit weights (:func:`pack_int4`);
``benchmarks/int8_matvec.py`` times it, and no preset uses it: on this project's machine it does not pay
(docs/cpu-decode.md). ``torch.ops.overfill.w8a8_linear`` quantizes the activations too, per block of 32
as llama.cpp's Q8_0 does, and sums int8 x int8 products in int32 (AVX2's byte multiply-adds, on AVX-512 machines as
well): :class:`overfill_lib.quantize.W8A8Linear`, a preset's ``decoder: {weights: w8a8}``, always through the kernel
where it is loaded on x86 (the same rounding in torch ops took 137 ms a step on AVX2, the kernel 19).
``torch.ops.overfill.f32_linear`` is the same loop on fp32 weights, for the benchmark only: inside the compiled
step inductor's reduction was faster (27 ms against 32 on AVX2). ``torch.ops.overfill.bf16_linear`` is the loop on
bf16 weights (fp32 input and sums), which a compiled step on a bf16 model calls where this rule puts the kernel in
compiled steps (``fast_decode.MatVecAsReduction``). Every loop prefetches the next channels' weights, which doubled
the LM head's read rate on AVX2.

Where it runs (:func:`use_kernel`, one rule, measured with ``benchmarks/int8_matvec.py --step``): eagerly on any x86
CPU, where the alternative converts the whole weight at every call; inside a compiled decode step only on AVX2, where
inductor's fused int8 reduction collapses (SmolLM2's int8 step: 124 ms per token against 17 through the kernel on a
2-core AMD EPYC with AVX2), not on AVX-512, where that reduction, fused with its neighbours, was as fast or
faster (27 ms against 33 in one run, 24 against 23 in another). ``OVERFILL_INT8_KERNEL=always`` uses it in compiled
steps too, ``off`` never.

Without a compiler (or with ``OVERFILL_INT8_KERNEL=off``) nothing is built: :func:`load` returns False once, with
the reason logged, and ``Int8Linear`` computes the same product through ``F.linear`` (fused into a reduction by
inductor in the compiled step), as it did before this kernel existed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_kernel.cpp")
SOURCES = (SOURCE, SOURCE.with_name("int8_kernel_body.h"))  # what the built library depends on
ISA_NAMES = {0: "baseline", 1: "avx2", 2: "avx512"}  # baseline: SSE2 on x86-64, NEON on aarch64
_state: dict = {}  # set by load: "loaded", "why", "isa" (an ISA_NAMES key), "in_compiled_step"


def cache_dir() -> Path:
    explicit = os.environ.get("OVERFILL_KERNEL_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "overfill" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _command(compiler: str, output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", "-fopenmp",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(output),
            *(f"-L{p}" for p in library_paths()), *(f"-Wl,-rpath,{p}" for p in library_paths()),
            "-lc10", "-ltorch_cpu", "-ltorch"]


def library_path() -> Path:
    """Where the built kernel for this source, torch and Python lives (built or not)."""
    made_of = b"".join(path.read_bytes() for path in SOURCES)
    key = hashlib.sha256(made_of + f"|{torch.__version__}|{sys.version_info[:2]}|"
                         f"{sysconfig.get_platform()}".encode()).hexdigest()[:16]
    return cache_dir() / f"overfill_int8_{key}.so"


def build() -> Path:
    """Compile the kernel unless this source's library is already in the cache; its path. Raises with the
    compiler's output when compiling fails."""
    target = library_path()
    if target.is_file():
        return target
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++): the int8 kernel cannot be built")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        log.info("building the int8 CPU kernel with %s (once per machine, about 20 s)", compiler)
        done = subprocess.run(_command(compiler, partial), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        os.replace(partial, target)
    return target


def load() -> bool:
    """Build (if needed) and load the kernel once per process; whether ``torch.ops.overfill.int8_linear`` exists."""
    if "loaded" in _state:
        return _state["loaded"]
    setting = os.environ.get("OVERFILL_INT8_KERNEL", "auto").lower()
    if setting not in ("auto", "always", "off"):
        raise ValueError(f"OVERFILL_INT8_KERNEL={setting!r}: use auto (the default), always or off")
    if setting == "off":
        _state.update(loaded=False, why="OVERFILL_INT8_KERNEL=off")
    else:
        try:
            torch.ops.load_library(str(build()))
            torch.library.register_fake("overfill::int8_linear")(_shape_only)
            torch.library.register_fake("overfill::int4_linear")(_shape_only)
            torch.library.register_fake("overfill::w8a8_linear")(_shape_only)
            torch.library.register_fake("overfill::f32_linear")(_shape_only)
            torch.library.register_fake("overfill::bf16_linear")(_shape_only)
            best = int(torch.ops.overfill.int8_kernel_isa())
            _state.update(loaded=True, why="", isa=best,
                          in_compiled_step=setting == "always" or ISA_NAMES[best] == "avx2")
        except (RuntimeError, OSError, ImportError) as error:  # no compiler, a failed build, no setuptools
            _state.update(loaded=False, why=str(error))
    if not _state["loaded"]:
        log.warning("int8 layers run without the int8 CPU kernel (%s); F.linear computes the same product (and "
                    "inductor's reduction a compiled bf16 step's)",
                    _state["why"].splitlines()[0] if _state["why"] else "unavailable")
    return _state["loaded"]


def loaded() -> bool:
    """Whether :func:`load` has loaded the kernel in this process (without trying to)."""
    return _state.get("loaded", False)


def isa() -> str | None:
    """The instruction set the kernel runs with on this CPU ("avx512", "avx2", "baseline"), None when not loaded."""
    return ISA_NAMES[_state["isa"]] if loaded() else None


def use_kernel(compiling: bool, activations: str = "float") -> bool:
    """Whether an int8 layer (compiled, also a bf16 one-row product) multiplies through the kernel: eagerly on x86
    (its baseline path, for other CPUs, is slower than a GEMM on converted weights), in a compiled step only on AVX2
    (or when told ``always``). With ``activations="int8"`` (:class:`overfill_lib.quantize.W8A8Linear`) on x86,
    compiled or not."""
    if not loaded() or ISA_NAMES[_state["isa"]] == "baseline":
        return False
    return _state["in_compiled_step"] if compiling and activations == "float" else True


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """4-bit values in [-8, 7], [out, in] with ``in`` a multiple of 32, as ``overfill::int4_linear`` reads them: uint8
    [out, in / 2], byte j of each group of 32 holding value j (low nibble) and j + 16 (high nibble), each plus 8."""
    n, k = values.shape
    if k % 32 or values.min() < -8 or values.max() > 7:
        raise ValueError(f"pack_int4 wants values in [-8, 7] and a multiple of 32 inputs, got {tuple(values.shape)}")
    groups = (values + 8).to(torch.uint8).view(n, k // 32, 2, 16)
    return (groups[:, :, 0, :] | (groups[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()


def _shape_only(x, weight, *rest):  # every op: (x, weight, ...) -> x's leading shape by weight's rows
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
