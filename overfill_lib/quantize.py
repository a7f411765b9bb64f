"""Weight-only int8 for CPU decoding: symmetric per-output-channel int8 weights, activations in the model's dtype.

A batch-1 decode step on a CPU is bound by the bytes it reads: one byte per weight instead of four. On a CPU with
fp32 activations and up to :data:`KERNEL_ROWS` rows, :class:`Int8Linear` runs the project's own int8 kernel
(:mod:`overfill_lib.int8_kernel`: int8 weights widened in registers, AVX-512 or AVX2) where
:func:`overfill_lib.int8_kernel.use_kernel` says it pays: eagerly, and inside the compiled decode step on AVX2, where
inductor's fused int8 reduction collapses. torch's own int8 matrix-vector kernel (``_weight_int8pack_mm``) ran
SmolLM2's LM head at 1.9 GB/s with fp32 activations on this project's machine. Elsewhere (more rows, another dtype or
device, no C++ compiler) it computes the same product with ``F.linear`` on the converted weight. Inference only.

A quantized model saves with ``save_pretrained`` (its config.json says ``overfill_quantization``) and loads back
through ``artifacts.load_causal_lm`` (:func:`load_int8`) with the same int8 weights and the same logits.

:class:`W8A8Linear` rounds the activations too, as llama.cpp's Q8_0 does: each row of ``x`` per block of 32 values
to int8 with one fp32 step per block, the products summed in int32 (``int8_kernel``'s ``w8a8_linear``). Another
model, not a faster int8: its quality is scored separately.

The int8 layers of one decoder layer that read the same input (q, k and v; gate and up:
:data:`SHARED_INPUT_PROJECTIONS`) keep their rows in one matrix (:class:`SharedInput`,
each layer's weight a view of its rows): inside a compiled decode step they call one product on it, each taking its
slice (``fast_decode.ComputeOnce`` merges the identical calls), one call of the kernel instead of three or two.

A preset's ``decoder: {weights: int8}`` (or ``w8a8``) runs its decoder so (:func:`decoder_weights`,
:func:`apply_decoder_weights`); the full model, which prefills, stays in the runtime dtype. It is a run-time setting:
the pruned decoder on disk stays float, and changing it re-prunes nothing. Its quality is scored like every decoder's
by ``benchmarks/quantized_decoder.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from overfill_lib import int8_kernel

QUANTIZATION = "int8-weight-only"
W8A8 = "int8-w8a8-block32"  # int8 weights and int8 activations, rounded per block of 32
BLOCK = 32  # activations per rounding step in W8A8Linear (Q8_0's block)
KERNEL_ROWS = 16  # up to this many rows (a decode step's batch) the int8 kernel; beyond, a GEMM on converted weights
CONFIG_KEY = "overfill_quantization"  # in config.json: how the saved weights were quantized
# Children of one module that read the same input, in every supported family's layout (architectures.py): stacked in
# one matrix (SharedInput), so that a compiled decode step multiplies each group with one kernel call.
SHARED_INPUT_PROJECTIONS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Int8Linear(nn.Module):
    """``y = (x @ q.T) * scale + bias`` with ``q`` int8 [out, in] and one fp ``scale`` per output channel."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if qweight.dtype != torch.int8 or scale.shape != qweight.shape[:1]:
            raise ValueError(f"Int8Linear wants an int8 [out, in] weight and [out] scales; got {qweight.dtype} "
                             f"{tuple(qweight.shape)} and {tuple(scale.shape)}")
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        int8_kernel.load()  # built once per machine, loaded once per process; never inside a compiled step

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Round each output row of ``linear.weight`` to 127 levels of its largest magnitude."""
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.to(linear.weight.dtype), bias)

    activations = "float"  # what the kernel multiplies the int8 weights by (int8_kernel.use_kernel)
    kernel_name = "int8_linear"  # its op in torch.ops.overfill
    shared: tuple[SharedInput, int, int] | None = None  # (its group, first row, end row): set by SharedInput

    def takes_kernel(self, rows: int, compiling: bool) -> bool:
        """Whether ``rows`` rows of fp32 CPU input multiply through the int8 kernel (else :meth:`converted`)."""
        return (self.scale.dtype == torch.float32 and rows <= KERNEL_ROWS
                and int8_kernel.use_kernel(compiling, self.activations))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32
                and self.takes_kernel(x.numel() // max(self.in_features, 1), torch.compiler.is_compiling())):
            return self.kernel_product(x)
        return self.converted(x)

    def kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """The product through the int8 kernel (fp32 CPU input, up to :data:`KERNEL_ROWS` rows). Compiled, a layer
        of a :class:`SharedInput` multiplies its group's whole matrix and keeps its rows: its siblings make the same
        call, which the compiled step computes once."""
        kernel = getattr(torch.ops.overfill, self.kernel_name)
        if self.shared is not None and torch.compiler.is_compiling():
            group, start, end = self.shared
            return kernel(x, group.qweight, group.scale, group.bias)[..., start:end]
        return kernel(x, self.qweight, self.scale, self.bias)

    def converted(self, x: torch.Tensor) -> torch.Tensor:
        """The product through ``F.linear`` on the weight converted to ``x``'s dtype (inside the compiled CPU step,
        inductor's fused int8 reduction): the path without the kernel."""
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as :class:`W8A8Linear` sees it: each block of 32 values along the last axis rounded to an int8 multiple of
    its step, absmax / 127 (a last, shorter block on its own), the kernel's rounding operation for operation."""
    k = x.shape[-1]
    padded = F.pad(x, (0, -k % BLOCK))
    blocks = padded.reshape(*padded.shape[:-1], -1, BLOCK)  # not unflatten: under MatVecAsReduction dynamo fails on it
    step = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(step > 0, torch.round(blocks / step), torch.zeros_like(blocks))
    return (q * step).flatten(-2)[..., :k]


class W8A8Linear(Int8Linear):
    """An :class:`Int8Linear` whose input is rounded too (:func:`round_activations`), products summed in int32 by the
    kernel's ``w8a8_linear`` on x86 (eager and compiled, up to :data:`KERNEL_ROWS` rows), else the same rounding in
    torch and ``F.linear``. Weights in [-127, 127], as :meth:`from_linear` makes them (the kernel moves the
    activation's sign onto the weight)."""

    activations = "int8"
    kernel_name = "w8a8_linear"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(qweight, scale, bias)
        if qweight.numel() and int(qweight.min()) == -128:
            raise ValueError("W8A8Linear wants int8 weights in [-127, 127] (from_linear rounds them so); got -128")

    def converted(self, x: torch.Tensor) -> torch.Tensor:
        return super().converted(round_activations(x))


class SharedInput(nn.Module):
    """Int8 layers that read the same input, their rows stacked in one matrix that each layer's weight, scales and bias
    are views of (no second copy): what a compiled step multiplies once for all of them
    (:meth:`Int8Linear.kernel_product`). Its buffers stay out of the state dict; the layers' own keys are saved."""

    def __init__(self, layers: Sequence[Int8Linear]):
        super().__init__()
        self.register_buffer("qweight", torch.cat([m.qweight for m in layers]), persistent=False)
        self.register_buffer("scale", torch.cat([m.scale for m in layers]), persistent=False)
        bias = None if layers[0].bias is None else torch.cat([m.bias.detach() for m in layers])
        self.register_buffer("bias", bias, persistent=False)
        start = 0
        for layer in layers:
            end = start + layer.out_features
            layer.qweight, layer.scale = self.qweight[start:end], self.scale[start:end]
            if bias is not None:
                layer.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
            layer.shared = (self, start, end)
            start = end

    def holds(self, layers: Sequence[Int8Linear]) -> bool:
        """Whether ``layers`` are still this group's, in order, each weight a view of its rows (``.to()`` or a
        replaced buffer breaks that)."""
        row = self.qweight.stride(0) * self.qweight.element_size()
        return all(m.shared is not None and m.shared[0] is self
                   and m.qweight.data_ptr() == self.qweight.data_ptr() + m.shared[1] * row for m in layers)


def share_inputs(model: nn.Module) -> nn.Module:
    """Stack the int8 layers of each module that read one input (:data:`SHARED_INPUT_PROJECTIONS`, all of one class,
    shape of input and bias) into a :class:`SharedInput` registered beside them (``shared_qkv``, ``shared_gateup``),
    in place; a group already stacked and intact is left alone. The model computes the same values."""
    for module in list(model.modules()):
        for names in SHARED_INPUT_PROJECTIONS:
            layers = [getattr(module, name, None) for name in names]
            if not (all(isinstance(m, Int8Linear) for m in layers) and len({type(m) for m in layers}) == 1
                    and len({(m.in_features, m.scale.dtype, m.bias is None) for m in layers}) == 1):
                continue
            key = "shared_" + "".join(name.split("_")[0] for name in names)
            group = getattr(module, key, None)
            if not (isinstance(group, SharedInput) and group.holds(layers)):
                setattr(module, key, SharedInput(layers))
    return model


SCHEMES = {QUANTIZATION: Int8Linear, W8A8: W8A8Linear}  # config.json's overfill_quantization -> its layer


def quantize_int8(model: nn.Module, scheme: str = QUANTIZATION) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (the LM head included) by an :class:`Int8Linear`, in place (a
    :class:`W8A8Linear` for ``scheme=W8A8``).

    A head tied to the input embedding is untied first: the embedding keeps its floating-point table (a decode step
    gathers one row of it) and only the head is quantized. The layers that read one input are stacked
    (:func:`share_inputs`). ``model.quantization`` records what was done, and ``model.config`` too, so that a saved copy
    loads back quantized (:func:`load_int8`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantization {scheme!r} is not one of {list(SCHEMES)}")
    done = getattr(model, "quantization", None)
    if done == scheme:
        return model
    if done is not None:
        raise ValueError(f"this model is already quantized as {done!r}: quantize its float weights as {scheme!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, SCHEMES[scheme].from_linear(child))
    share_inputs(model)
    model.quantization = scheme
    setattr(model.config, CONFIG_KEY, scheme)
    return model


DECODER_WEIGHTS = {"float": None, "int8": QUANTIZATION, "w8a8": W8A8}  # a preset's decoder.weights -> scheme


def decoder_weights(preset) -> str:
    """The preset's ``decoder.weights`` ("float" when it says nothing; checked when the preset loaded)."""
    return preset.decoder.weights


def apply_decoder_weights(decoder: nn.Module, weights: str) -> nn.Module:
    """``decoder`` as ``weights`` says (a preset's ``decoder.weights``): unchanged for "float", :func:`quantize_int8`
    (in place) with that scheme for "int8" and "w8a8"."""
    if weights not in DECODER_WEIGHTS:
        raise ValueError(f"decoder.weights {weights!r} is not one of {list(DECODER_WEIGHTS)}")
    scheme = DECODER_WEIGHTS[weights]
    return decoder if scheme is None else quantize_int8(decoder, scheme)


def weights_of(model: nn.Module) -> str:
    """The ``decoder.weights`` name of how ``model`` is quantized: "float", "int8" or "w8a8"."""
    scheme = getattr(model, "quantization", None)
    if scheme is None and is_quantized(model):
        scheme = QUANTIZATION  # int8 layers put in by hand
    return next(name for name, s in DECODER_WEIGHTS.items() if s == scheme)


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, an int8 layer's weight counted like the float one it replaced (``parameters()``
    leaves its int8 buffer out). A head :func:`quantize_int8` untied from the embedding counts as its own table."""
    return (sum(p.numel() for p in model.parameters())
            + sum(m.qweight.numel() for m in model.modules() if isinstance(m, Int8Linear)))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def saved_quantization(directory: str | Path) -> str | None:
    """What the ``config.json`` of a saved model says its weights are quantized as (None: plain weights)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # the loader that follows names the broken file
    return config.get(CONFIG_KEY) if isinstance(config, dict) else None


def _state_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return sorted({directory / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors (or its index) in {directory}")
    return [single]


def load_int8(directory: str | Path, *, dtype=None, trust_remote_code: bool = False):
    """A model saved after :func:`quantize_int8`, and what loading it left unset or unused (the keys of
    ``from_pretrained(..., output_loading_info=True)``).

    transformers would build the float architecture and load none of the int8 layers (their keys differ); here the
    float architecture is built from the saved config, quantized (its random weights replaced by int8 layers of the
    same shapes), and the saved int8 weights, scales and float tensors loaded into it.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from overfill_lib.config import torch_dtype

    directory = Path(directory)
    found = saved_quantization(directory)
    if found not in SCHEMES:
        raise ValueError(f"{directory / 'config.json'} says {CONFIG_KEY}={found!r}; this version reads "
                         f"{' or '.join(map(repr, SCHEMES))}: load it with the version that saved it, or quantize and "
                         "save the float model again")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    dtype = torch_dtype(dtype, "dtype")
    kwargs = {} if dtype in (None, "auto") else {"dtype": dtype}  # default: the saved dtype, as from_pretrained does
    model = quantize_int8(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs),
                          found)
    state = {}
    for path in _state_files(directory):
        state.update(load_file(str(path)))
    result = model.load_state_dict(state, strict=False)
    model.config.name_or_path = str(directory)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    info = {"missing_keys": set(result.missing_keys), "unexpected_keys": set(result.unexpected_keys),
            "mismatched_keys": set(), "error_msgs": []}
    return model.eval(), info
