"""Training past one device: OverFill under FSDP on CPU for real, and the memory each process holds, measured.

OverFill trains one model (the decoder) that reads another (the frozen full model's prompt cache). Under
``accelerate launch`` the Trainer wraps and shards only the decoder; the full model stays a plain module,
replicated on every process, under no_grad and outside the optimizer (``training.load_full`` loads it before
any TrainingArguments exist). The planner (:mod:`overfill_lib.planner`) costs that layout and the others.

accelerate never selects FSDP on a CPU (with no accelerator its launcher state is MULTI_CPU, which ignores
``ACCELERATE_USE_FSDP``), though torch's FSDP2 ``fully_shard`` shards over gloo on a CPU device mesh. This module's
``train`` command is ``pipeline train`` with that one gap closed (:func:`enable_cpu_fsdp`), plus a record of what
each process held (:class:`MemoryProbe`)::

    accelerate launch --config_file overfill_lib/configs/cpu_fsdp.yaml \\
        -m overfill_lib.distributed train --preset smoke --objective overfill --steps 6 --memory-out mem/

On a GPU node use ``pipeline train`` with ``configs/fsdp.yaml`` or ``configs/deepspeed_zero3.yaml``
(docs/distributed.md); this command also runs there (the CPU hook then does nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# FSDP on a CPU
# --------------------------------------------------------------------------------------------------


def cpu_fsdp_requested() -> bool:
    """Launched with an FSDP config (``ACCELERATE_USE_FSDP``) on a machine without an accelerator."""
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.accelerator.current_accelerator() is None


def enable_cpu_fsdp():
    """Make the process-wide accelerate state FSDP on gloo, with the plugin the launcher's environment describes.

    Must run before the Trainer creates its Accelerator (the state is a singleton the Trainer then reads:
    ``trainer.is_fsdp_enabled``). accelerate's FSDP2 path then shards the trained model with ``fully_shard``
    on torch's default mesh, which is a CPU mesh when there is no accelerator. Returns the plugin.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # fsdp_version, wrap policy, state dict type: from the environment
    if plugin.fsdp_version != 2:
        raise ValueError(f"FSDP on a CPU is tested with FSDP2 only (the config asks for fsdp_version "
                         f"{plugin.fsdp_version}); set fsdp_version: 2 in the accelerate config")
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        raise ValueError("FSDP on a CPU runs in fp32: set mixed_precision: \"no\" in the accelerate config "
                         "(bf16 autocast is the preset's training.precision, not accelerate's)")
    state = Accelerator(cpu=True).state  # the state may only be made by an Accelerator; the Trainer's reuses it
    os.environ["OVERFILL_CPU_FSDP"] = "1"  # training._training_args: TrainingArguments keep this state
    # Both singletons: every AcceleratorState copies the PartialState's fields over its own when it is made.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    log.info("FSDP%d on CPU (gloo, %d processes): accelerate's state set to FSDP", plugin.fsdp_version,
             state.num_processes)
    return plugin


# --------------------------------------------------------------------------------------------------
# What each process holds
# --------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} line in /proc/self/status (this measure needs Linux)")


def rss_bytes() -> int:
    """Resident memory of this process now (VmRSS)."""
    return _status("VmRSS")


def reset_peak_rss() -> bool:
    """Start the peak resident memory (VmHWM) over from now (Linux >= 4.0: /proc/self/clear_refs); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor's shard on this process


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors' local data (a sharded DTensor counts its shard), each storage once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


class SavedTensors:
    """Within the block, the bytes of the tensors autograd saves for backward (activations): each storage once,
    parameters and views of them left out (they are counted as weights).

        with SavedTensors() as saved:
            loss = pair.loss(...)
        saved.bytes
    """

    def __init__(self):
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        weight = isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter)
        if not weight and t.device.type != "meta":
            storage = _local(t).untyped_storage()
            self._sizes[storage.data_ptr()] = max(self._sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class MemoryProbe(TrainerCallback):
    """Per process, at the first optimizer step: the bytes of the trained model's parameters, gradients and
    optimizer state held locally (a shard under FSDP), the frozen full model's, and the activations the first
    step's micro-batches save for backward (:class:`SavedTensors`, summed over ``grad_accum`` micro-batches) with
    the shapes the decoder ran on. Peak RSS of the process, and of the training alone (reset when it begins)."""

    def __init__(self, full=None):
        self.full = full
        self.found: dict = {}
        self._saved: SavedTensors | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # Loading the models peaks higher than training may: the training peak is measured from here on.
        self.found["rss_train_begin"] = rss_bytes()
        self.found["peak_rss_reset"] = reset_peak_rss()

    def _shape(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # generation.cache_keyword: renamed within 5.x
        past = cache.get_seq_length() if cache is not None else 0
        self.found.setdefault("micro_batches", []).append({"batch": int(ids.shape[0]), "tokens": int(ids.shape[1]),
                                                          "cached": int(past)})

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and self._saved is None and "activations" not in self.found:
            self._saved = SavedTensors().__enter__()
            # The shapes the decoder runs on (rows, tokens, cached prompt positions), for the planner to cost.
            self._hook = model.register_forward_pre_hook(self._shape, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._saved is not None:
            self._saved.__exit__(None, None, None)
            self.found["activations"] = self._saved.bytes
            self.found["gradients"] = tensor_bytes(p.grad for p in model.parameters())
            self._saved = None
            self._hook.remove()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if "parameters" in self.found or optimizer is None:
            return
        self.found["parameters"] = tensor_bytes(model.parameters())
        self.found["optimizer"] = tensor_bytes(v for s in optimizer.state.values() for v in s.values()
                                               if isinstance(v, torch.Tensor))
        self.found["full_model"] = tensor_bytes(self.full.parameters()) if self.full is not None else 0
        self.found["trained_parameters"] = sum(p.numel() for p in model.parameters())

    def record(self) -> dict:
        training_peak = _status("VmHWM") if self.found.get("peak_rss_reset") else None
        return {**self.found, "peak_rss": peak_rss_bytes(), "peak_rss_training": training_peak,
                "rss_end": rss_bytes()}


class CrashAfterSave(TrainerCallback):
    """Kill this process (SIGKILL: no cleanup, as a lost node) right after checkpoint ``step`` is written;
    rehearses a crash so a resume can be checked against an uninterrupted curve."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            log.warning("rank %s: killed after checkpoint %d (--crash-after-save)", os.environ.get("RANK", "0"),
                        self.step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def train(argv: Sequence[str] | None = None) -> int:
    """``pipeline train`` for one objective and seed, with FSDP on a CPU, a memory record and a rehearsed crash."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from overfill_lib import pipeline, training
    from overfill_lib.presets import load_preset

    parser = argparse.ArgumentParser(prog="python -m overfill_lib.distributed train", description=train.__doc__)
    parser.add_argument("--preset", required=True, help="preset name or path to a preset YAML")
    parser.add_argument("--objective", default="overfill", help="one objective (default: overfill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="optimizer steps (overrides training.steps)")
    parser.add_argument("--override", default="{}", help="JSON dict merged onto the preset")
    parser.add_argument("--retrain", action="store_true", help="discard an earlier run of the same recipe")
    parser.add_argument("--memory-out", type=Path, help="folder for memory-rank<N>.json, one per process")
    parser.add_argument("--crash-after-save", type=int, metavar="STEP",
                        help="SIGKILL every process right after checkpoint STEP is written (a rehearsed crash)")
    args = parser.parse_args(argv)
    overrides = pipeline.train_overrides(args)
    start_rss = rss_bytes()
    preset = load_preset(args.preset, overrides)
    config = training.TrainingConfig.from_preset(preset)
    rt = pipeline.runtime(preset)
    state = PartialState(cpu=training.on_cpu(rt))
    if cpu_fsdp_requested():
        enable_cpu_fsdp()
    with state.main_process_first():
        sources = pipeline.training_sources(preset, config, [args.objective])
        dataset, stats = pipeline.training_data(preset, config, AutoTokenizer.from_pretrained(sources.full_dir))
    objective = training.get_objective(args.objective)
    full = None
    if objective.layout == "pair" or objective.loss == "kl":
        full = training.load_full(sources, training.full_dtype(rt))
    probe = MemoryProbe(full)
    callbacks = [probe] + ([CrashAfterSave(args.crash_after_save)] if args.crash_after_save else [])
    result = pipeline.training_run(preset, args.objective, seed=args.seed, config=config, sources=sources,
                                   dataset=dataset, data_stats=stats.to_dict(), retrain=args.retrain, full=full,
                                   callbacks=callbacks)
    if args.memory_out is not None:
        from overfill_lib.artifacts import write_json

        args.memory_out.mkdir(parents=True, exist_ok=True)
        write_json(args.memory_out / f"memory-rank{state.process_index}.json",
                   {"rank": state.process_index, "world_size": state.num_processes,
                    "distributed_type": str(state.distributed_type), "rss_at_start": start_rss, **probe.record(),
                    "run_dir": str(result.run_dir)})
    if state.is_main_process:
        last = training.loss_history(result.log_history)[-1:] or [{}]
        print(f"{result.objective} seed {result.seed}: {'complete' if result.complete else 'stopped'} at step "
              f"{result.steps}, last loss {last[0].get('loss')}, {result.run_dir}")
    return 0 if result.complete else 1


LAUNCHES = {  # how measure() starts each run: (accelerate config or None for one plain process, processes)
    "single": (None, 1),
    "ddp": ("cpu_ddp.yaml", 2),
    "fsdp": ("cpu_fsdp.yaml", 2),
}


def launch(name: str, preset: str, workdir: Path, steps: int, training_overrides: dict, memory_out: Path,
           extra: Sequence[str] = (), timeout: float = 3600) -> subprocess.CompletedProcess:
    """One run of :func:`train` as :data:`LAUNCHES` names it, in its own ``workdir``; 2-process runs split the
    global batch, and the single process accumulates the same micro-batches (``grad_accum`` 2)."""
    from overfill_lib.artifacts import PROJECT_ROOT
    from overfill_lib.training import CONFIG_DIR

    config, processes = LAUNCHES[name]
    train_over = dict(training_overrides)
    if processes == 1:
        train_over["grad_accum"] = train_over.get("grad_accum", 1) * 2
    override = json.dumps({"workdir": str(workdir), "training": train_over})
    head = [sys.executable, "-m"] if config is None else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG_DIR / config),
        "--num_processes", str(processes), "-m"]
    cmd = [*head, "overfill_lib.distributed", "train", "--preset", preset, "--steps", str(steps), "--override", override,
           "--memory-out", str(memory_out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def run_losses(run_dir: Path) -> list[dict]:
    from overfill_lib.artifacts import read_json
    from overfill_lib.training import loss_history

    return [{"step": h["step"], "loss": h["loss"], "grad_norm": h.get("grad_norm")}
            for h in loss_history(read_json(Path(run_dir) / "log.json"))]


def memory_records(memory_out: Path) -> list[dict]:
    from overfill_lib.artifacts import read_json

    return [read_json(p) for p in sorted(Path(memory_out).glob("memory-rank*.json"))]


def measure(argv: Sequence[str] | None = None) -> int:
    """Train a preset's OverFill objective three ways (one process, 2-process DDP, 2-process FSDP) with the same
    global batch, and write one record: per-step losses, memory per process, the planner's prediction."""
    import platform
    import shutil
    import tempfile

    import accelerate
    import transformers

    from overfill_lib import pipeline, planner
    from overfill_lib.artifacts import PROJECT_ROOT, write_json
    from overfill_lib.presets import load_preset

    parser = argparse.ArgumentParser(prog="python -m overfill_lib.distributed measure", description=measure.__doc__)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2, help="global batch (examples per optimizer step)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--runs", nargs="+", choices=list(LAUNCHES), default=list(LAUNCHES))
    parser.add_argument("--out", type=Path, required=True, help="the record (JSON)")
    args = parser.parse_args(argv)
    if args.batch % 2:
        raise SystemExit("--batch must be even: two processes split it")
    preset = load_preset(args.preset)
    overrides = {"batch_size": args.batch // 2, "max_length": args.max_length, "logging_steps": 1,
                 "eval_steps": None, "save_steps": max(1, args.steps // 2), "warmup_steps": 2}
    decoder_dir = pipeline.pruned_decoder(preset)  # the preset's, reused (never re-pruned here)
    root = Path(tempfile.mkdtemp(prefix="overfill-measure-"))
    record = {"what": f"OverFill training of {preset.name}, {args.steps} steps, global batch {args.batch}: one process "
                      "(2 accumulated micro-batches) against 2 processes on gloo, DDP and FSDP2",
              "command": "python -m overfill_lib.distributed measure " + " ".join(sys.argv[2:] if argv is None else argv),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "accelerate": accelerate.__version__},
              "commit": _commit(PROJECT_ROOT), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "config": {"preset": preset.name, "steps": args.steps, "global_batch": args.batch,
                         "max_length": args.max_length, "training_overrides": overrides}, "runs": {}}
    try:
        for name in args.runs:
            workdir = root / name
            workdir.mkdir()
            (workdir / "pruned_decoder").symlink_to(decoder_dir.resolve())
            t0 = time.time()
            proc = launch(name, args.preset, workdir, args.steps, overrides, root / f"mem-{name}")
            (root / f"{name}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise RuntimeError(f"the {name} run failed (its whole output: {root / f'{name}.log'}):\n"
                                   f"{proc.stderr[-3000:]}")
            memory = memory_records(root / f"mem-{name}")
            record["runs"][name] = {"wall_s": round(time.time() - t0, 1), "losses": run_losses(memory[0]["run_dir"]),
                                    "memory_per_process": [{k: v for k, v in m.items() if k != "run_dir"}
                                                           for m in memory]}
            log.info("%s: %.0f s, peak RSS %s", name, time.time() - t0, [m["peak_rss"] for m in memory])
    except BaseException:
        log.error("the runs' folders and logs are kept in %s", root)
        raise
    shutil.rmtree(root, ignore_errors=True)
    record["planner"] = _prediction(preset, decoder_dir, args, overrides, planner, record["runs"])
    record["loss_agreement"] = _agreement(record["runs"])
    write_json(args.out, record)
    print(json.dumps(record["loss_agreement"], indent=1))
    return 0


def _commit(root: Path) -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, check=False).stdout.strip()

    return {"sha": git("rev-parse", "HEAD"), "dirty_files": len(git("status", "--porcelain").splitlines())}


def _prediction(preset, decoder_dir: Path, args, overrides: dict, planner, runs: dict) -> dict:
    """What the planner predicts per process for each measured layout (fp32 on a CPU): the whole step on the data's
    mean prompt and response lengths, and the activations of the exact micro-batches each process measured."""
    from transformers import AutoConfig, AutoTokenizer

    from overfill_lib import pipeline, training

    config = dataclasses.replace(training.TrainingConfig.from_preset(preset), **overrides)
    full_dir = pipeline.full_model(preset)[0]
    dataset, _ = pipeline.training_data(preset, config, AutoTokenizer.from_pretrained(full_dir))
    prompt = sum(len(x) for x in dataset["prompt_ids"]) / len(dataset)
    response = sum(len(x) for x in dataset["response_ids"]) / len(dataset)
    workload = planner.Workload(args.batch // 2, round(prompt), round(response))
    full, decoder = AutoConfig.from_pretrained(full_dir), AutoConfig.from_pretrained(decoder_dir)
    layouts = {"single": ("ddp", 1), "ddp": ("ddp", 2), "fsdp": ("fsdp", 2)}
    activations = {}  # the first step's micro-batches as each process ran them, costed by the planner
    for run, found in runs.items():
        activations[run] = [
            {"micro_batches": m.get("micro_batches"), "measured": m.get("activations"),
             "predicted": sum(planner.activation_bytes(decoder, planner.Workload(b["batch"], b["cached"],
                                                                                 b["tokens"] + 1), "fp32")["total"]
                              for b in m.get("micro_batches", []))}
            for m in found["memory_per_process"]]
    return {"workload": {**workload.__dict__, "note": "mean prompt / response tokens of the training examples"},
            "precision": "fp32",
            "per_process": {run: planner.memory_per_device(full, decoder, layout, n, workload, "fp32")
                            for run, (layout, n) in layouts.items() if run in args.runs},
            "activations_of_the_first_step": activations}


def _agreement(runs: dict) -> dict:
    ref = {h["step"]: h["loss"] for h in runs.get("single", {}).get("losses", [])}
    out = {}
    for name, run in runs.items():
        if name == "single" or not ref:
            continue
        diffs = [abs(h["loss"] - ref[h["step"]]) / abs(ref[h["step"]]) for h in run["losses"] if h["step"] in ref]
        out[name] = {"steps_compared": len(diffs), "max_relative_difference": max(diffs) if diffs else None}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"train": train, "measure": measure}
    if not argv or argv[0] not in commands:
        raise SystemExit("usage: python -m overfill_lib.distributed {train,measure} ... (see --help of each)")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
