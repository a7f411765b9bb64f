"""Resuming a training run: what it may be resumed under, one training per run folder, and which checkpoint is whole.

A run folder (:func:`overfill_lib.training.train`) records its identity (``identity.json``: the objective, seed,
recipe less :data:`RESUMABLE_CHANGES`, models and data) when it starts; a resume under anything else is refused,
naming every difference. ``RunLock`` keeps a second training out of the folder, and ``resumable_checkpoint`` sets
aside a checkpoint whose save was cut short, so a killed run resumes from the newest whole one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from overfill_lib.artifacts import process_alive, read_json, write_json

log = logging.getLogger(__name__)


# What a run may change between a kill and its resume: the budget and the bookkeeping. Anything else (learning rate,
# schedule, batch, objective, models, data) would make one run of two recipes while its record claims the last one.
RESUMABLE_CHANGES = frozenset({"objectives", "seeds", "objective_seeds", "steps", "epochs", "logging_steps",
                               "eval_steps", "save_steps", "save_total_limit", "num_proc"})


def data_fingerprint(dataset, data_stats: dict | None) -> dict:
    """What identifies a run's training data: the caller's ``data_stats`` (the pipeline's carry the source file's
    sha256) and a hash of the examples' size and of up to 64 of them, evenly spaced (cheap for any size)."""
    n = len(dataset)
    picks = sorted({i * n // 64 for i in range(min(n, 64))})
    digest = hashlib.sha256(str(n).encode())
    for i in picks:
        item = dataset[i]
        item = ({k: v.tolist() if hasattr(v, "tolist") else v for k, v in item.items()} if isinstance(item, dict)
                else item.tolist() if hasattr(item, "tolist") else item)
        digest.update(json.dumps(item, sort_keys=True, default=str).encode())
    return {"stats": data_stats, "examples": n, "sample_sha256": digest.hexdigest()[:16]}


def run_identity(objective: str, seed: int, config, sources, data: dict) -> dict:
    """What a run's checkpoints may be resumed under (``run_dir/identity.json``): all but :data:`RESUMABLE_CHANGES`
    of ``config`` (a ``TrainingConfig``), the ``sources`` (``training.Sources``) and the data."""
    return {"objective": objective, "seed": seed,
            "recipe": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES},
            "sources": {k: str(v) if v is not None else None for k, v in asdict(sources).items()}, "data": data}


def _differences(old, new, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{where}{k}.")]
    return [] if old == new else [f"{where.rstrip('.')}: was {old!r}, now {new!r}"]


def check_resume(run_dir: Path, identity: dict, checkpoint: str | None) -> None:
    """Refuse to resume ``checkpoint`` under another recipe, models or data than the run started with; record the
    identity when the run starts (or, for a run made before identities were kept, when it first resumes)."""
    path = Path(run_dir) / "identity.json"
    recorded = read_json(path) if path.is_file() and checkpoint else None
    if recorded is not None and (changes := _differences(recorded, json.loads(json.dumps(identity, default=str)))):
        raise ValueError(
            f"{run_dir} was started under another recipe or data than this resume asks for:\n  "
            + "\n  ".join(changes)
            + "\nResume with the recorded settings, train into another run folder, or start this one over "
              "(resume=False; --no-resume / --retrain on the command line).")
    if recorded is None:
        write_json(path, identity)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` (a Trainer checkpoint folder) cannot be resumed from, or None when it is complete: its state
    reads as JSON, its weights' safetensors headers match their sizes, its torch files are whole zip archives."""
    import zipfile

    path = Path(path)
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({type(e).__name__})"
    if (path / "pytorch_model_fsdp_0").is_dir():  # FSDP SHARDED_STATE_DICT: torch.distributed.checkpoint folders,
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # whose .metadata is written once every shard is
            if not (path / part / ".metadata").is_file():
                return f"{part}/.metadata missing"
        return None if (path / "scheduler.pt").is_file() else "scheduler.pt missing"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    for file in weights:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{file.name} truncated"
            size = int.from_bytes(head, "little")
            try:
                header = json.loads(f.read(size))
            except ValueError:
                return f"{file.name} has a broken header"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if file.stat().st_size != 8 + size + end:
            return f"{file.name} truncated ({file.stat().st_size} of {8 + size + end} bytes)"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            return f"{name} missing"
        try:
            with zipfile.ZipFile(path / name) as z:
                if z.testzip() is not None:
                    return f"{name} corrupt"
        except zipfile.BadZipFile:
            return f"{name} truncated"
    return None


def resumable_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint in ``output_dir``; incomplete ones (a save cut short) are renamed aside
    (``incomplete-checkpoint-N``) with a log line, so they neither block the resume nor get deleted."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = sorted((p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        aside = path.with_name(f"incomplete-{path.name}")  # outside the Trainer's checkpoint-* rotation
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        log.warning("checkpoint %s is incomplete (%s): set aside as %s; resuming from an earlier one", path, problem,
                    aside.name)
    return None


class RunLock:
    """One training per run folder: ``run_dir/.lock`` names the holder (host, pid, start time). A second training
    of the same folder is refused; a lock whose process is gone (same host) is taken over with a log line."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"

    def __enter__(self):
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = None
                if not isinstance(holder, dict) or not holder.get("pid"):
                    # Empty or garbled: the holder was killed between creating the lock and writing it (or is writing
                    # it this instant). Who holds it cannot be told, so it is not taken over.
                    raise RuntimeError(
                        f"{self.path} names no holder (empty or not a JSON object with a pid): left by a training "
                        f"killed while it took the lock? If no training of {self.path.parent} is running, delete "
                        f"{self.path} and start again"
                    ) from None
                if holder.get("host") == me["host"] and not process_alive(holder.get("pid")):
                    log.warning("taking over %s: its holder (pid %s) is gone", self.path, holder.get("pid"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise RuntimeError(
                    f"{self.path.parent} is being trained by pid {holder.get('pid')} on {holder.get('host')} (since "
                    f"{holder.get('started')}); wait for it to finish, or delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
