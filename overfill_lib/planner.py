"""Which training layout fits: OverFill's memory per device and step bounds under DDP, FSDP / ZeRO-3 and
activation checkpointing, counted from configs alone (beside :mod:`overfill_lib.cost`, which costs decoding).

OverFill trains the decoder (its weights, gradients and AdamW state) and runs the frozen full model forward on
the prompt under no_grad; the decoder then reads that prompt cache. What each device holds:

- the decoder's training state, ``trained + grad + optimizer`` bytes per parameter (the Trainer keeps fp32
  weights, fp32 gradients and two fp32 AdamW moments: 16 B, as ZeRO-3's bf16 copy + fp32 master + moments),
  whole under DDP, 1/N of it under FSDP / ZeRO-3 plus the layers gathered around the one computing;
- the frozen full model in its dtype, replicated (the shipped configs) or sharded (then gathered layer by layer);
- the prompt's KV cache and the full model's largest no_grad working set while it prefills;
- the decoder's activations, counted per operation as the Hugging Face Llama layer saves them for backward
  (:func:`activation_bytes`; tests/test_distributed.py checks the count against a measured run), or only each
  layer's input with activation checkpointing, plus one layer recomputed.

Step bounds (:func:`step_bounds`): FLOPs over the devices' peak, bytes over memory bandwidth, collective bytes over
the link; a step is compute-bound once it carries enough tokens that compute outlasts both others.

    python -m overfill_lib.planner --preset llama-3.1-8b --devices 1 2 4 8 --memory-gib 80
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from overfill_lib.architectures import head_dim_of
from overfill_lib.cost import parameter_breakdown

GIB = 1024**3


# --------------------------------------------------------------------------------------------------
# Registries: precisions, devices, layouts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Bytes per value of each thing a training step holds."""

    name: str
    trained: float  # the decoder's weights as the optimizer keeps them
    grad: float
    optimizer: float  # AdamW's two moments together
    full: float  # the frozen full model's weights
    compute: float  # activations, gathered weights and the KV cache
    residual: float  # the residual stream and RMSNorm internals (fp32 under autocast with fp32 weights)
    mask: float  # one attention-mask entry per (query, key) pair, as SDPA receives it
    reduce: float  # gradients as they are reduced across devices


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    # The Trainer on a GPU: fp32 weights and AdamW, bf16 autocast, the full model loaded in bf16, boolean masks.
    Precision("bf16", trained=4, grad=4, optimizer=8, full=2, compute=2, residual=4, mask=1, reduce=4),
    # On a CPU (the measured runs): fp32 throughout, SDPA's float mask.
    Precision("fp32", trained=4, grad=4, optimizer=8, full=4, compute=4, residual=4, mask=4, reduce=4),
)}


@dataclass(frozen=True)
class Device:
    """One accelerator's spec-sheet numbers: dense bf16 FLOP/s, memory bandwidth, link bandwidth per direction
    inside a node and across nodes (per device)."""

    name: str
    memory_gib: float
    flops: float
    memory_bandwidth: float
    link_bandwidth: float
    network_bandwidth: float


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100-80gb", 80, 989e12, 3.35e12, 450e9, 50e9),  # SXM: NVLink 4 900 GB/s both ways, 400 Gb/s NIC each
    Device("a100-80gb", 80, 312e12, 2.039e12, 300e9, 25e9),  # SXM: NVLink 3 600 GB/s both ways, 200 Gb/s NIC each
)}


@dataclass(frozen=True)
class Layout:
    """How the pair is spread over the devices."""

    name: str
    shard_decoder: bool  # FSDP / ZeRO-3: the decoder's weights, gradients and AdamW state in N shards
    shard_full: bool  # the frozen full model in N shards too, gathered per layer for its forward
    checkpointing: bool  # activation checkpointing of the decoder's layers
    description: str
    runs_here: bool  # whether this workbook's training runs it today (see docs/distributed.md)


LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


for _l in (
    Layout("ddp", False, False, False, "data parallel: everything replicated", True),
    Layout("fsdp", True, False, False, "decoder sharded (FSDP / ZeRO-3), full model replicated: the shipped configs",
           True),
    Layout("fsdp_full", True, True, False, "decoder and frozen full model both sharded", False),
    Layout("ddp_ckpt", False, False, True, "data parallel, decoder layers checkpointed", False),
    Layout("fsdp_ckpt", True, False, True, "decoder sharded and checkpointed, full model replicated", False),
    Layout("fsdp_full_ckpt", True, True, True, "both sharded, decoder checkpointed", False),
):
    register_layout(_l)


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


@dataclass(frozen=True)
class Workload:
    """One micro-batch per device: ``batch`` examples of ``prompt`` tokens (the full model prefills them) and
    ``response`` tokens (the decoder trains on them, reading the prompt's cache); ``grad_accum`` micro-batches
    per optimizer step."""

    batch: int
    prompt: int
    response: int
    grad_accum: int = 1

    def __post_init__(self):
        if min(self.batch, self.response, self.grad_accum) < 1 or self.prompt < 0:
            raise ValueError(f"a workload needs batch, response and grad_accum >= 1 and prompt >= 0, got {self}")

    @property
    def tokens(self) -> int:
        """Prompt + response tokens of one micro-batch."""
        return self.batch * (self.prompt + self.response)


def preset_workload(preset, prompt_fraction: float = 0.5) -> Workload:
    """A preset's micro-batch, each example ``training.max_length`` tokens split prompt / response."""
    from overfill_lib.training import TrainingConfig

    config = TrainingConfig.from_preset(preset)
    prompt = round(config.max_length * prompt_fraction)
    return Workload(config.batch_size, prompt, config.max_length - prompt, config.grad_accum)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def _shape(config):
    c = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    d = head_dim_of(c)
    return c, d, c.num_attention_heads * d, (c.num_key_value_heads or c.num_attention_heads) * d


def layer_parameters(config) -> int:
    """Parameters of one transformer layer (the unit FSDP gathers)."""
    parts = parameter_breakdown(config)
    return (parts["attention"] + parts["mlp"] + parts["norms"] - config.hidden_size) // config.num_hidden_layers


def layer_token_bytes(config, precision: Precision) -> float:
    """Bytes one decoder layer saves for backward per token it runs on, besides keys, values and mask.

    Counted per operation of the Hugging Face Llama layer: each RMSNorm keeps its input and normalized value
    (residual precision), its output (the projections' input, compute precision) and an rsqrt; attention keeps the
    rotated queries and its output (``2q``) and a log-sum-exp per head; the SwiGLU MLP keeps gate, its SiLU, up
    and their product (``4i``)."""
    c, _, q, _ = _shape(config)
    norms = 2 * (2 * c.hidden_size * precision.residual + c.hidden_size * precision.compute + 4)
    return norms + 2 * q * precision.compute + 4 * c.num_attention_heads + 4 * c.intermediate_size * precision.compute


def activation_bytes(decoder_config, workload: Workload, precision: Precision | str,
                     checkpointing: bool = False) -> dict:
    """What the decoder saves for backward over one micro-batch.

    It runs on ``response - 1`` tokens per row (the full model predicts the first) and attends over
    ``prompt + response - 1`` positions, whose keys and values each layer keeps once per row, expanded to the
    query heads (``repeat_kv``), with its mask rows. Outside the layers: the final norm and the rotary tables;
    the loss keeps a log-softmax over the vocabulary (fp32) for every response token. With ``checkpointing``
    each layer keeps only its input, and one layer's activations exist at a time while backward recomputes it.
    """
    precision = PRECISIONS[precision] if isinstance(precision, str) else precision
    c, d, _, _ = _shape(decoder_config)
    runs = max(workload.response - 1, 1)
    attended = workload.prompt + runs
    one_layer = workload.batch * (runs * layer_token_bytes(c, precision) + attended * runs * precision.mask
                                  + 2 * c.num_attention_heads * d * attended * precision.compute)
    layers = c.num_hidden_layers
    if checkpointing:
        layer_total = layers * workload.batch * runs * c.hidden_size * precision.residual + one_layer
    else:
        layer_total = layers * one_layer
    outside = workload.batch * runs * (2 * c.hidden_size * precision.residual + c.hidden_size * precision.compute
                                       + 4 + 2 * d * precision.compute + 8)  # + the int64 targets
    loss = workload.batch * workload.response * (4 * c.vocab_size + 4)  # log-softmax and the fp32 token mask
    return {"layers": round(layer_total), "outside_layers": round(outside), "loss": round(loss),
            "total": round(layer_total + outside + loss)}


def prefill_bytes(full_config, workload: Workload, precision: Precision) -> dict:
    """The frozen full model's prefill of one micro-batch under no_grad: the prompt's KV cache it hands the
    decoder, and the largest working set of one layer (its MLP's gate, up and product) while it runs."""
    c, _, _, kv = _shape(full_config)
    tokens = workload.batch * workload.prompt
    cache = 2 * c.num_hidden_layers * kv * tokens * precision.compute
    working = tokens * (2 * c.hidden_size + 3 * c.intermediate_size) * precision.compute
    return {"kv_cache": round(cache), "working": round(working)}


def memory_per_device(full_config, decoder_config, layout: Layout | str, devices: int, workload: Workload,
                      precision: Precision | str = "bf16") -> dict:
    """Bytes each of ``devices`` holds at the peak of a step, by part, and their ``total``."""
    layout = get_layout(layout) if isinstance(layout, str) else layout
    precision = PRECISIONS[precision] if isinstance(precision, str) else precision
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    n_dec = parameter_breakdown(decoder_config)["total"]
    n_full = parameter_breakdown(full_config)["total"]
    shards = devices if layout.shard_decoder else 1
    out = {
        "decoder_weights": n_dec * precision.trained / shards,
        "decoder_gradients": n_dec * precision.grad / shards,
        "optimizer": n_dec * precision.optimizer / shards,
        # FSDP / ZeRO-3 gather a layer to compute and prefetch the next: two layers in compute precision.
        "decoder_gathered": 2 * layer_parameters(decoder_config) * precision.compute if layout.shard_decoder and devices > 1 else 0,
        "full_weights": n_full * precision.full / (devices if layout.shard_full else 1),
        "full_gathered": 2 * layer_parameters(full_config) * precision.full if layout.shard_full and devices > 1 else 0,
        **prefill_bytes(full_config, workload, precision),
        "activations": activation_bytes(decoder_config, workload, precision, layout.checkpointing)["total"],
    }
    out = {k: round(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------------
# Step bounds
# --------------------------------------------------------------------------------------------------


def _flops_per_step(full_config, decoder_config, workload: Workload, checkpointing: bool) -> float:
    """FLOPs of one micro-batch on one device: the decoder forward + backward (6 per weight per token, 8 with the
    recompute of checkpointing, plus attention over the attended positions) and the full model's prefill
    (2 per weight per prompt token, plus causal attention)."""
    def matmul_params(config):
        parts = parameter_breakdown(config)
        return parts["total"] - parts["embedding"] + (parts["embedding"] if parts["tied_embeddings"] else 0)

    dc, _, dq, _ = _shape(decoder_config)
    fc, _, fq, _ = _shape(full_config)
    runs = max(workload.response - 1, 1)
    attended = workload.prompt + (runs + 1) / 2
    per_pass = 2 * matmul_params(dc) * runs + 4 * dc.num_hidden_layers * dq * attended * runs
    decoder = per_pass * (4 if checkpointing else 3)
    prefill = 2 * matmul_params(fc) * workload.prompt + 2 * fc.num_hidden_layers * fq * workload.prompt ** 2
    return workload.batch * (decoder + prefill)


def step_bounds(full_config, decoder_config, layout: Layout | str, devices: int, workload: Workload,
                device: Device | str = "h100-80gb", precision: Precision | str = "bf16", nodes: int = 1) -> dict:
    """Lower bounds on one optimizer step (``grad_accum`` micro-batches per device) from compute, memory traffic and
    collectives, assuming perfect overlap; the tokens per second they allow; which one binds; and the tokens per
    device per micro-batch at which compute alone would bind (``compute_bound_from_tokens``)."""
    layout = get_layout(layout) if isinstance(layout, str) else layout
    device = DEVICES[device] if isinstance(device, str) else device
    precision = PRECISIONS[precision] if isinstance(precision, str) else precision
    n_dec = parameter_breakdown(decoder_config)["total"]
    n_full = parameter_breakdown(full_config)["total"]
    micro = workload.grad_accum
    flops = micro * _flops_per_step(full_config, decoder_config, workload, layout.checkpointing)
    # Memory traffic: weights read in forward and backward (and the recompute), the full model once per micro-batch,
    # activations written and read once, the optimizer reading and writing its shard once per step.
    passes = 3 if layout.checkpointing else 2
    shard = devices if layout.shard_decoder else 1
    act = activation_bytes(decoder_config, workload, precision, layout.checkpointing)["total"]
    fixed_bytes = micro * (passes * n_dec * precision.compute + n_full * precision.full)
    fixed_bytes += n_dec / shard * (2 * (precision.trained + precision.optimizer) + precision.grad)
    per_token_bytes = micro * 2 * act
    memory_bytes = fixed_bytes + per_token_bytes
    # Collectives per device (ring): all-gather of sharded weights for each pass, reduce(-scatter) of gradients.
    ring = (devices - 1) / devices if devices > 1 else 0.0
    if layout.shard_decoder:
        comm = micro * passes * n_dec * precision.compute * ring + n_dec * precision.reduce * ring
    else:
        comm = 2 * n_dec * precision.reduce * ring  # all-reduce
    if layout.shard_full:
        comm += micro * n_full * precision.full * ring
    link = device.link_bandwidth if nodes == 1 else device.network_bandwidth
    seconds = {"compute": flops / device.flops, "memory": memory_bytes / device.memory_bandwidth,
               "communication": comm / link if devices > 1 else 0.0}
    binding = max(seconds, key=seconds.get)
    tokens = micro * workload.tokens
    # Compute and activation traffic grow with the tokens; weights, optimizer and collectives do not.
    flops_per_token = flops / tokens
    act_per_token = per_token_bytes / tokens
    compute_rate = flops_per_token / device.flops - act_per_token / device.memory_bandwidth
    fixed = max(fixed_bytes / device.memory_bandwidth, seconds["communication"])
    compute_from = math.ceil(fixed / compute_rate / micro) if compute_rate > 0 else None
    return {"flops": flops, "memory_bytes": round(memory_bytes), "communication_bytes": round(comm),
            "seconds": seconds, "bound": binding, "tokens_per_step": tokens,
            "tokens_per_s": devices * tokens / max(seconds.values()),
            "compute_bound_from_tokens": compute_from}


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


PREFERENCE = ("ddp", "fsdp", "fsdp_ckpt", "fsdp_full", "fsdp_full_ckpt", "ddp_ckpt")


def pair_configs(preset) -> tuple:
    """(full config, decoder config) of a preset, from its published shape when it names one of the paper's
    models (no download), else from its full model's directory and its ``decoder`` section."""
    from overfill_lib.architectures import PUBLISHED_SHAPES, published_config
    from overfill_lib.pruning import pruned_config

    section = preset.decoder
    if preset.name in PUBLISHED_SHAPES:
        full = published_config(preset.name)
    else:
        from transformers import AutoConfig

        from overfill_lib.artifacts import resolve_model

        full = AutoConfig.from_pretrained(resolve_model(preset.full_model.id))
    return full, pruned_config(full, hidden=section.hidden, intermediate=section.intermediate, heads=section.heads,
                               round_to=section.round_to)


def plan(full_config, decoder_config, devices: int, memory_gib: float, workload: Workload,
         device: Device | str = "h100-80gb", precision: Precision | str = "bf16", headroom: float = 0.9,
         nodes: int = 1) -> list[dict]:
    """Every layout on ``devices`` devices of ``memory_gib`` GiB: memory per device, whether it fits within
    ``headroom`` of the memory (the rest for the allocator's fragmentation and the runtime), its step bounds,
    and ``chosen``: the first that fits in :data:`PREFERENCE` (the least communication first)."""
    device = DEVICES[device] if isinstance(device, str) else device
    device = replace(device, memory_gib=memory_gib)
    rows = []
    for name in PREFERENCE:
        layout = LAYOUTS[name]
        if devices == 1 and (layout.shard_decoder or layout.shard_full):
            continue  # one device: nothing to shard over
        mem = memory_per_device(full_config, decoder_config, layout, devices, workload, precision)
        bounds = step_bounds(full_config, decoder_config, layout, devices, workload, device, precision, nodes)
        rows.append({"layout": name, "devices": devices, "memory_gib": memory_gib,
                     "per_device_gib": mem["total"] / GIB, "fits": mem["total"] <= headroom * memory_gib * GIB,
                     "memory": mem, "bounds": bounds, "runs_here": layout.runs_here, "chosen": False})
    for row in rows:
        if row["fits"]:
            row["chosen"] = True
            break
    return rows


def launch_command(preset_name: str, layout: str, devices: int, nodes: int = 1) -> str | None:
    """The command that trains ``preset_name``'s OverFill objective in ``layout`` on ``devices`` GPUs per node and
    ``nodes`` nodes (multi-node: run it on every node with NODE_RANK set and MASTER the first node's address);
    None for the layouts this workbook does not run (see ``Layout.runs_here``)."""
    if not get_layout(layout).runs_here:
        return None
    train = f"-m overfill_lib.pipeline train --preset {preset_name} --objective overfill"
    if devices * nodes == 1:
        return f"python {train}"
    how = "--multi_gpu" if layout == "ddp" else "--config_file overfill_lib/configs/fsdp.yaml"
    where = f"--num_processes {devices * nodes}"
    if nodes > 1:
        where += f" --num_machines {nodes} --machine_rank $NODE_RANK --main_process_ip $MASTER --main_process_port 29500"
    return f"accelerate launch {how} {where} {train}"


def table(preset, devices: Sequence[int] = (1, 2, 4, 8), memory_gib: float = 80, device: str = "h100-80gb",
          workload: Workload | None = None) -> str:
    """A markdown table of :func:`plan` for one preset over device counts: GiB per device in every layout, the
    first layout this workbook runs that fits, its step bound and the tokens per device per micro-batch from which
    compute would bind."""
    full, decoder = pair_configs(preset)
    workload = workload or preset_workload(preset)
    names = [n for n in PREFERENCE if n in LAYOUTS]
    lines = ["| devices | " + " | ".join(f"{n} GiB" for n in names) + " | runs here and fits | bound, tokens/s ceiling "
             "| compute-bound from (tokens per device per micro-batch) |",
             "|---" * (len(names) + 4) + "|"]
    for n in devices:
        rows = {r["layout"]: r for r in plan(full, decoder, n, memory_gib, workload, device)}
        cells = [f"{rows[k]['per_device_gib']:.1f}" + ("" if rows[k]["fits"] else " (no)") if k in rows else "-"
                 for k in names]
        pick = next((rows[k] for k in names if k in rows and rows[k]["fits"] and rows[k]["runs_here"]), None)
        if pick is None:
            lines.append(f"| {n} | " + " | ".join(cells) + " | none | - | - |")
            continue
        b = pick["bounds"]
        start = b["compute_bound_from_tokens"]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {pick['layout']} | {b['bound']}, {b['tokens_per_s']:,.0f} | "
                     f"{'never' if start is None else f'{start:,}'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from overfill_lib.presets import load_preset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--memory-gib", type=float, default=80)
    parser.add_argument("--device", choices=sorted(DEVICES), default="h100-80gb")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    print(table(preset, args.devices, args.memory_gib, args.device))
    full, decoder = pair_configs(preset)
    print(f"\nworkload per device: {asdict(preset_workload(preset))}; full {parameter_breakdown(full)['total']:,} "
          f"parameters, decoder {parameter_breakdown(decoder)['total']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
