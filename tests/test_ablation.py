"""The pruning-ratio ablation: its grid is validated, its readings (aggregation, Pareto frontier, method
comparison, size rule) are right on hand-made tables, and a run on the smoke preset trains, scores through
lm-eval, costs every point, caches everything and reuses it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from overfill_lib import ablation, presets

torch.set_num_threads(1)


def test_config_refuses_bad_grids_with_the_fix():
    with pytest.raises(ValueError, match=r"keep fractions must be numbers in \(0, 1\]"):
        ablation.AblationConfig.from_dict({"keep": [0.5, 1.5]})
    with pytest.raises(ValueError, match=r"keep fractions must be numbers in \(0, 1\]"):
        ablation.AblationConfig.from_dict({"full_models": {"smaller": {"keep": [0]}}})
    with pytest.raises(ValueError, match="ablation: unknown keys.*valid keys"):
        ablation.AblationConfig.from_dict({"widths": [0.5]})
    with pytest.raises(ValueError, match="unknown key.*valid keys: keep, seeds"):
        ablation.AblationConfig.from_dict({"full_models": {"smaller": {"ratio": [0.5]}}})
    with pytest.raises(ValueError, match="cannot be trained per width"):
        ablation.AblationConfig.from_dict({"objectives": ["overfill", "full"]})
    with pytest.raises(ValueError, match="cannot be trained per width"):
        ablation.AblationConfig.from_dict({"full_models": {"smaller": {"objectives": ["smaller"]}}})
    with pytest.raises(ValueError, match="retention"):
        ablation.AblationConfig.from_dict({"retention": 1.2})


def test_grid_points_and_run_count():
    cfg = ablation.AblationConfig.from_dict({"keep": [0.5, 0.75], "seeds": [0, 1], "scratch_keep": [0.5],
                                             "full_models": {"smaller": {"keep": [0.5], "seeds": [0]}}})
    assert [(p.full_model, p.keep, p.seeds, p.objectives) for p in cfg.points()] == [
        ("full_model", 0.5, (0, 1), ("overfill", "pruned", "scratch")),
        ("full_model", 0.75, (0, 1), ("overfill", "pruned")),
        ("smaller", 0.5, (0,), ("overfill", "pruned"))]
    assert cfg.runs() == 2 * 2 * 2 + 2 + 2  # objectives x widths x seeds, scratch at 0.5 x 2 seeds, the smaller model
    lean = ablation.AblationConfig.from_dict({"keep": [0.5], "full_models": {"smaller": {"keep": [0.25, 0.5], "objectives": ["overfill"]}}})
    assert lean.runs() == 2 + 2


def test_decoder_section_and_the_presets_own_width():
    p = presets.load_preset("smoke")
    assert ablation.decoder_section(p, 0.5) == dict(p["decoder"])  # notebook 02's decoder, hence its runs
    assert ablation.decoder_section(p, 0.85)["hidden"] == ablation.decoder_section(p, 0.85)["intermediate"] == 0.15
    for name in presets.available():  # every shipped grid parses
        ablation.AblationConfig.from_preset(presets.load_preset(name))


def test_task_scores_reads_lm_eval_results():
    results = {
        "results": {
            "overfill_suite": {"alias": "overfill_suite", "exact_match,none": 0.6, "exact_match_stderr,none": 0.01},
            "overfill_suite_add": {"alias": " - add", "exact_match,none": 0.2, "exact_match_stderr,none": 0.1},
            "overfill_suite_sort": {"alias": " - sort", "exact_match,none": 1.0, "exact_match_stderr,none": 0.0},
        },
        "groups": {"overfill_suite": {}},
    }
    assert ablation.task_scores(results) == {"add": 0.2, "sort": 1.0, "overall": 0.6}
    no_group = {"results": {"arc": {"acc,none": 0.5, "acc_stderr,none": 0.1}, "mmlu": {"acc,none": 0.7}}}
    assert ablation.task_scores(no_group) == pytest.approx({"arc": 0.5, "mmlu": 0.7, "overall": 0.6})


def _row(full_model, keep, method, seed, params, score, **extra):
    return {"full_model": full_model, "full_model_parameters": 1000 if full_model == "full_model" else 250, "keep": keep,
            "method": method, "seed": seed, "parameters": params, "decode_bytes": 4 * params,
            "per_token_ms": params / 1000, "per_token_ms_p10": 0.0, "per_token_ms_p90": 0.0,
            "a": score, "overall": score, **extra}


@pytest.fixture
def grid():
    rows = [_row("full_model", 1.0, ablation.FULL, None, 1000, 1.0)]
    for keep, params, overfill, pruned in ((0.25, 100, (0.50, 0.52), (0.30, 0.32)), (0.5, 300, (0.95, 0.97), (0.80, 0.99)),
                                           (0.75, 600, (0.99, 0.99), (0.97, 0.97))):
        for seed in (0, 1):
            rows.append(_row("full_model", keep, "OverFill", seed, params, overfill[seed]))
            rows.append(_row("full_model", keep, "pruned", seed, params, pruned[seed]))
    rows.append(_row("smaller", 1.0, ablation.FULL, None, 250, 0.8))
    for keep, params, score in ((0.25, 30, 0.3), (0.5, 80, 0.75), (0.75, 160, 0.79)):
        rows.append(_row("smaller", keep, "OverFill", 0, params, score))
    rows.append(_row("full_model", None, ablation.SMALLER, 0, 250, 0.7))
    rows.append(_row("full_model", None, ablation.SMALLER, 1, 250, 0.9))
    return rows


def test_aggregate_pareto_and_comparison(grid):
    table = ablation.aggregate(grid)
    assert ablation.score_columns(table) == ["a", "overall"]
    at = table[(table["full_model"] == "full_model") & (table["keep"] == 0.25) & (table["method"] == "OverFill")].iloc[0]
    assert at["seeds"] == 2 and at["overall"] == pytest.approx(0.51) and at["overall_std"] == pytest.approx(0.01414, abs=1e-4)
    small = table[table["method"] == ablation.SMALLER].iloc[0]
    assert math.isnan(small["keep"]) and small["overall"] == pytest.approx(0.8)

    front = table[ablation.pareto_front(table, "parameters", methods=["OverFill", "pruned", ablation.FULL])]
    # The smaller full model's decoders (30, 80, 160 params) are cheaper than any other, so they open the frontier.
    assert set(zip(front["full_model"], front["keep"], front["method"])) == {
        ("smaller", 0.25, "OverFill"), ("smaller", 0.5, "OverFill"), ("smaller", 0.75, "OverFill"),
        ("smaller", 1.0, ablation.FULL), ("full_model", 0.5, "OverFill"), ("full_model", 0.75, "OverFill"),
        ("full_model", 1.0, ablation.FULL)}

    cmp = ablation.compare_methods(table).set_index("keep")
    assert cmp.loc[0.25, "difference"] == pytest.approx(0.2) and cmp.loc[0.25, "beyond seed spread"]
    assert not cmp.loc[0.5, "beyond seed spread"]  # pruned's seeds disagree by far more than the gap
    text = ablation.conclusion(table)
    assert "ahead of the pruned baseline beyond the seed spread at 2 of 3 widths" in text
    assert "OverFill down to keep 50%" in text and "pruned down to keep 75%" in text


def test_one_seed_per_width_claims_no_spread(grid):
    """With one seed there is no spread: the comparison says so instead of calling every difference significant."""
    one = [r for r in grid if r["seed"] in (None, 0)]
    cmp = ablation.compare_methods(ablation.aggregate(one))
    assert cmp["beyond seed spread"].isna().all()
    text = ablation.conclusion(ablation.aggregate(one))
    assert "ahead of the pruned baseline at 3 of 3 widths, on one seed per width (no spread" in text
    assert "beyond the seed spread" not in text


def test_size_rule_reads_the_knees(grid):
    table = ablation.aggregate(grid)
    rule = ablation.size_rule(table, 0.9)
    assert rule["full_models"]["full_model"]["knee_keep"] == 0.5 and rule["full_models"]["smaller"]["knee_keep"] == 0.5
    assert rule["rule"] == "constant ratio"  # same keep, decoders of 300 vs 80 parameters
    strict = ablation.size_rule(table, 0.999)
    assert strict["rule"] is None and "never holds" in strict["statement"]
    alone = ablation.size_rule(table[table["full_model"] == "full_model"], 0.9)
    assert alone["rule"] is None and "one full model only" in alone["statement"]


def test_family_robustness(grid):
    robust = ablation.family_robustness(ablation.aggregate(grid), 0.9).set_index(["family", "method"])
    assert robust.loc[("overall", "OverFill"), "narrowest keep holding 90%"] == 0.5
    assert robust.loc[("overall", "pruned"), "retained at narrowest"] == pytest.approx(0.31)


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """Its own micro full model, smaller model and suite (built by the first grid that needs them): nothing shared with the
    notebook tests running beside it."""
    root = tmp_path_factory.mktemp("ablation_models")
    return {"suite_dir": str(root / "suite"), "full_model": {"id": str(root / "full_model")},
            "smaller": {"id": str(root / "smaller")}}


def test_smoke_grid_trains_scores_costs_and_reuses(tmp_path, own_models):
    p = presets.load_preset("smoke", {"workdir": str(tmp_path / "work"), **own_models})
    cfg = ablation.AblationConfig.from_dict({"keep": [0.5, 1.0], "seeds": [0], "full_models": {"smaller": {"keep": [0.5]}}})
    rows = ablation.run(p, cfg)
    table = ablation.aggregate(rows)
    methods = set(zip(table["full_model"], table["method"]))
    assert {("full_model", "OverFill"), ("full_model", "pruned"), ("full_model", ablation.FULL),
            ("full_model", ablation.SMALLER), ("smaller", "OverFill"), ("smaller", ablation.FULL),
            ("full_model", "OverFill (untrained)")} <= methods
    full = table[(table["full_model"] == "full_model") & (table["method"] == ablation.FULL)].iloc[0]
    at_one = (table["full_model"] == "full_model") & (table["keep"] == 1.0)
    whole = table[at_one & (table["method"] == "pruned (untrained)")].iloc[0]
    # Keeping every channel reproduces the full model: same size, same bytes, same lm-eval scores.
    assert whole["parameters"] == full["parameters"] and whole["decode_bytes"] == full["decode_bytes"]
    assert [whole[c] for c in ablation.score_columns(table)] == [full[c] for c in ablation.score_columns(table)]
    half = table[(table["full_model"] == "full_model") & (table["keep"] == 0.5) & (table["method"] == "OverFill")].iloc[0]
    assert half["parameters"] < full["parameters"] and half["decode_bytes"] < full["decode_bytes"]
    assert all(r["per_token_ms"] > 0 for r in rows)
    trained = [r for r in rows if r["seed"] is not None and r["method"] != ablation.SMALLER]
    assert all((tmp_path / "work").as_posix() in r["run_dir"] for r in trained)
    assert (p.workdir / "ablation" / "smaller" / "importance").is_dir()  # the smaller model's own importance

    again = ablation.run(p, cfg)  # everything cached: same scores, nothing retrained
    assert [r["overall"] for r in again] == [r["overall"] for r in rows]
    assert [r.get("train_seconds") for r in again] == [r.get("train_seconds") for r in rows]
    assert pd.DataFrame(again)["method"].tolist() == pd.DataFrame(rows)["method"].tolist()


def test_fidelity_scorer_and_recovery_curves(tmp_path, own_models):
    """``scorer: fidelity`` scores agreement with the full model's test answers (keep-all pruning reproduces the full
    model's numbers), keeps the lower-is-better NLL out of the score columns, and runs trained with
    ``eval_steps`` give recovery curves from step 0."""
    p = presets.load_preset("smoke", {"workdir": str(tmp_path / "work"), **own_models,
                                      "training": {"eval_steps": 3}})
    cfg = ablation.AblationConfig.from_dict({"keep": [1.0, 0.5], "seeds": [0], "scorer": "fidelity"})
    rows = ablation.run(p, cfg)
    table = ablation.aggregate(rows)
    full = table[table["method"] == ablation.FULL].iloc[0]
    whole = table[(table["keep"] == 1.0) & (table["method"] == "pruned (untrained)")].iloc[0]
    assert full["overall"] == full["agreement"] and 0 < full["agreement"] <= 1  # on the suite's gold answers here
    assert whole["agreement"] == full["agreement"] and whole["answer_nll"] == pytest.approx(full["answer_nll"], abs=1e-5)
    assert "answer_nll" in table and "answer_nll" not in ablation.score_columns(table)
    assert ablation.score_columns(table) == ["agreement", "exact", "overall"]
    curves = ablation.recovery_curves(rows)
    trained = [r for r in rows if r["seed"] is not None]
    assert len(curves) == 3 * len(trained)  # steps 0, 3, 6 of every run
    for _, run in curves.groupby(["keep", "method"]):
        assert run["step"].tolist() == [0, 3, 6] and run["tokens_seen"].is_monotonic_increasing
    assert "agreement with the full model" in ablation.conclusion(table, label=ablation.SCORERS["fidelity"].label)
    with pytest.raises(ValueError, match="fidelity"):
        ablation.AblationConfig.from_dict({"scorer": "bleu"})


def test_the_scorer_registry_implements_every_scorer_a_preset_may_name():
    from overfill_lib.config import ABLATION_SCORERS

    assert set(ablation.SCORERS) == set(ABLATION_SCORERS)
    assert all(ablation.SCORERS[k].description == v for k, v in ABLATION_SCORERS.items())


@pytest.mark.parametrize("weights", ["float", "int8"])
def test_the_decoders_timed_and_scored_run_with_the_presets_weights(tmp_path, monkeypatch, weights):
    """One width of the grid on the tiny test models, training, timing and scoring stood in for: every decoder timed
    or scored (untrained alone, untrained paired, trained) runs with ``decoder.weights``, the full model as it is;
    its rows say which; float keeps today's score-cache names, int8 gets its own."""
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from overfill_lib.config import MAIN_FULL_MODEL
    from overfill_lib.pair import OverFillModel
    from overfill_lib.quantize import is_quantized
    from tests.tiny_models import tiny_model

    preset = presets.load_preset("smoke", {"workdir": str(tmp_path / "work"), "decoder": {"weights": weights}})
    dirs = {name: tmp_path / name for name in ("full", "decoder", "run")}
    for path in dirs.values():
        path.mkdir()
        (path / "config.json").write_text("{}")  # what _dir_key signs
    full = tiny_model("llama", seed=0)

    def decoder():
        return tiny_model("llama", seed=1, hidden_size=32, intermediate_size=40)

    timed, scored = [], []
    monkeypatch.setattr(ablation, "full_model_dir", lambda p, name: dirs["full"])
    monkeypatch.setattr(ablation, "prepare_point", lambda p, point, full_dir: dirs["decoder"])
    monkeypatch.setattr(ablation._Grid, "load", lambda self, path: full if path == dirs["full"] else decoder())
    monkeypatch.setattr(ablation, "decode_cost", lambda f, d, *a, **k: timed.append((f, d)) or {"parameters": 1})
    monkeypatch.setattr(ablation, "score",
                        lambda model, *a, cache, **k: scored.append((model, cache)) or {"overall": 1})

    def training_run(p, objective, *, seed, full, **kwargs):
        model = OverFillModel(full, decoder()) if objective == "overfill" else decoder()
        return SimpleNamespace(model=model, run_dir=dirs["run"], record={"train_seconds": 0.0})

    monkeypatch.setattr(ablation.pipeline, "training_run", training_run)
    config = ablation.AblationConfig.from_dict({"keep": [0.5], "seeds": [0]})
    key = "lm_eval-0123456789"
    grid = ablation._Grid(preset=preset, config=config, train_config=preset.training, tokenizer=None, dataset=None,
                          data_stats={}, prompt_fn=None, limit=None, key=key,
                          decoder_key=ablation.decoder_score_key(preset, key), device="cpu", timing_threads=1,
                          retrain=False)
    rows = ablation._full_model_rows(grid, MAIN_FULL_MODEL, config.points(), tqdm(disable=True))

    assert [(r["method"], r.get("decoder_weights")) for r in rows] == [
        (ablation.FULL, None), *[(m, weights) for m in ("pruned (untrained)", "OverFill (untrained)", "OverFill",
                                                          "pruned")]]
    int8 = weights == "int8"
    assert [(is_quantized(f), d is not None and is_quantized(d)) for f, d in timed] == [(False, False), (False, int8)]
    decoders = [m.decoder if isinstance(m, OverFillModel) else m for m, _ in scored[1:]]
    assert not is_quantized(scored[0][0]) and all(is_quantized(d) == int8 for d in decoders)
    assert all(not is_quantized(m.full) for m, _ in scored if isinstance(m, OverFillModel))
    # Score caches: the names they had before the setting existed, for float; their own with the weights, for int8.
    tag = f"teacher-keep0.5-{ablation._dir_key(dirs['decoder'])}-{key}{'-int8' if int8 else ''}"
    assert [cache.name for _, cache in scored] == [
        ablation.score_cache_name(MAIN_FULL_MODEL, dirs["full"], key), f"pruned-{tag}.json", f"overfill-{tag}.json",
        *[f"scores-{key}{'-int8' if int8 else ''}.json"] * 2]
    assert "decoder_weights" not in ablation.families(rows)


def test_an_int8_decoder_is_costed_at_one_byte_per_weight():
    from overfill_lib import latency
    from overfill_lib.quantize import quantize_int8
    from tests.tiny_models import tiny_model

    full = tiny_model("llama", seed=0)
    settings = latency.LatencySettings(base_prompt=6, base_new_tokens=3, warmup=0, repeats=1)
    prompts = latency.random_prompts(full.config.vocab_size, low=3)
    decoder = tiny_model("llama", seed=1, hidden_size=32)
    float_cost = ablation.decode_cost(full, decoder, settings, prompts)
    int8_cost = ablation.decode_cost(full, quantize_int8(decoder), settings, prompts)
    assert int8_cost["parameters"] == float_cost["parameters"] and int8_cost["per_token_ms"] > 0
    kv = 2 * 2 * 2 * 16 * 4 * (6 + 3 + 1)  # K and V, 2 layers, 2 KV heads of 16, fp32, the positions and one written
    assert float_cost["decode_bytes"] - kv == 4 * (int8_cost["decode_bytes"] - kv)
