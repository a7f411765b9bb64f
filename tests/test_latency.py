"""The latency profiler: real-size shapes, statistics, a small end-to-end sweep on CPU, and rendering a results
JSON (as a committed GPU one would be). The byte counts and the speculative model are tested in test_cost."""

import json
import random
import subprocess
import sys

import pytest
import torch

from benchmarks import latency_targets
from overfill_lib import cost, latency, plots
from overfill_lib.artifacts import PROJECT_ROOT
from overfill_lib.pruning import count_parameters
from tests.tiny_models import tiny_model


def test_real_size_shapes_are_the_papers():
    pairs = latency.real_size_pairs()
    f3, d3 = pairs["llama-3.2-3b"]
    f8, d8 = pairs["llama-3.1-8b"]
    assert 3.1e9 < count_parameters(f3) < 3.3e9 and 1.1e9 < count_parameters(d3) < 1.35e9  # "3B -> 1B"
    assert 7.9e9 < count_parameters(f8) < 8.1e9 and 3.1e9 < count_parameters(d8) < 3.3e9  # "8B -> 3B" (3.2B)
    assert (d8.hidden_size, d8.intermediate_size) == (2432, 7680)
    # 45% removed, rounded to a multiple of lcm(round_to=8, 24 heads) = 24 (LlamaConfig needs hidden % heads == 0).
    assert d3.hidden_size % 24 == 0 and abs(d3.hidden_size - 0.55 * 3072) <= 12
    assert cost.kv_bytes_per_token(f3, 2) == 2 * 28 * 8 * 128 * 2  # ~115 KB per token of context


def test_summarize_matches_torch_quantiles():
    values = [random.Random(1).random() for _ in range(7)]
    s = latency.summarize(values)
    t = torch.tensor(values, dtype=torch.float64)
    for key, q in (("median", 0.5), ("p10", 0.1), ("p90", 0.9)):
        assert s[key] == pytest.approx(float(torch.quantile(t, q)))
    with pytest.raises(ValueError):
        latency.summarize([])


def test_settings_validate_and_merge_points():
    with pytest.raises(ValueError, match="latency: unknown keys.*valid keys"):
        latency.LatencySettings.from_dict({"output_length": [8]})
    with pytest.raises(ValueError, match="positive ints"):
        latency.LatencySettings.from_dict({"batch_sizes": [0]})
    with pytest.raises(ValueError, match="compile='yes'"):
        latency.LatencySettings.from_dict({"compile": "yes"})
    assert latency.LatencySettings.from_dict({"compile": False}).compile is False
    s = latency.LatencySettings.from_dict({"output_lengths": [8, 16], "prompt_lengths": [4, 8], "batch_sizes": [1, 2],
                                           "base_prompt": 8, "base_new_tokens": 16})
    points = {(p["batch"], p["prompt"], p["new_tokens"]): p["sweeps"] for p in s.points()}
    assert points[(1, 8, 16)] == ["output", "prompt", "batch", "base"]  # the shared base point is timed once
    assert len(points) == 4


def test_copy_bandwidth_on_cpu():
    bw = latency.copy_bandwidth("cpu", 4 << 20, warmup=1, repeats=3)
    assert bw["bytes_moved"] == 2 * (4 << 20) and bw["bytes_per_s"] > 0


def test_acceptance_rate_by_teacher_forcing():
    target = tiny_model("llama", seed=0)
    ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(0))
    same = latency.acceptance_rate(target, target, ids, max_new_tokens=8)
    assert same["alpha"] == 1.0 and same["target_agreement"] == 1.0 and same["positions"] > 0
    other = latency.acceptance_rate(target, tiny_model("llama", seed=5), ids, max_new_tokens=8)
    assert other["alpha"] < 1.0 and other["target_agreement"] == 1.0


SMALL = dict(output_lengths=[4, 8], prompt_lengths=[6, 12], batch_sizes=[1, 3], base_prompt=6, base_new_tokens=8,
             warmup=1, repeats=2, draft_token_grid=[1, 2], draft_tokens=2, eager_new_tokens=4,
             acceptance_grid=[0.5, 0.9], roofline_contexts=[16, 64], compile=False)  # compiled: test_fast_decode


@pytest.fixture(scope="module")
def suite_results(tmp_path_factory):
    """A small CPU run on tiny random models: the fixture stands in for a committed GPU JSON."""
    out = tmp_path_factory.mktemp("latency") / "synthetic-gpu.json"
    full = tiny_model("llama", seed=0)
    decoder = tiny_model("llama", seed=1, hidden_size=32, intermediate_size=40)
    spec = latency.PairSpec("tiny-test", lambda: (full, decoder), weights="trained",
                            alpha={"alpha": 0.7, "positions": 10})
    settings = latency.LatencySettings.from_dict(SMALL)
    results = latency.run_suite([spec], settings, device="cpu", label="test fixture", out=out, progress=False)
    return out, results


def test_suite_records_every_point_with_its_path(suite_results):
    out, results = suite_results
    loaded = latency.load_results(out)
    assert loaded["records"] == json.loads(json.dumps(results["records"]))  # written atomically, complete
    assert loaded["pairs"]["tiny-test"]["decoder_weights"] == "float"  # int8 when a preset's decoder.weights says
    env = loaded["environment"]
    assert env["torch"] == torch.__version__ and "transformers" in env and env["device"] == "cpu"
    fast = [r for r in loaded["records"] if r["path"] == "fast-static-eager"]
    assert {r["method"] for r in fast} == {"full", "decoder", "overfill", "speculative"}
    assert all(r["status"] == "ok" and r["path"] for r in loaded["records"])
    assert {r["path"] for r in loaded["records"]} >= {"fast-static-eager", "hf-generate-eager", "pair-generate-eager",
                                                     "hf-assisted"}
    for r in fast:
        assert r["ttft_s"]["p10"] <= r["ttft_s"]["median"] <= r["ttft_s"]["p90"]
        if r["method"] != "speculative":
            step = r["bytes_per_step"]
            assert step["total"] == step["weights"] + step["kv_read"] + step["kv_write"]
            assert r["bandwidth_fraction"] == pytest.approx(
                step["total"] / r["per_token_s"]["median"] / loaded["copy_bandwidth"]["bytes_per_s"])
    # The speculative model is built from measured draft/verify costs, at every modelled acceptance rate.
    rows = loaded["speculative_model"]
    assert rows and {r["alpha"] for r in rows} == {0.5, 0.7, 0.9} and all(r["path"] == "modelled" for r in rows)
    assert set(latency_targets.report(loaded, "tiny-test")) == set(latency_targets.TARGETS)


def test_out_of_memory_point_is_recorded_and_the_sweep_goes_on(monkeypatch, tmp_path):
    real = latency.measure_fast

    def flaky(gen, method, **kw):
        if kw["batch"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(gen, method, **kw)

    monkeypatch.setattr(latency, "measure_fast", flaky)
    full, decoder = tiny_model("llama", seed=0), tiny_model("llama", seed=1, hidden_size=32, intermediate_size=40)
    settings = latency.LatencySettings.from_dict({**SMALL, "methods": ["overfill"], "eager_baselines": False,
                                                  "output_lengths": [8], "prompt_lengths": [6]})
    res = latency.run_suite([latency.PairSpec("p", lambda: (full, decoder))], settings, device="cpu", progress=False)
    status = {r["batch"]: r["status"] for r in res["records"]}
    assert status == {1: "ok", 3: "oom"}
    assert "out of memory" in next(r for r in res["records"] if r["batch"] == 3)["error"]


def test_gpu_results_render(suite_results, tmp_path):
    out, _ = suite_results
    # A committed GPU file would sit in results/gpu/; a copy in a tmp dir stands in for it.
    gpu_dir = tmp_path / "gpu"
    gpu_dir.mkdir()
    data = json.loads(out.read_text())
    data["environment"] |= {"device": "cuda", "device_name": "synthetic fixture"}
    (gpu_dir / "fixture.json").write_text(json.dumps(data))
    (gpu_dir / "notes.json").write_text("{}")  # not a results file: skipped
    found = latency.find_results(gpu_dir)
    assert [p.name for p in found] == ["fixture.json"]
    figs = plots.latency_figures(latency.load_results(found[0]))
    assert set(figs) == {"latency_vs_output_length", "ttft_vs_prompt_length", "measured_vs_roofline",
                         "throughput_vs_batch", "overfill_vs_speculative"}
    for name, fig in figs.items():
        assert fig.data, f"{name} has no traces"
        assert any(len(t.x or ()) for t in fig.data), f"{name} has no points"
    assert "synthetic fixture" in figs["latency_vs_output_length"].layout.title.text
    with pytest.raises(ValueError, match="not an OverFill latency results file"):
        latency.load_results(gpu_dir / "notes.json")


def test_module_runs_with_only_torch_and_transformers():
    # Plotting, dataframes and lm-eval must not be needed by `python -m overfill_lib.latency`.
    code = (
        "import sys\n"
        "for m in ('plotly', 'pandas', 'lm_eval', 'ipywidgets', 'papermill'): sys.modules[m] = None\n"
        "import runpy; sys.argv = ['latency', '--help']\n"
        "runpy.run_module('overfill_lib.latency', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "--suite" in proc.stdout and "--device" in proc.stdout



@pytest.mark.parametrize("budget", ["nan", "inf", "-1"])
def test_headline_refuses_a_budget_it_cannot_enforce(budget, capsys):
    """NaN compares false with everything: ``--budget nan`` skipped no point, however long the run."""
    from overfill_lib import headline

    with pytest.raises(SystemExit):
        headline.main(["--budget", budget, "--dry-run"])
    assert f"--budget {float(budget)}: the budget must be a finite number of seconds >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="finite number of seconds"):
        headline.run(budget_s=float(budget), dry_run=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_headline_on_cuda_without_cuda_says_what_to_run_instead(capsys):
    """torch's own error was ``AssertionError: Torch not compiled with CUDA enabled``."""
    from overfill_lib import headline

    with pytest.raises(ValueError, match=r"--device cuda: this torch .*(built without CUDA|sees no GPU).*--device cpu "
                                         r"--suite tiny"):
        headline.run(device="cuda", suite="tiny", points=[headline.Point("copy", "device copy bandwidth")])
    with pytest.raises(SystemExit):
        headline.main(["--device", "cuda", "--suite", "tiny"])
    assert "--device cuda: this torch" in capsys.readouterr().err
    assert headline.run(device="cuda", dry_run=True)["plan"]  # the plan needs no GPU

def test_headline_plan_fits_its_budget_and_a_cut_run_keeps_what_it_measured(tmp_path):
    """The GPU headline benchmark: the dry run lists the plan in the issue's order with estimates inside the
    budget; on a CPU the tiny suite runs the same plan, writes the JSON after every point, and skips the points a
    short budget cannot fit instead of overrunning it."""
    from overfill_lib import headline

    dry = headline.run(dry_run=True)
    kinds = [(p["kind"], p["pair"], p["method"], p["batch"], p["new_tokens"]) for p in dry["plan"]]
    assert kinds[0][0] == "copy" and kinds[1] == ("fast", "llama-3.2-3b", "overfill", 1, 128)
    assert kinds[-1][1] == "llama-3.1-8b" and not dry["records"]
    # Everything but the larger pair (run if time is left) fits the default budget by the estimates.
    small = sum(p["estimate_s"] for p in dry["plan"] if p["pair"] != "llama-3.1-8b")
    assert small <= dry["budget_s"] == 330
    out = tmp_path / "headline.json"
    points = [p for p in headline.plan() if p.new_tokens <= 128 and p.batch <= 4][:6]
    cut = headline.run(device="cpu", suite="tiny", out=out, points=points, budget_s=30)
    saved = json.loads(out.read_text())
    assert [r["status"] for r in saved["records"]] == [r["status"] for r in cut["records"]]
    assert saved["copy_bandwidth"]["bytes_per_s"] > 0
    measured = [r for r in saved["records"] if r["status"] == "ok" and r["kind"] == "fast"]
    assert measured and all(r["per_token_s"]["median"] > 0 for r in measured)
    squeezed = headline.run(device="cpu", suite="tiny", points=points, budget_s=0)
    assert {r["status"] for r in squeezed["records"]} == {"skipped"}
    # Notebook 03's table and figure of a headline file: a row per point that is not the copy, measured or not.
    assert headline.is_headline(saved) and not headline.is_headline({"records": [], "pairs": {}})
    table = headline.rows(saved)
    assert [r["status"] for r in table] == [r["status"] for r in saved["records"] if r["kind"] != "copy"]
    assert all(r["ms per token"] > 0 for r in table if r["status"] == "ok")
    assert sum(len(t.x) for t in plots.headline_figure(saved).data) == sum(
        r["status"] == "ok" and r["kind"] == "fast" and r["batch"] == 1 and r["new tokens"] == headline.NEW_TOKENS
        for r in table)


def test_every_committed_gpu_result_renders():
    """Notebook 03 draws every latency-format file in results/gpu/: the headline's through its own table and
    figure, run_suite's through the latency figures."""
    from overfill_lib import headline

    found = latency.find_results(PROJECT_ROOT / "results" / "gpu")
    for path in found:
        res = latency.load_results(path)
        if headline.is_headline(res):
            assert headline.rows(res) and plots.headline_figure(res).data, path
        else:
            assert all(fig.data for fig in plots.latency_figures(res).values()), path


def test_headline_records_a_broken_point_and_goes_on(tmp_path, monkeypatch, capsys):
    """A GPU slot is short and paid for: one point that raises (not out of memory) is recorded as an error with its
    message, the points after it still run, and the command exits non-zero so the failure is not missed."""
    from overfill_lib import headline, latency

    def broken(device):
        raise RuntimeError("copy kernel missing\nsecond line")

    monkeypatch.setattr(latency, "copy_bandwidth", broken)
    points = [headline.Point("copy", "device copy bandwidth"),
              headline.Point("fast", "decode", "llama-3.2-3b", "decoder", 1, 4)]
    out = tmp_path / "h.json"
    res = headline.run(device="cpu", suite="tiny", out=out, points=points, budget_s=60)
    assert [r["status"] for r in res["records"]] == ["error", "ok"]
    assert res["records"][0]["error"] == "RuntimeError: copy kernel missing"
    assert json.loads(out.read_text())["records"][0]["status"] == "error"
    monkeypatch.setattr(headline, "plan", lambda pairs: points)
    assert headline.main(["--device", "cpu", "--suite", "tiny", "--budget", "60"]) == 1
    assert "1 point(s) failed: RuntimeError: copy kernel missing" in capsys.readouterr().out


def test_headline_pairs_option_gives_the_larger_pair_a_slot_of_its_own():
    from overfill_lib import headline

    larger = headline.run(dry_run=True, pairs=("llama-3.1-8b",))["plan"]
    assert {p["pair"] for p in larger if p["kind"] != "copy"} == {"llama-3.1-8b"}
    assert [p["kind"] for p in larger][:2] == ["copy", "fast"] and max(p["batch"] for p in larger) == 64
    with pytest.raises(SystemExit):
        headline.main(["--dry-run", "--pairs", "llama-70b"])
