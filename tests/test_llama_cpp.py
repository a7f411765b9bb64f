"""llama.cpp as an optional peer: found or not, its files made and reused, llama-bench's JSON read, rows compared.

The binaries are stand-ins written here (shell scripts): the real ones are never needed by the tests."""

import json
import stat

import pytest

from overfill_lib import llama_cpp
from overfill_lib.artifacts import sha256_of
from overfill_lib.gguf_models import GGUFSource
from tests.gguf_files import bpe_tokenizer, write_llama_gguf
from tests.tiny_models import tiny_model


def _script(path, body: str):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def tools(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "quantize_calls"
    # llama-quantize [--allow-requantize] IN OUT TYPE: a copy stands in for the requantized file
    _script(bin_dir / "llama-quantize", f'echo "$@" >> {calls}\ncp "$2" "$3"\n')
    row = {"build_commit": "abc", "build_number": 1, "cpu_info": "test cpu", "n_gen": 4, "n_depth": 7,
           "type_k": "f16", "samples_ns": [8_000_000, 12_000_000]}
    _script(bin_dir / "llama-bench", f"echo '{json.dumps([row])}'\n")
    return llama_cpp.find_tools(bin_dir), calls


def test_missing_binaries_are_none_and_the_message_names_the_build_script(tmp_path):
    assert llama_cpp.find_tools(tmp_path) is None
    (tmp_path / "llama-bench").write_text("")  # present but not executable, and no llama-quantize
    assert llama_cpp.find_tools(tmp_path) is None
    assert llama_cpp.BUILD_SCRIPT in llama_cpp.missing_message(tmp_path)


def test_ggufs_are_made_once_with_digests_and_tensor_bytes(tmp_path, tools):
    tools, calls = tools
    tok = bpe_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), tied=True)
    out = tmp_path / "ggufs"
    out.mkdir()
    original = write_llama_gguf(model, tok, out / "tiny.gguf")
    source = GGUFSource(package="pkg", version="1", file="pkg/tiny.gguf", sha256=sha256_of(original))
    files = llama_cpp.prepare_ggufs(source, out, tools, ["F32", "Q8_0"])
    assert files["F32"]["file"] == "tiny.gguf" and files["F32"]["made_by"] == "the file itself"  # the file is F32
    assert files["Q8_0"]["file"] == "tiny.requant-Q8_0.gguf" and "--allow-requantize" in files["Q8_0"]["made_by"]
    assert files["Q8_0"]["sha256"] == sha256_of(out / "tiny.requant-Q8_0.gguf")
    params = sum(p.numel() for p in model.parameters())
    # tied: the embedding table is the head and is read whole; the norms are F32 too
    assert files["F32"]["weight_bytes_per_step"] == files["F32"]["tensor_bytes"] == 4 * params
    assert calls.read_text().count(" Q8_0\n") == 1
    again = llama_cpp.prepare_ggufs(source, out, tools, ["Q8_0"])
    assert again["Q8_0"]["sha256"] == files["Q8_0"]["sha256"] and calls.read_text().count(" Q8_0\n") == 1  # reused
    (out / "tiny.requant-Q8_0.gguf").write_bytes(b"changed")
    llama_cpp.prepare_ggufs(source, out, tools, ["Q8_0"])
    assert calls.read_text().count(" Q8_0\n") == 2  # a file that is not the one recorded is made again
    with pytest.raises(ValueError, match="Q3"):
        llama_cpp.prepare_ggufs(source, out, tools, ["Q3"])


def test_bench_reads_seconds_per_token_and_names_a_failure(tmp_path, tools):
    tools, _ = tools
    run = llama_cpp.bench(tools, tmp_path / "m.gguf", new_tokens=4, depth=7, threads=2)
    assert run["samples_s_per_token"] == pytest.approx([0.002, 0.003])
    assert run["llama_bench"]["cpu_info"] == "test cpu" and "-d 7" in run["command"]
    _script(tools.bench, "echo 'no such model' >&2\nexit 3\n")
    with pytest.raises(RuntimeError, match="exit 3.*no such model"):
        llama_cpp.bench(tools, tmp_path / "m.gguf", new_tokens=4, depth=7, threads=2)
    with pytest.raises(RuntimeError, match="JSON"):
        llama_cpp.parse_bench_json("| model | size |")


def test_rounds_and_comparison_rows():
    assert llama_cpp.rounds_for(["F32", "BF16", "Q8_0", "Q4_1"], ["float32", "int8"]) == {
        "float32": ["F32", "BF16"], "int8": ["Q8_0", "Q4_1"]}
    assert llama_cpp.rounds_for(["Q8_0"], ["float32"]) == {"float32": ["Q8_0"]}

    def method(ms, step):
        return {"step_bytes": step, "compiled": {"ms_per_token": ms}}

    results = {"presets": {"p": {
        "dtypes": {"float32": {"methods": {"full": method(40.0, 4e8), "overfill": method(10.0, 1e8)}}},
        "llama_cpp": {"timings": {"F32": {"ms_per_token": 20.0, "step_bytes": 4e8},
                                  "Q4_1": {"ms_per_token": 5.0, "step_bytes": 1e8}}}}}}
    rows = {(r["precision"], r["engine"], r["model"]): r for r in llama_cpp.comparison_rows(results)}
    assert rows["F32 / float32", "workbook (compiled)", "full"]["llama.cpp full / this"] == 0.5
    assert rows["F32 / float32", "workbook (compiled)", "overfill"]["llama.cpp full / this"] == 2.0
    assert rows["F32 / float32", "llama.cpp", "full"]["GB/s"] == 20.0
    assert ("Q4_1 / -", "llama.cpp", "full") in rows and len(rows) == 4


def test_batched_bench_reads_throughput_per_batch_and_is_none_without_the_tool(tmp_path):
    assert llama_cpp.batched_bench(tmp_path, tmp_path / "m.gguf", prompt=8, new_tokens=4, batches=[1, 4],
                                   threads=2) is None
    rows = [{"n_kv_max": 64, "pp": 8, "tg": 4, "pl": pl, "n_kv": pl * 12, "t_pp": 0.1 * pl, "speed_pp": 80.0,
             "t_tg": 0.02 * pl, "speed_tg": pl * 4 / (0.02 * pl), "t": 0.1, "speed": 1.0} for pl in (1, 4)]
    # the tool's log goes to stderr and its rows to stdout; both are read
    body = "echo 'main: n_kv_max = 64' >&2\n" + "".join(f"echo '{json.dumps(r)}'\n" for r in rows)
    _script(tmp_path / "llama-batched-bench", body)
    out = llama_cpp.batched_bench(tmp_path, tmp_path / "m.gguf", prompt=8, new_tokens=4, batches=[1, 4], threads=2)
    assert out[4]["tokens_per_s"] == pytest.approx(200.0) and out[4]["ms_per_step"] == pytest.approx(20.0)
    assert "-npl 1,4" in out[1]["command"] and "--output-format jsonl" in out[1]["command"]
    with pytest.raises(RuntimeError, match=r"no row for batch\(es\) \[16\]"):
        llama_cpp.batched_bench(tmp_path, tmp_path / "m.gguf", prompt=8, new_tokens=4, batches=[1, 16], threads=2)


def _batched_results():
    """A cpu_decode results JSON as ``--batch 1 4`` writes it: fp32 batch 1 under ``dtypes`` (one written before
    tokens_per_s was recorded), batch 4 under ``batched``, llama.cpp's F32 and Q8_0 under ``llama_cpp_batched``."""
    def methods(batch, ms, with_rate=True):  # the full model's step takes twice the decoder's
        timed = {m: {"ms_per_token": ms * f} for m, f in (("full", 2.0), ("decoder", 1.0), ("overfill", 1.0))}
        for t in timed.values():
            t |= {"tokens_per_s": 1e3 * batch / t["ms_per_token"]} if with_rate else {}
        return {"batch": batch, "methods": {m: {"compiled": t} for m, t in timed.items()}}

    return {"threads": 2, "environment": {"device_name": "cpu"}, "presets": {"p": {
        "dtypes": {"float32": methods(1, 10.0, with_rate=False), "int8": methods(1, 5.0)},
        "batched": {"float32": {"4": methods(4, 20.0)}},
        "llama_cpp_batched": {"F32": {"1": {"tokens_per_s": 50.0, "ms_per_step": 20.0},
                                      "4": {"tokens_per_s": 100.0, "ms_per_step": 40.0}},
                              "Q8_0": {"1": {"tokens_per_s": 80.0, "ms_per_step": 12.5}}}}}}


def test_batched_rows_and_figure_put_both_engines_against_the_batch_size():
    from overfill_lib import plots

    results = _batched_results()
    rows = {(r["precision"], r["engine"], r["model"], r["batch"]): r for r in llama_cpp.batched_rows(results)}
    # The workbook at batch 1 (from dtypes, its rate from the ms per step) and 4 (from batched), fp32 only: int8 has
    # no batched run here; llama.cpp at each batch and precision it ran.
    assert set(rows) == {("F32 / float32", e, m, b) for e, m in (("workbook (compiled)", "full"),
                                                                 ("workbook (compiled)", "decoder"),
                                                                 ("workbook (compiled)", "overfill"),
                                                                 ("llama.cpp", "full")) for b in (1, 4)} | {
        ("Q8_0 / int8", "llama.cpp", "full", 1)}
    assert rows["F32 / float32", "workbook (compiled)", "full", 1]["tokens per s"] == 50.0
    assert rows["F32 / float32", "workbook (compiled)", "full", 1]["this / llama.cpp full"] == 1.0
    decoder4 = rows["F32 / float32", "workbook (compiled)", "decoder", 4]
    assert (decoder4["tokens per s"], decoder4["ms per step"], decoder4["this / llama.cpp full"]) == (200.0, 20.0, 2.0)
    assert rows["F32 / float32", "llama.cpp", "full", 4]["this / llama.cpp full"] == 1.0
    fig = plots.cpu_batched_figure(results)
    traces = {t.name: t for t in fig.data}
    assert len(traces) == 5 and traces["llama.cpp: full · F32 / float32"].line.dash == "dash"
    overfill = traces["workbook (compiled): overfill · F32 / float32"]
    assert list(overfill.x) == [1, 4] and list(overfill.y) == [100.0, 200.0] and overfill.line.dash == "solid"
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    # A run at batch 1 only has nothing to draw: the notebook says how to get batched numbers instead.
    del results["presets"]["p"]["batched"], results["presets"]["p"]["llama_cpp_batched"]
    assert llama_cpp.batched_rows(results) == []
