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

A preset's ``decoder: {weights: int8}`` runs its decoder with int8 weights (:func:`decoder_weights`,
:func:`apply_decoder_weights`); the full model, which prefills, stays in the runtime dtype. It is a run-time setting:
the pruned decoder on disk stays float, and changing it re-prunes nothing. Its quality is scored like every decoder's
by ``benchmarks/quantized_decoder.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from overfill_lib import int8_kernel

QUANTIZATION = "int8-weight-only"
KERNEL_ROWS = 16  # up to this many rows (a decode step's batch) the int8 kernel; beyond, a GEMM on converted weights
CONFIG_KEY = "overfill_quantization"  # in config.json: how the saved weights were quantized


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == self.scale.dtype == torch.float32
                and x.numel() <= KERNEL_ROWS * self.in_features
                and int8_kernel.use_kernel(torch.compiler.is_compiling())):
            return torch.ops.overfill.int8_linear(x, self.qweight, self.scale, self.bias)
        return self.converted(x)

    def converted(self, x: torch.Tensor) -> torch.Tensor:
        """The product through ``F.linear`` on the weight converted to ``x``'s dtype (inside the compiled CPU step,
        inductor's fused int8 reduction): the path without the kernel."""
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (the LM head included) by an :class:`Int8Linear`, in place.

    A head tied to the input embedding is untied first: the embedding keeps its floating-point table (a decode step
    gathers one row of it) and only the head is quantized. ``model.quantization`` records what was done, and
    ``model.config`` too, so that a saved copy loads back quantized (:func:`load_int8`).
    """
    if getattr(model, "quantization", None) == QUANTIZATION:
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    model.quantization = QUANTIZATION
    setattr(model.config, CONFIG_KEY, QUANTIZATION)
    return model


DECODER_WEIGHTS = {"float": None, "int8": QUANTIZATION}  # a preset's decoder.weights -> what is applied


def decoder_weights(preset) -> str:
    """The preset's ``decoder.weights`` ("float" when it says nothing; checked when the preset loaded)."""
    return preset.decoder.weights


def apply_decoder_weights(decoder: nn.Module, weights: str) -> nn.Module:
    """``decoder`` as ``weights`` says (a preset's ``decoder.weights``): unchanged for "float", :func:`quantize_int8`
    (in place) for "int8"."""
    if weights not in DECODER_WEIGHTS:
        raise ValueError(f"decoder.weights {weights!r} is not one of {list(DECODER_WEIGHTS)}")
    return quantize_int8(decoder) if weights == "int8" else decoder


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
    if found != QUANTIZATION:
        raise ValueError(f"{directory / 'config.json'} says {CONFIG_KEY}={found!r}; this version reads "
                         f"{QUANTIZATION!r} only: load it with the version that saved it, or quantize and save the "
                         "float model again")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    dtype = torch_dtype(dtype, "dtype")
    kwargs = {} if dtype in (None, "auto") else {"dtype": dtype}  # default: the saved dtype, as from_pretrained does
    model = quantize_int8(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs))
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
