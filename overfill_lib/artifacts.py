"""Where artifacts live and how they are written and read: the project root, atomic writes, JSON, model
directories (local or in the hub cache), and the provenance every saved result carries."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def in_batch() -> bool:
    """True when a notebook runs under papermill (``make run``/tests) rather than interactively."""
    return os.environ.get("OVERFILL_BATCH") == "1" or "PAPERMILL_INPUT_PATH" in os.environ


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared results unreadable to others
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path):
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): written partly "
                         "or edited by hand? Restore it, or delete it (and what it describes) to have it made again") from e
    except UnicodeDecodeError as e:  # a binary file (weights, an archive) where JSON was expected
        raise ValueError(f"{path} is not a JSON text file (byte {e.start} is not UTF-8): another file copied over it? "
                         "Restore it, or delete it (and what it describes) to have it made again") from e


class _PlainLoader(yaml.SafeLoader):
    """YAML's safe subset without anchors and aliases. An alias is a reference, so a few hundred bytes of nested
    aliases expand to gigabytes once a preset is copied or fingerprinted (a "billion laughs"); presets and
    notebook parameters have no need of them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ValueError(f"{self.name}, line {event.start_mark.line + 1}: YAML alias *{event.anchor} refused "
                             "(presets and parameters take no anchors or aliases): write the value out in full")
        return super().compose_node(parent, index)


def read_yaml(text: str, where: str):
    """``text`` as YAML (the safe subset, no aliases); ``where`` (a file, an option) names it in errors."""
    loader = _PlainLoader(text)
    loader.name = where
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {e}") from None
    finally:
        loader.dispose()


def read_mapping(text: str, where: str, what: str = "a mapping") -> dict:
    """YAML that must be a mapping (empty text: ``{}``), e.g. a preset file or a papermill parameters file."""
    data = read_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be {what}, got {type(data).__name__} {short_repr(data)}")
    return data


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def sha256_of(path: str | Path) -> str:
    """The full sha256 hex digest of a file, read in 1 MiB blocks (a weights file need not fit in memory twice)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Every model directory written through atomic_directory records its weight files' sha256 here, and load_causal_lm
# checks them: safetensors has no checksum of its own, so a flipped bit in a weight would load silently. Costs about
# 1 s per GB on each save and each load (sha256 ran at ~1 GB/s on one core of this project's machine).
WEIGHT_DIGESTS = "weights_sha256.json"


def record_weight_digests(directory: str | Path) -> dict[str, str]:
    """Write ``WEIGHT_DIGESTS`` in ``directory``: the sha256 of each of its ``*.safetensors`` files."""
    directory = Path(directory)
    digests = {p.name: sha256_of(p) for p in sorted(directory.glob("*.safetensors"))}
    if digests:
        write_json(directory / WEIGHT_DIGESTS, {"algorithm": "sha256", "files": digests})
    return digests


def verify_weight_digests(directory: str | Path) -> None:
    """Refuse a weight file whose sha256 differs from the one recorded when ``directory`` was saved; a directory
    without a record (saved before records were kept, or by another tool) is not checked."""
    directory = Path(directory)
    path = directory / WEIGHT_DIGESTS
    if not path.is_file():
        return
    record = read_json(path)
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{path} is not a weights digest record (no 'files' mapping): restore it, or delete it to "
                         "load the weights unchecked")
    for name, want in files.items():
        weights = directory / name
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing, but {path} lists it: the folder was copied in part. "
                                    "Restore the file, or delete the folder to have it made again")
        got = sha256_of(weights)
        if got != want:
            raise ValueError(f"{weights} has sha256 {got}, not the {want} recorded in {path} when it was saved: the "
                             "file was damaged or changed since (disk error, partial copy, edited in place). Restore "
                             "it, or delete the folder to have it made again")


def check_loading_info(info: dict, role: str, path, model_class: str) -> None:
    """Refuse a load that left weights unset or unused (transformers only logs them, and fills the unset ones with a
    random init): the error names the keys."""
    bad = {k: sorted(str(x) for x in info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad["error_msgs"] = [str(m) for m in info.get("error_msgs") or ()]
    if not any(bad.values()):
        return
    said = "; ".join(f"{k.replace('_', ' ')} ({len(v)}): {', '.join(v[:6])}{', ...' if len(v) > 6 else ''}"
                     for k, v in bad.items() if v)
    hint = ("The folder holds int8 weights (overfill_lib.quantize) but its config.json does not say so: quantize and "
            "save the float model again with this version" if any(k.endswith(".qweight") for k in bad["unexpected_keys"])
            else "It was saved from another architecture or config, or edited: save it again, or restore its files")
    raise ValueError(f"the {role} in {path} does not fit {model_class}: {said}. Loading it would leave weights at "
                     f"random values. {hint}")


def load_causal_lm(path: str | Path, role: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)``; a file it cannot read (a truncated safetensors
    shard, a broken config), a weight file whose recorded sha256 differs, and weights left unset or unused by the load
    are errors naming the ``role`` (full model, decoder, ...) and the folder. A model saved after
    ``quantize.quantize_int8`` loads back with its int8 layers."""
    from transformers import AutoModelForCausalLM

    from overfill_lib import quantize

    local = Path(path).is_dir()
    if local:
        verify_weight_digests(path)
    try:
        if local and quantize.saved_quantization(path) is not None:
            model, info = quantize.load_int8(path, **kwargs)  # transformers would load it as a float model
        else:
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # safetensors, json and torch raise their own types for a damaged file
        if not local:
            raise
        raise ValueError(f"could not load the {role} from {path} ({type(e).__name__}: {e}). A file there is "
                         "incomplete or damaged (an interrupted write?): restore it, or delete the folder to have it "
                         "made again") from e
    check_loading_info(info, role, path, type(model).__name__)
    return model


def load_model(path: str | Path, dtype=None, role: str = "model"):
    """A saved causal LM (full model, decoder or smaller model) in eval mode, and its tokenizer; ``dtype`` default fp32."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no {role} at {path} (no config.json); the full model of a local preset is trained by "
                                "notebook 00_full_model, pruned decoders by notebooks 01-02 (overfill_lib.pipeline)")
    model = load_causal_lm(path, role, dtype=dtype or "float32")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def process_alive(pid) -> bool:
    """Whether a process with this id runs on this machine (the holder of a lock or a temporary folder)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(path: Path) -> None:
    """What an interrupted :func:`atomic_directory` left beside ``path``: the previous version when the crash came
    between the fallback's two renames (restored if ``path`` is missing), and temporary folders of dead writers."""
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.split("-")[1] if tmp.name.count("-") >= 2 else ""
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one step.

    Checkpoints and model directories are written through this, so an interrupted save leaves the previous
    directory (or nothing) rather than a half-written one. The swap is atomic where the kernel can exchange two
    paths (Linux); elsewhere a crash between two renames leaves ``.<name>.old``, restored on the next write.
    Temporary folders left by dead writers are removed. A model directory (one with a ``config.json``) gets a
    record of its weight files' sha256 (``WEIGHT_DIGESTS``). A ``path`` that is a file is refused.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        # The swap below would set the file aside as a hidden temporary and put the folder in its place, silently.
        raise FileExistsError(f"{path} is a file, not a folder: a directory (a saved model, results) cannot be "
                              "written there. Move or delete that file, or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide saved models from other users
    try:
        yield tmp
        if (tmp / "config.json").is_file():
            record_weight_digests(tmp)  # a model directory: load_causal_lm checks its weights against this record
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
        else:
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_record(device: str | None = None, seed: int | None = None) -> dict:
    """Versions, device and seed, stored beside every result so it can be reproduced."""
    import torch
    import transformers

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") and torch.cuda.is_available() else _cpu_name()
    return {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git_commit(),
        "seed": seed,
    }


def content_sha256(data: bytes) -> str:
    """The first 16 hex digits of ``data``'s sha256: how the suite's splits and training data files are identified."""
    return hashlib.sha256(data).hexdigest()[:16]


def weights_fingerprint(model, entries: int = 65536) -> str:
    """A cheap digest of a model's weights: every parameter's name, shape and the sum of up to ``entries``
    evenly spaced values (a strided view, so no copy of a large matrix). Changes when the model is retrained."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // entries)]
            h.update(f"{name}{tuple(param.shape)}{sample.double().sum().item():.8e}".encode())
    return h.hexdigest()[:16]


def resolve_model(model_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local directory for ``model_id``: the path itself, the project-relative path, or the hub cache.

    Offline (``HF_HUB_OFFLINE=1``) and not cached, this raises at once with how to provide the
    model locally, rather than waiting on the network.
    """
    for candidate in (Path(model_id), PROJECT_ROOT / str(model_id)):
        if (candidate / "config.json").is_file():
            return candidate
    text = str(model_id)
    if text.startswith((".", "/")) or text.count("/") != 1:
        raise ValueError(
            f"model {text!r} is not a local model directory (no config.json) and does not look like a hub id "
            "('org/name'); train it with notebook 00_full_model or point the preset at an existing directory"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=True))
    except Exception:
        pass
    how = (
        f"download it where the hub is reachable (`hf download {text} --local-dir DIR`), copy DIR here, "
        f"and set the preset's model id to DIR (e.g. overrides={{'full_model': {{'id': 'DIR'}}}})"
    )
    if HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        raise RuntimeError(f"model {text!r} is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1): {how}")
    try:
        return Path(snapshot_download(text, revision=revision, etag_timeout=10))
    except Exception as e:  # network down, gated repo, missing repo: one clear message
        raise RuntimeError(f"could not fetch model {text!r} from the hub ({type(e).__name__}: {e}); {how}") from e
