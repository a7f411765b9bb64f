"""Decoder training: the OverFill objective, its baselines (a registry, ``OBJECTIVES``), and one Trainer for all.

OverFill's loss comes from the pair's own scoring path (``OverFillModel.loss``): the frozen full model prefills the
prompt and the decoder is trained on the response reading that cache. The Trainer is handed the trained model only,
so under ``accelerate launch`` (DDP, DeepSpeed ZeRO-3, FSDP) the frozen full model is never wrapped, sharded or
checkpointed; it is loaded before the ``TrainingArguments`` exist, because ZeRO-3 partitions every model loaded
after. A run lives in its own folder (checkpoints, ``log.json``/``log.csv``, ``model/``, ``record.json``); from a
preset: ``pipeline.training_run`` or ``python -m overfill_lib.pipeline train``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from overfill_lib import chat_data, config
from overfill_lib.artifacts import (
    atomic_directory,
    atomic_write_text,
    environment_record,
    load_causal_lm,
    read_json,
    write_json,
)

# Resuming (the run's identity, its lock, whole checkpoints) is its own module; these are the names train() uses.
from overfill_lib.resume import (  # noqa: F401  (checkpoint_problem: named here by the tests and callers of old)
    RESUMABLE_CHANGES,
    RunLock,
    check_resume,
    checkpoint_problem,
    data_fingerprint,
    resumable_checkpoint,
    run_identity,
)

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


# The registry of objectives and the recipe (a preset's ``training`` section) live in config.py, where a preset is
# checked against them when it loads; they are this module's vocabulary, so they are named here too.
OBJECTIVES, Objective, TrainingConfig = config.OBJECTIVES, config.Objective, config.TrainingConfig
get_objective, register_objective = config.get_objective, config.register_objective


# --------------------------------------------------------------------------------------------------
# Sources: the full model, the pruned decoder, the smaller model
# --------------------------------------------------------------------------------------------------


@dataclass
class Sources:
    """Model directories a run reads; ``fingerprint(objective)`` changes whenever one it reads changes."""

    full_dir: Path
    decoder_dir: Path
    smaller_dir: Path | None = None
    full_id: str | None = None  # how the pair names the full model when saved (default: full_dir)

    def fingerprint(self, objective: str) -> str:
        """Signature of the directories ``objective`` reads (the full model's tokenizer always counts), so a run
        is reused by any caller that resolves the same models, whatever else it resolved."""
        trains = get_objective(objective).trains
        dirs = [self.full_dir] + {"decoder": [self.decoder_dir], "scratch": [self.decoder_dir],
                                  "smaller": [self.smaller_dir]}.get(trains, [])
        return hashlib.sha256(json.dumps([dir_signature(p) for p in dirs]).encode()).hexdigest()[:16]


def dir_signature(path: Path | None) -> list | None:
    """Names, sizes and modification times of a model directory's files (cheap, even for large weights)."""
    if path is None:
        return None
    path = Path(path)
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())


def check_same_tokenizer(reference_dir: Path, other_dir: Path, what: str) -> None:
    """Refuse a model whose tokenizer differs from the full model's (the data is tokenized once, by the full model)."""
    from transformers import AutoTokenizer

    if not (Path(other_dir) / "tokenizer_config.json").is_file():
        return
    a = AutoTokenizer.from_pretrained(reference_dir)
    b = AutoTokenizer.from_pretrained(other_dir)
    if a.get_vocab() != b.get_vocab() or a.eos_token_id != b.eos_token_id:
        raise ValueError(
            f"the {what} ({other_dir}) uses a different tokenizer from the full model ({reference_dir}): "
            f"vocabularies of {len(b)} and {len(a)} tokens, eos {b.eos_token!r} vs {a.eos_token!r}. OverFill needs "
            "one tokenizer (the full model picks the first token, the decoder the rest) and the baselines are "
            "trained on the same tokenized data; use a model of the same family"
        )


# --------------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _decoder_as(pair, module):
    """Run the pair with ``module`` (the decoder as accelerate wrapped it) in the decoder's place."""
    original = pair.decoder
    if module is original:
        yield pair
        return
    pair.decoder = module
    try:
        yield pair
    finally:
        pair.decoder = original


class OverFillTrainer(Trainer):
    """A Trainer whose loss is the objective's; it also logs tokens/s.

    With ``pair`` set, the loss is ``pair.loss`` (the frozen full model prefills, the decoder scores
    the response); otherwise the model's own causal-LM loss on the ``labels`` (the response tokens).
    Both are means over the micro-batch's response tokens; the Trainer divides by the accumulation
    steps, the same way in every transformers version we support.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, pair=None, include_first_token: bool = True, distill_from=None, ce_weight: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.ce_weight = ce_weight
        self.pair = pair
        self.include_first_token = include_first_token
        self.distill_from = distill_from  # the frozen full model whose distribution a "kl" objective matches
        # Our losses are per-micro-batch means: never have num_items_in_batch passed in.
        self.model_accepts_loss_kwargs = False
        self._tokens = 0
        self._response_tokens = 0
        self._last_log_time: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "teacher_ids" in inputs:  # text windows with the full model's distributions cached (windows.py)
            from overfill_lib.windows import window_loss

            with _decoder_as(self.pair, model) if self.pair is not None else contextlib.nullcontext(model) as m:
                loss, response = window_loss(m, inputs, "pair" if self.pair is not None else "causal",
                                             ce_weight=self.ce_weight)
            outputs = None
            ids = ("context_ids", "continuation_ids") if self.pair is not None else ("input_ids",)
            tokens = sum(inputs[k].numel() for k in ids)
        elif self.pair is not None:
            with _decoder_as(self.pair, model) as pair:
                loss = pair.loss(
                    inputs["context_ids"], inputs["continuation_ids"], inputs["context_mask"],
                    inputs["continuation_mask"], include_first_token=self.include_first_token,
                    kind="ce" if self.distill_from is None else "kl",
                )
            outputs = None
            tokens = int(inputs["context_mask"].sum() + inputs["continuation_mask"].sum())
            response = int(inputs["continuation_mask"].sum())
        elif self.distill_from is not None:
            from overfill_lib.pair import token_kl

            labels = inputs["labels"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            with torch.no_grad():
                teacher = self.distill_from(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            # Position t predicts token t+1: the response positions are those whose next label is scored.
            loss = token_kl(outputs.logits[:, :-1], teacher[:, :-1], labels[:, 1:] != -100)
            tokens = int(inputs["attention_mask"].sum())
            response = int((labels != -100).sum())
        else:
            outputs = model(**inputs)
            loss = outputs.loss
            tokens = int(inputs["attention_mask"].sum())
            response = int((inputs["labels"] != -100).sum())
        if model.training:
            self._tokens += tokens
            self._response_tokens += response
            # Prompt + response tokens of the examples trained on (the same for every objective on the same data);
            # kept in the state, so checkpoints carry it. The Trainer's own count (include_num_input_tokens_seen)
            # would read only `input_ids`, which the pair's batches do not have.
            self.state.num_input_tokens_seen += tokens
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None, **kwargs) -> None:
        if "loss" in logs:  # a training log: every process gets here at the same step
            now = time.time()
            since = self._last_log_time or start_time or now
            counts = torch.tensor([self._tokens, self._response_tokens], dtype=torch.long, device=self.args.device)
            counts = self.accelerator.reduce(counts, reduction="sum")
            seconds = max(now - since, 1e-9)
            logs["tokens_per_s"] = round(float(counts[0]) / seconds, 1)
            logs["response_tokens_per_s"] = round(float(counts[1]) / seconds, 1)
            if start_time is not None:
                logs["elapsed_s"] = round(now - start_time, 2)
            self._tokens = self._response_tokens = 0
            self._last_log_time = now
        super().log(logs, start_time, **kwargs)


class LogWriter(TrainerCallback):
    """Writes the log history to ``log.json`` and ``log.csv`` (atomically) at every logging step."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_history(self.run_dir, state.log_history)


class FidelityProbe(TrainerCallback):
    """Every ``every`` steps and at step 0: ``scoring.answer_fidelity`` of the model being trained (the pair for
    OverFill) on held-out chat records, appended to the log history as ``eval_nll`` / ``eval_agreement`` with
    ``tokens_seen``: how fast each objective recovers, on the same records and the same token axis."""

    def __init__(self, model, tokenizer, records: list[dict], every: int):
        self.model, self.tokenizer, self.records, self.every = model, tokenizer, records, every

    def _probe(self, state) -> None:
        from overfill_lib import scoring

        found = scoring.answer_fidelity(self.model, self.tokenizer, self.records)
        state.log_history.append({"step": state.global_step, "tokens_seen": state.num_input_tokens_seen,
                                  "eval_nll": round(found["nll"], 5), "eval_agreement": round(found["agreement"], 5)})

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._probe(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._probe(state)


class BarOnly(ProgressCallback):
    """The Trainer's progress bar without its per-log lines: in a batch run the loss curves figure and ``log.json``
    say what the Trainer's per-step tables (one 25-row table per run in a notebook) would repeat."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def batch_progress(trainer) -> None:
    """Under papermill (``artifacts.in_batch``), swap the Trainer's notebook table or log printer for :class:`BarOnly`."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils.notebook import NotebookProgressCallback

    from overfill_lib.artifacts import in_batch

    if not in_batch():
        return
    for kind in (NotebookProgressCallback, ProgressCallback, PrinterCallback):
        trainer.remove_callback(kind)
    trainer.add_callback(BarOnly)


def probe_history(history: list[dict]) -> list[dict]:
    """The validation entries :class:`FidelityProbe` added to a log history."""
    return [h for h in history if "eval_agreement" in h]


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_json(run_dir / "log.json", history)
    keys = list(dict.fromkeys(k for h in history for k in h))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "log.csv", buf.getvalue())


def loss_history(history: list[dict]) -> list[dict]:
    """The training-loss entries of a Trainer log history (the per-step logs, not the final summary)."""
    return [h for h in history if "loss" in h and "step" in h]


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """A finished (or interrupted) run: where it lives, what it logged, and the trained model in memory."""

    objective: str
    seed: int
    run_dir: Path
    complete: bool
    steps: int
    record: dict
    model: Any = field(default=None, repr=False)  # the trained model, or the OverFillModel for "overfill"

    @property
    def log_history(self) -> list[dict]:
        return self.record.get("log_history", [])

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


def run_fingerprint(objective: str, seed: int, config: TrainingConfig, sources: Sources, data_stats: dict) -> str:
    recipe = {k: v for k, v in config.to_dict().items() if k not in {"objectives", "seeds", "objective_seeds"}}
    blob = json.dumps([objective, seed, recipe, sources.fingerprint(objective), data_stats], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def mixed_precision(runtime: dict) -> bool:
    """The Trainer's bf16/fp16 autocast: only on a GPU (on a CPU every run trains in fp32)."""
    return runtime["dtype"] != "float32" and not on_cpu(runtime)


def autocast_dtype(config: TrainingConfig, runtime: dict) -> str | None:
    """The dtype the Trainer autocasts to (None: fp32 throughout), by ``config.precision``."""
    if config.precision == "fp32":
        return None
    if config.precision == "bf16":
        return "bfloat16"
    return runtime["dtype"] if mixed_precision(runtime) else None


def full_dtype(runtime: dict) -> str:
    # The frozen full model in the autocast dtype when there is one, else fp32 like the decoder it is paired with.
    return runtime["dtype"] if mixed_precision(runtime) else "float32"


def load_full(sources: Sources, dtype: str):
    """The frozen full model, loaded before any TrainingArguments so ZeRO-3 does not partition it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise RuntimeError(
            "DeepSpeed ZeRO-3 is already active in this process, so from_pretrained would partition the frozen full "
            "model; run each training in its own process (python -m overfill_lib.pipeline train under accelerate launch)"
        )
    return load_causal_lm(sources.full_dir, "full model", dtype=getattr(torch, dtype)).eval()


def _trainable_model(objective: Objective, sources: Sources, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    set_seed(seed)
    if objective.trains == "decoder":
        return load_causal_lm(sources.decoder_dir, "pruned decoder", dtype=torch.float32)
    if objective.trains == "scratch":
        config = AutoConfig.from_pretrained(sources.decoder_dir)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if objective.trains == "full":
        return load_causal_lm(sources.full_dir, "full model", dtype=torch.float32)
    if objective.trains == "smaller":
        if sources.smaller_dir is None:
            raise ValueError("the 'smaller' baseline needs a smaller model: set the preset's smaller.id or training.smaller_id")
        return load_causal_lm(sources.smaller_dir, "smaller model", dtype=torch.float32)
    raise ValueError(f"objective {objective.name!r} trains unknown model kind {objective.trains!r}")


def _length_grouping() -> dict:
    """TrainingArguments for length-grouped batches (less padding); the option was renamed within transformers 5."""
    names = {f.name for f in fields(TrainingArguments)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length", "length_column_name": "length"}
    return {"group_by_length": True, "length_column_name": "length"}


def _checkpointing() -> dict:
    """Activation checkpointing on, under whichever name this transformers version uses (renamed within 5.x)."""
    names = {f.name for f in fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": True}


def _training_args(config: TrainingConfig, run_dir: Path, seed: int, steps: int, runtime: dict, layout: str):
    cpu = on_cpu(runtime)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * steps),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=[],
        seed=seed,
        data_seed=seed,
        bf16=autocast_dtype(config, runtime) == "bfloat16",
        fp16=autocast_dtype(config, runtime) == "float16",
        use_cpu=cpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **(_checkpointing() if config.gradient_checkpointing and layout == "causal" else {}),
        label_names=["labels"] if layout == "causal" else [],
        disable_tqdm=False,
        **(_length_grouping() if config.group_by_length else {}),
        # FSDP on a CPU (distributed.enable_cpu_fsdp) configures accelerate's state before the Trainer: keep it
        **({"accelerator_config": {"use_configured_state": True}} if os.environ.get("OVERFILL_CPU_FSDP") else {}),
    )


def on_cpu(runtime: dict) -> bool:
    return runtime["device"] == "cpu" or not torch.cuda.is_available()


def world_size() -> int:
    # From the launcher's environment (torchrun / accelerate launch), without initializing any distributed state.
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_steps(config: TrainingConfig, examples: int, world_size: int = 1) -> int:
    """Optimizer steps of a run: ``steps``, or ``epochs`` over the data at the global batch size."""
    if config.steps is not None:
        return int(config.steps)
    per_step = config.batch_size * config.grad_accum * world_size
    return max(1, math.ceil(config.epochs * examples / per_step))


def train(
    objective: str,
    sources: Sources,
    dataset,
    config: TrainingConfig,
    run_dir: str | Path,
    *,
    seed: int = 0,
    runtime: dict | None = None,
    resume: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
    data_stats: dict | None = None,
    full=None,
    probe_records: list[dict] | None = None,
    collator=None,
    probe=None,
) -> RunResult:
    """Train one objective on a tokenized dataset (``chat_data.prepare_chat_data``) into ``run_dir``.

    Resumes from the latest checkpoint in ``run_dir/checkpoints`` when ``resume``. A run that stops
    before its planned steps (interrupted, or a callback stopped it) returns ``complete=False`` and
    writes no final model. ``full``: an already loaded full model to reuse (OverFill and the ``kl`` objectives).
    ``probe_records``: the held-out chat records :class:`FidelityProbe` scores when ``config.eval_steps`` is set.
    ``collator``: for data other than tokenized chat (``windows.WindowCollator`` for text windows).
    ``probe``: a function of the trained model (the pair for OverFill) that returns a callback validating it
    (``recovery.TextProbe``), for data that :class:`FidelityProbe` cannot score.
    """
    from transformers import AutoTokenizer

    obj = get_objective(objective)
    runtime = runtime or {"device": "cpu", "dtype": "float32"}
    run_dir = Path(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(sources.full_dir)
    full = _frozen_full(objective, sources, config, runtime, full)
    steps = planned_steps(config, len(dataset), world_size())
    args = _training_args(config, run_dir, seed, steps, runtime, obj.layout)
    model = _trainable_model(obj, sources, seed)
    if full is not None and (obj.layout == "pair" or obj.loss == "kl"):
        full.to(args.device)  # the Trainer places (or shards) only the model it trains
    pair = _overfill_pair(config, sources, full, model, tokenizer, runtime) if obj.layout == "pair" else None
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = OverFillTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator or chat_data.ChatCollator(tokenizer.pad_token_id, obj.layout),
        processing_class=tokenizer,
        callbacks=[LogWriter(run_dir), *callbacks],
        pair=pair,
        include_first_token=config.include_first_token,
        distill_from=full if obj.loss == "kl" else None,
        ce_weight=config.ce_weight,
    )
    batch_progress(trainer)
    _add_probes(trainer, pair if pair is not None else model, tokenizer, config, probe_records, probe)
    main_process = int(os.environ.get("RANK", "0")) == 0
    with RunLock(run_dir) if main_process else contextlib.nullcontext():
        identity = (run_identity(objective, seed, config, sources, data_fingerprint(dataset, data_stats))
                    if main_process else None)
        checkpoint = _checkpoint_to_resume(trainer, run_dir, identity, resume)
        if checkpoint:
            log.info("%s seed %d: resuming from %s", objective, seed, checkpoint)
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=checkpoint)
        seconds = time.perf_counter() - t0
        state = trainer.state
        complete = state.global_step >= steps
        record = _run_record(trainer, objective, seed, config, sources, runtime, data_stats, checkpoint, seconds,
                             steps, model, full if pair is not None or obj.loss == "kl" else None)
        _write_run(trainer, pair, run_dir, sources, record, complete)
    trainer.accelerator.wait_for_everyone()
    model.eval()
    if pair is not None and mixed_precision(runtime):  # saved in fp32; in memory, one dtype so the pair can generate
        model.to(next(full.parameters()).dtype)
    return RunResult(objective, seed, run_dir, complete, state.global_step, record, pair if pair is not None else model)


def _frozen_full(objective: str, sources: Sources, config: TrainingConfig, runtime: dict, full=None):
    """The frozen full model the objective reads (``full`` when given, else loaded): OverFill's prefill, or the
    distribution a ``kl`` objective matches. A decoder or smaller model of another tokenizer is refused first."""
    obj = get_objective(objective)
    if obj.layout == "pair":
        check_same_tokenizer(sources.full_dir, sources.decoder_dir, "decoder")
        if config.gradient_checkpointing:
            log.warning("gradient_checkpointing is ignored for %s: HF checkpointing drops the prompt KV", objective)
        full = full if full is not None else load_full(sources, full_dtype(runtime))
    elif obj.trains == "smaller":
        check_same_tokenizer(sources.full_dir, sources.smaller_dir, "smaller model")
    if obj.loss == "kl" and full is None:
        full = load_full(sources, full_dtype(runtime))
    return full


def _overfill_pair(config: TrainingConfig, sources: Sources, full, decoder, tokenizer, runtime: dict):
    """The pair OverFill trains: the frozen full model prefills, ``decoder`` (the model the Trainer wraps) continues."""
    from overfill_lib.pair import OverFillModel

    pruning_path = sources.decoder_dir / "pruning.json"
    pair = OverFillModel(
        full, decoder, config.strategy, tokenizer=tokenizer, full_id=sources.full_id or str(sources.full_dir),
        pruning_record=read_json(pruning_path) if pruning_path.is_file() else None,
        mixed_precision=mixed_precision(runtime),
    )
    if any(True for _ in pair.strategy.parameters()):
        raise ValueError(
            f"strategy {config.strategy!r} has trainable weights, which this engine does not train (they would sit "
            "outside the wrapped decoder); use shared_kv (the paper's setting) or layer_subset"
        )
    return pair


def _add_probes(trainer, trained, tokenizer, config: TrainingConfig, probe_records, probe) -> None:
    """The validation callbacks: :class:`FidelityProbe` every ``config.eval_steps``, and the caller's ``probe``."""
    if config.eval_steps:
        if not probe_records:
            raise ValueError("training.eval_steps is set: pass probe_records (pipeline.data_records(preset, config))")
        trainer.add_callback(FidelityProbe(trained, tokenizer, probe_records, config.eval_steps))
    if probe is not None:
        trainer.add_callback(probe(trained))


def _checkpoint_to_resume(trainer, run_dir: Path, identity: dict | None, resume: bool) -> str | None:
    """The checkpoint this run resumes from (None: it starts over). The main process (the one given the run's
    ``identity``) keeps only a whole one and refuses one of another recipe, models or data
    (:func:`resume.check_resume`); under several processes every process then resumes from the one it kept."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = trainer.args.output_dir
    checkpoint = resumable_checkpoint(Path(output_dir)) if resume and identity is not None else None
    if identity is not None:
        check_resume(run_dir, identity, checkpoint)
    if world_size() > 1:  # the main process set incomplete checkpoints aside; all resume from the same one
        trainer.accelerator.wait_for_everyone()
        checkpoint = get_last_checkpoint(output_dir) if resume and Path(output_dir).is_dir() else None
    return checkpoint


def _run_record(trainer, objective: str, seed: int, config: TrainingConfig, sources: Sources, runtime: dict,
                data_stats, checkpoint, seconds: float, steps: int, model, full) -> dict:
    """``record.json``: what the run was (recipe, models, data, parameters), how far it got and where it ran."""
    state, args = trainer.state, trainer.args
    return {
        "objective": objective,
        "description": get_objective(objective).description,
        "seed": seed,
        "complete": state.global_step >= steps,
        "steps": state.global_step,
        "planned_steps": steps,
        "resumed_from": checkpoint,
        "train_seconds": round(seconds, 2),
        "world_size": args.world_size,
        "config": config.to_dict(),
        "runtime": runtime,
        "sources": {k: str(v) if v is not None else None for k, v in asdict(sources).items()},
        "data": data_stats,
        "parameters": {"trained": _count(model), "full": _count(full) if full is not None else None},
        "log_history": state.log_history,
        "environment": environment_record(str(args.device), seed),
    }


def _write_run(trainer, pair, run_dir: Path, sources: Sources, record: dict, complete: bool) -> None:
    """The log (every run) and, when complete, the final model and ``record.json``."""
    if trainer.is_world_process_zero():
        write_history(run_dir, trainer.state.log_history)
    if complete:
        _save_final(trainer, pair, run_dir / "model", sources)
        if trainer.is_world_process_zero():
            write_json(run_dir / "record.json", record)


def _count(model) -> int:
    # ZeRO-3 leaves each process a shard; ds_numel is the full size of a partitioned parameter.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def _save_final(trainer: Trainer, pair, out: Path, sources: Sources) -> None:
    """The trained model as an HF directory (safetensors); for OverFill the pair's format (decoder + overfill_config.json).

    Sharded engines (ZeRO-3, FSDP) gather the weights in ``trainer.save_model``, which every process must
    call (FSDP with sharded checkpoints gathers a full state dict for it); the main process then writes the pair.
    """
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if not sharded:
        if trainer.is_world_process_zero():
            if pair is not None:
                pair.save_pretrained(out)
            else:
                with atomic_directory(out) as tmp:
                    trainer.model.save_pretrained(tmp)
                    trainer.processing_class.save_pretrained(tmp)
        return
    staging = out.with_name(f".{out.name}.staging")
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    kept = plugin.state_dict_type if plugin is not None else None
    if plugin is not None and "FULL_STATE_DICT" not in str(kept):  # sharded checkpoints; the final weights gathered
        plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model(str(staging))
    finally:
        if plugin is not None:
            plugin.set_state_dict_type(kept)
    if trainer.is_world_process_zero():
        if pair is not None:  # the gathered decoder in the pair's format, as a single-process run saves it
            with _decoder_as(pair, load_causal_lm(staging, "trained decoder", dtype=torch.float32)) as gathered:
                gathered.save_pretrained(out)
            shutil.rmtree(staging)
            return
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)


def load_trained(result_or_dir: RunResult | str | Path, full=None):
    """The trained model of a finished run (an ``OverFillModel`` for OverFill), from disk."""
    from overfill_lib.pair import CONFIG_NAME, OverFillModel

    run_dir = result_or_dir.run_dir if isinstance(result_or_dir, RunResult) else Path(result_or_dir)
    record = read_json(run_dir / "record.json")
    model_dir = run_dir / "model"
    if get_objective(record["objective"]).layout == "pair":
        if (model_dir / CONFIG_NAME).is_file():
            return OverFillModel.from_pretrained(model_dir, full=full)
        return OverFillModel.from_models(record["sources"]["full_dir"], model_dir)
    return load_causal_lm(model_dir, "trained model").eval()
