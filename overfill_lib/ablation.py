"""The pruning-ratio ablation: how much of a full model can the decoder lose?

A point of the grid is a full model and the fraction ``keep`` of its hidden channels and MLP neurons the decoder
keeps. At every point the decoder is pruned, trained as OverFill and as the pruned baseline with one recipe,
scored (a registry, ``SCORERS``) and costed per decode step in bytes and in measured time. Everything is cached
through ``pipeline``, so a rerun only fills in what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from overfill_lib import cost, evaluation, latency, pipeline, quantize, scoring, training
from overfill_lib.artifacts import load_model, read_json, resolve_model, write_json
from overfill_lib.config import ABLATION_SCORERS, MAIN_FULL_MODEL, AblationConfig, Point, folder_name, torch_dtype
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.lm_eval_model import OverFillLM
from overfill_lib.pair import OverFillModel

log = logging.getLogger(__name__)

# How a row names the model it scores: a trained objective's label (``training.OBJECTIVES``), an untrained
# decoder, or a reference.
UNTRAINED = {"overfill": "OverFill (untrained)", "pruned": "pruned (untrained)"}
FULL, SMALLER = "full model", training.OBJECTIVES["smaller"].label


# --------------------------------------------------------------------------------------------------
# Models of a point
# --------------------------------------------------------------------------------------------------


def full_model_dir(preset, name: str) -> Path:
    """The full model called ``name``: ``full_model`` / ``smaller`` (the preset's), or a directory / hub id."""
    if name in pipeline.MODELS:
        return Path(pipeline.model(preset, name)[0])
    return Path(resolve_model(name))


def full_model_id(preset, name: str, full_dir: Path) -> str:
    """How a saved pair names its full model: the preset's id for its own models, else the directory."""
    spec = getattr(preset, name) if name in pipeline.MODELS else None
    return str(spec.id if spec is not None and spec.id else full_dir)


def decoder_section(preset, keep: float) -> dict:
    """The preset's ``decoder`` section with hidden and intermediate pruned to keep ``keep`` of the channels, in
    the plain form a pruned decoder's stamp records (``pipeline.pruned_decoder``)."""
    from overfill_lib.config import keeping

    return keeping(preset.plain("decoder"), keep)


def prepare_point(preset, point: Point, full_dir: Path) -> Path:
    """The pruned decoder of ``point``; the preset's own width of its own full model is notebook 02's decoder."""
    section = decoder_section(preset, point.keep)
    if point.full_model == MAIN_FULL_MODEL and section == preset.plain("decoder"):
        return pipeline.pruned_decoder(preset)
    root = preset.workdir / "ablation"
    own_importance = None if point.full_model == MAIN_FULL_MODEL else root / folder_name(point.full_model) / "importance"
    return pipeline.pruned_decoder(preset, decoder=section, full_dir=full_dir, out=root / point.slug / "decoder",
                                   importance_dir=own_importance)


# --------------------------------------------------------------------------------------------------
# Scores through lm-eval
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scorer:
    """How the grid scores a model: ``fn(model, tokenizer, preset, limit, cache) -> {column: value}`` with an
    ``overall`` column (higher is better), and what that column is called in tables and figures."""

    fn: object
    description: str
    label: str
    key: object  # (preset, limit) -> what the cached scores depend on


# Score columns where lower is better: reported and averaged over seeds, but not used as "scores" (Pareto fronts,
# retention, family curves all read higher as better).
LOWER_IS_BETTER = ("answer_nll", "nll", "split_perplexity")


def task_scores(results: dict, prefix: str = evaluation.SUITE_TASKS + "_") -> dict[str, float]:
    """One number per task (its first metric; the suite's family names without the prefix) and ``overall``
    (the group's score when lm-eval aggregated one, else the mean over tasks)."""
    first = evaluation.results_table({"run": results}).drop_duplicates("task")  # rows keep lm-eval's metric order
    tasks, groups = first[~first["is_group"]], first[first["is_group"]]
    scores = {task.removeprefix(prefix): float(v) for task, v in zip(tasks["task"], tasks["value"])}
    overall = float(groups["value"].iloc[0]) if len(groups) else sum(scores.values()) / max(1, len(scores))
    return scores | {"overall": overall}


def _eval_tasks(preset) -> list[str]:
    return list(preset.evaluation.tasks or [evaluation.SUITE_TASKS])


def _lm_eval_key(preset, limit: int | None) -> str:
    tasks = _eval_tasks(preset)
    suite = preset.suite_dir / "suite.json" if preset.suite_dir is not None else None
    blob = json.dumps([tasks, limit, suite.read_text() if suite is not None and suite.is_file() else None])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _lm_eval_scores(model, tokenizer, preset, limit: int | None, cache: Path | None) -> dict[str, float]:
    """The preset's evaluation tasks through lm-eval; the results JSON is written atomically to ``cache``."""
    if cache is not None and cache.is_file():
        return task_scores(read_json(cache))
    ev = preset.evaluation
    with _quiet_harness():
        lm = OverFillLM(pretrained=model, tokenizer=tokenizer, batch_size=ev.batch_size)
        results = evaluation.evaluate(
            lm, _eval_tasks(preset), suite_dir=preset.suite_dir, limit=limit, num_fewshot=ev.num_fewshot,
            apply_chat_template=ev.apply_chat_template, fewshot_as_multiturn=ev.fewshot_as_multiturn,
            output_path=cache,
        )
    return task_scores(results)


def _test_records(preset, limit: int | float | None) -> list[dict]:
    return pipeline.test_records(preset, preset.training, limit)


def _fidelity_key(preset, limit: int | None) -> str:
    blob = json.dumps(["fidelity", limit, _test_records(preset, limit)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _fidelity_scores(model, tokenizer, preset, limit: int | None, cache: Path | None) -> dict[str, float]:
    """``scoring.answer_fidelity`` on the test split of the training data (the full model's held-out answers)."""
    if cache is not None and cache.is_file():
        return read_json(cache)["scores"]
    found = scoring.answer_fidelity(model, tokenizer, _test_records(preset, limit))
    scores = {"agreement": found["agreement"], "exact": found["exact"], "answer_nll": found["nll"],
              "overall": found["agreement"]}
    if cache is not None:
        write_json(cache, {"scores": scores, "fidelity": found})
    return scores


# The implementations of config.ABLATION_SCORERS (the registry a preset's ablation.scorer is checked against at
# load): SCORERS is built from it, so a scorer named there without an implementation here fails at import.
_IMPLEMENTATIONS = {
    "lm_eval": (_lm_eval_scores, "exact match", _lm_eval_key),
    "fidelity": (_fidelity_scores, "agreement with the full model", _fidelity_key),
}
SCORERS = {name: Scorer(_IMPLEMENTATIONS[name][0], description, *_IMPLEMENTATIONS[name][1:])
           for name, description in ABLATION_SCORERS.items()}


def decoder_score_key(preset, key: str) -> str:
    """The score-cache key of a decoder run with the preset's ``decoder.weights``: ``key`` itself for "float", so
    that scores cached before the setting existed keep their names; ``<key>-<weights>`` otherwise."""
    weights = preset.decoder.weights
    return key if weights == "float" else f"{key}-{weights}"


def score(model, tokenizer, preset, *, scorer: str = "lm_eval", limit: int | None = None,
          cache: Path | None = None) -> dict[str, float]:
    """Scores of ``model`` (an ``OverFillModel`` or a causal LM) by the named scorer; cached in ``cache``."""
    return SCORERS[scorer].fn(model, tokenizer, preset, limit, cache)


@contextlib.contextmanager
def _quiet_harness():
    """Dozens of evaluations in one notebook: keep lm-eval's per-run notices and progress bars out of its output
    (errors still show; the grid's own progress bar reports progress)."""
    import io

    harness = logging.getLogger("lm_eval")
    level = harness.level
    harness.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        harness.setLevel(level)


# --------------------------------------------------------------------------------------------------
# Decode cost
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int | None):
    """Run with ``n`` torch threads (timing tiny models on a CPU: more threads only add noise)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prompt_source(preset, tokenizer):
    """Prompts for timing: the test prompts of the training data (the suite's, or a pretrained model's held-out
    chat prompts) through the chat template, else random token ids."""
    from overfill_lib import generation

    try:
        records = _test_records(preset, 64)
    except ValueError:  # no test split to draw from
        return latency.random_prompts(len(tokenizer))
    enc = generation.encode_chat(tokenizer, [r["messages"][:-1] for r in records])
    return latency.tiled_prompts([row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])])


def decode_cost(full, decoder, settings: latency.LatencySettings, prompt_fn, bytes_per_value: int | None = None,
                threads: int | None = None) -> dict:
    """Per-token decode cost of ``decoder`` reading ``full``'s cache (``decoder=None``: the full model alone).

    ``decode_bytes``: what one step at batch 1 reads and writes, weights + KV cache of the base prompt and its
    new tokens (:func:`overfill_lib.cost.decode_step_bytes` ``total``; int8 weights one byte each): the roofline
    cost of a memory-bound decode. ``per_token_ms``: measured median milliseconds per generated token after the
    first (p10/p90 beside it), on the static-cache path, on this machine with ``threads`` torch threads on a CPU.
    ``parameters``: :func:`overfill_lib.quantize.parameter_count` (an int8 decoder's untied head counted apart).
    """
    model = decoder if decoder is not None else full
    nbytes = bytes_per_value or cost.dtype_bytes(next(model.parameters()).dtype)
    positions = settings.base_prompt + settings.base_new_tokens
    step = cost.decode_step_bytes(model.config, nbytes, batch=1, kv_positions=positions)
    # Compiled (CUDA graphs) on a GPU, where eager per-layer launches would hide the bytes. Eager on a CPU: a
    # compile per grid width would outlast the timings, and the committed CPU grids were timed eagerly.
    gen = FastGenerator(full, decoder, compile=next(full.parameters()).device.type == "cuda")
    with _threads(threads if gen.device.type == "cpu" else None):
        timed = latency.measure_fast(gen, "overfill" if decoder is not None else "full", batch=1,
                                     prompt=settings.base_prompt, new_tokens=settings.base_new_tokens,
                                     prompt_fn=prompt_fn, warmup=settings.warmup, repeats=settings.repeats)
    per_token = timed["per_token_s"]
    return {"parameters": quantize.parameter_count(model), "decode_bytes": step["total"],
            "per_token_ms": 1000 * per_token["median"], "per_token_ms_p10": 1000 * per_token["p10"],
            "per_token_ms_p90": 1000 * per_token["p90"]}


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


@dataclass
class _Grid:
    """What every point of one ablation run shares: the preset, its training data, the scorer and the timing."""

    preset: object
    config: AblationConfig
    train_config: training.TrainingConfig
    tokenizer: object
    dataset: object
    data_stats: dict
    prompt_fn: object
    limit: int | None
    key: str  # in every score cache's name: the scorer and what it scores, so a changed scorer is not reused
    decoder_key: str  # ``key`` of a decoder's scores, with its weights when not float (decoder_score_key)
    device: str
    timing_threads: int | None
    retrain: bool

    @property
    def cache_root(self) -> Path:
        return self.preset.workdir / "ablation" / "scores"

    def load(self, path: Path):
        return load_model(path, dtype=torch_dtype(self.preset.runtime.dtype))[0].to(self.device)

    def as_run(self, model):
        """A decoder (or a pair's decoder) with the weights the preset runs it with (``decoder.weights``)."""
        return pipeline.decoder_as_run(self.preset, model)

    def cost_of(self, full, decoder=None) -> dict:
        return decode_cost(full, decoder, self.preset.latency, self.prompt_fn, threads=self.timing_threads)

    def scored(self, model, cache: Path) -> dict:
        return score(model, self.tokenizer, self.preset, scorer=self.config.scorer, limit=self.limit, cache=cache)


def run(
    preset,
    config: AblationConfig | None = None,
    train_config: training.TrainingConfig | None = None,
    *,
    retrain: bool = False,
    timing_threads: int | None = 1,
) -> list[dict]:
    """Train, score and cost every point of the grid; one row per (point, method, seed) plus the references.

    Row keys: ``full_model``, ``full_model_parameters``, ``keep``, ``method``, ``seed`` (None for untrained
    models), ``parameters``, ``decode_bytes``, ``per_token_ms``, one score per task family and ``overall``,
    ``train_seconds``, ``run_dir``.
    """
    grid = _grid(preset, config or preset.ablation, train_config or preset.training, retrain, timing_threads)
    rows: list[dict] = []
    bar = tqdm(total=grid.config.runs(), desc="ablation training runs", unit="run")
    by_model: dict[str, list[Point]] = {}
    for point in grid.config.points():
        by_model.setdefault(point.full_model, []).append(point)
    for name, points in by_model.items():
        rows += _full_model_rows(grid, name, points, bar)
    bar.close()
    if preset.has("smaller"):  # the smaller model fine-tuned with the same recipe (notebook 02's run when finished)
        rows += _smaller_rows(grid)
    return rows


def _grid(preset, config: AblationConfig, cfg: training.TrainingConfig, retrain: bool,
          timing_threads: int | None) -> _Grid:
    rt = preset.runtime
    tokenizer = AutoTokenizer.from_pretrained(full_model_dir(preset, MAIN_FULL_MODEL))
    dataset, stats = pipeline.training_data(preset, cfg, tokenizer)
    limit = config.eval_limit if config.eval_limit is not None else preset.evaluation.limit
    key = f"{config.scorer}-{SCORERS[config.scorer].key(preset, limit)}"
    return _Grid(
        preset=preset, config=config, train_config=cfg, tokenizer=tokenizer, dataset=dataset,
        data_stats=stats.to_dict(), prompt_fn=prompt_source(preset, tokenizer), limit=limit,
        key=key, decoder_key=decoder_score_key(preset, key),
        device=rt.device if rt.device != "cuda" or torch.cuda.is_available() else "cpu",
        timing_threads=timing_threads, retrain=retrain,
    )


def score_cache_name(name: str, full_dir: Path, key: str) -> str:
    """The file under ``ablation/scores`` holding the scores of the full model ``name`` (``config.folder_name``)."""
    return f"{folder_name(name)}-{_dir_key(full_dir)}-{key}.json"


def _full_model_rows(grid: _Grid, name: str, points: list[Point], bar) -> list[dict]:
    """One full model's rows: the model itself, then at each of its points the untrained decoders (main full model
    only) and every trained (objective, seed), each decoder with the preset's ``decoder.weights`` (in the row)."""
    preset, key = grid.preset, grid.key
    main_dir, full_dir = full_model_dir(preset, MAIN_FULL_MODEL), full_model_dir(preset, name)
    if name != MAIN_FULL_MODEL:
        training.check_same_tokenizer(main_dir, full_dir, f"full model {name!r}")
    full = grid.load(full_dir)
    full_cost = grid.cost_of(full)
    base = {"full_model": name, "full_model_parameters": full_cost["parameters"]}
    rows = [base | {"keep": 1.0, "method": FULL, "seed": None} | full_cost
            | grid.scored(full, grid.cache_root / score_cache_name(name, full_dir, key))]
    for point in points:
        dec_dir = prepare_point(preset, point, full_dir)
        decoder0 = grid.as_run(grid.load(dec_dir))
        at = base | {"keep": point.keep, "decoder_weights": preset.decoder.weights} | grid.cost_of(full, decoder0)
        if grid.config.untrained and name == MAIN_FULL_MODEL:
            tag = f"{point.slug}-{_dir_key(dec_dir)}-{grid.decoder_key}"
            rows.append(at | {"method": UNTRAINED["pruned"], "seed": None}
                        | grid.scored(decoder0, grid.cache_root / f"pruned-{tag}.json"))
            pair0 = OverFillModel(full, decoder0, tokenizer=grid.tokenizer)
            rows.append(at | {"method": UNTRAINED["overfill"], "seed": None}
                        | grid.scored(pair0, grid.cache_root / f"overfill-{tag}.json"))
        sources = training.Sources(full_dir, dec_dir, None, full_model_id(preset, name, full_dir))
        rows += _trained_rows(grid, point, at, sources, full, bar)
    return rows


def _trained_rows(grid: _Grid, point: Point, at: dict, sources: training.Sources, full, bar) -> list[dict]:
    rows = []
    for seed in point.seeds:
        for objective in point.objectives:
            bar.set_postfix_str(f"{point.slug} {objective} seed {seed}")
            result = pipeline.training_run(grid.preset, objective, seed=seed, config=grid.train_config,
                                           sources=sources, dataset=grid.dataset, data_stats=grid.data_stats,
                                           full=full, retrain=grid.retrain)
            rows.append(at | {"method": training.OBJECTIVES[objective].label, "seed": seed,
                              "train_seconds": result.record["train_seconds"], "run_dir": str(result.run_dir)}
                        | grid.scored(grid.as_run(result.model), result.run_dir / f"scores-{grid.decoder_key}.json"))
            bar.update()
            log.info("ablation %d/%d: %s %s seed %d, overall %.3f (trained in %.0f s)", bar.n, bar.total,
                     point.slug, objective, seed, rows[-1]["overall"], result.record["train_seconds"])
    return rows


def _smaller_rows(grid: _Grid) -> list[dict]:
    """The smaller model fine-tuned with the same recipe, one row per seed."""
    sources = pipeline.training_sources(grid.preset, grid.train_config, ["smaller"])
    smaller_cost = grid.cost_of(grid.load(sources.smaller_dir))
    rows = []
    for seed in grid.config.seeds:
        result = pipeline.training_run(grid.preset, "smaller", seed=seed, config=grid.train_config, sources=sources,
                                       dataset=grid.dataset, data_stats=grid.data_stats, retrain=grid.retrain)
        rows.append({"full_model": MAIN_FULL_MODEL, "full_model_parameters": None, "keep": None, "method": SMALLER,
                     "seed": seed, "train_seconds": result.record["train_seconds"], "run_dir": str(result.run_dir)}
                    | smaller_cost | grid.scored(result.model, result.run_dir / f"scores-{grid.key}.json"))
    return rows


def _dir_key(path: Path) -> str:
    return hashlib.sha256(json.dumps(training.dir_signature(path)).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------------
# Reading the grid
# --------------------------------------------------------------------------------------------------

ID_COLUMNS = ["full_model", "full_model_parameters", "keep", "method", "parameters", "decode_bytes"]

# Records written before the model that prefills was called "full model" (notebook 04's committed results) name its
# column "teacher" (and "teacher_parameters") and the preset's own full model "teacher". They are read under the new
# names, with one message; the files are left as written.
OLD_COLUMNS = {"teacher": "full_model", "teacher_parameters": "full_model_parameters"}
OLD_MAIN = "teacher"


def _renamed_row(row: dict) -> dict:
    out = {OLD_COLUMNS.get(k, k): v for k, v in row.items()}
    if "teacher" in row and out["full_model"] == OLD_MAIN:
        out["full_model"] = MAIN_FULL_MODEL
    return out


def _renamed(rows) -> tuple[list[dict], bool]:
    """``rows`` as a list of dicts with the old columns renamed, and whether there were any."""
    rows = list(rows.to_dict("records") if hasattr(rows, "to_dict") else rows)
    if all(not isinstance(r, dict) or OLD_COLUMNS.keys().isdisjoint(r) for r in rows):
        return rows, False
    return [_renamed_row(r) for r in rows], True


def _rename_message(where: str) -> None:
    log.warning("column `teacher` is now `full_model` (and `teacher_parameters` `full_model_parameters`); read so "
                "from %s, which is left as written", where)


def renamed_rows(rows, where: str = "the rows given") -> list[dict]:
    """``rows`` (of :func:`run` or :func:`aggregate`'s records), any with the old ``teacher`` columns read under the
    new names, logging ``column `teacher` is now `full_model` ...`` once when there were some."""
    rows, old = _renamed(rows)
    if old:
        _rename_message(where)
    return rows


def read_results(path: str | Path) -> dict:
    """Notebook 04's results JSON with records written before the rename read under the new names: the rows, table,
    Pareto fronts and recovery curves (``teacher`` columns), the size rule (``teachers``), the grid
    (``ablation.teachers``) and the preset it records (section ``teacher``); one message for the whole file."""
    from overfill_lib.presets import legacy_names

    found = read_json(path)
    old = []
    for key in ("rows", "table", "recovery"):
        if isinstance(found.get(key), list):
            found[key], was = _renamed(found[key])
            old.append(was)
    if isinstance(found.get("pareto"), dict):
        fronts = {cost: _renamed(front) for cost, front in found["pareto"].items()}
        found["pareto"] = {cost: rows for cost, (rows, _) in fronts.items()}
        old += [was for _, was in fronts.values()]
    rule = found.get("size_rule")
    if isinstance(rule, dict) and "teachers" in rule:
        rule["full_models"] = {MAIN_FULL_MODEL if name == OLD_MAIN else name: _renamed_row(knee)
                               for name, knee in rule.pop("teachers").items()}
        old.append(True)
    if isinstance(found.get("ablation"), dict) and "teachers" in found["ablation"]:
        found["ablation"] = {("full_models" if k == "teachers" else k): v for k, v in found["ablation"].items()}
        old.append(True)
    if isinstance(found.get("preset"), dict):
        found["preset"], renamed_sections = legacy_names(found["preset"], str(path))
        old.append(bool(renamed_sections))
    if any(old):
        _rename_message(f"{path} (with its size rule, grid and recorded preset)")
    return found


def families(rows) -> list[str]:
    """Score columns of the rows from :func:`run` (task families, then ``overall``)."""
    import pandas as pd

    skip = set(ID_COLUMNS) | {"seed", "train_seconds", "run_dir", "decoder_weights"}
    cols = [c for c in pd.DataFrame(renamed_rows(rows)).columns if c not in skip and not c.startswith("per_token_ms")]
    return [c for c in cols if c != "overall"] + ["overall"]


def score_columns(table) -> list[str]:
    """Score columns of an :func:`aggregate` table (those with a ``_std`` partner), higher is better."""
    return [c for c in table.columns if f"{c}_std" in table.columns and c not in LOWER_IS_BETTER]


def aggregate(rows):
    """Mean and standard deviation over seeds per (full model, keep, method); ``seeds`` counts them.

    Cost columns are the point's (one measurement per point). Columns ``<score>`` and ``<score>_std``
    for each family and overall.
    """
    import pandas as pd

    rows = renamed_rows(rows)
    df = pd.DataFrame(rows)
    scores = families(rows)
    keys = ["full_model", "keep", "method"]
    df["keep"] = df["keep"].fillna(-1.0)  # references have no width; groupby drops NaN keys
    g = df.groupby(keys, sort=False, dropna=False)
    out = g[scores].mean()
    std = g[scores].std(ddof=1).fillna(0.0).add_suffix("_std")
    first = g[["full_model_parameters", "parameters", "decode_bytes", "per_token_ms", "per_token_ms_p10",
               "per_token_ms_p90"]].first()
    out = pd.concat([first, out, std, g.size().rename("seeds")], axis=1).reset_index()
    out["keep"] = out["keep"].where(out["keep"] >= 0)
    return out


def recovery_curves(rows):
    """How fast each trained decoder recovers: the validation probes (``training.eval_steps``) of every run in
    ``rows``, one row per (full model, keep, method, seed, step) with ``tokens_seen``, ``eval_nll`` and
    ``eval_agreement``. Empty when the runs were trained without probes."""
    import pandas as pd

    out = []
    for row in renamed_rows(rows):
        record = Path(row["run_dir"]) / "record.json" if isinstance(row.get("run_dir"), str) else None
        if record is None or not record.is_file():
            continue
        for probe in training.probe_history(read_json(record).get("log_history", [])):
            out.append({k: row[k] for k in ("full_model", "keep", "method", "seed", "parameters")} | probe)
    return pd.DataFrame(out, columns=["full_model", "keep", "method", "seed", "parameters", "step", "tokens_seen",
                                      "eval_nll", "eval_agreement"])


def pareto_front(table, cost: str, score: str = "overall", methods: Sequence[str] | None = None):
    """Boolean Series: rows no other row beats on both ``cost`` (lower) and ``score`` (higher)."""
    import pandas as pd

    candidates = table if methods is None else table[table["method"].isin(methods)]
    keep = pd.Series(False, index=table.index)
    for i, row in candidates.iterrows():
        dominated = ((candidates[cost] <= row[cost]) & (candidates[score] >= row[score])
                     & ((candidates[cost] < row[cost]) | (candidates[score] > row[score]))).any()
        keep[i] = not dominated
    return keep


def family_robustness(table, retention: float = 0.9, full_model: str = MAIN_FULL_MODEL):
    """Per family and method: score at the widest and narrowest decoder, each as a fraction of the full
    model's score on that family, and the narrowest ``keep`` still holding ``retention`` of it."""
    import pandas as pd

    t = table[table["full_model"] == full_model]
    full = t[t["method"] == FULL].iloc[0]
    rows = []
    for method in ("OverFill", "pruned"):
        m = t[t["method"] == method].sort_values("keep")
        if m.empty:
            continue
        for fam in score_columns(table):
            ref = full[fam]
            kept = m[m[fam] >= retention * ref]["keep"] if ref > 0 else m["keep"].iloc[:0]
            widest, narrowest = m.iloc[-1], m.iloc[0]
            rows.append({"family": fam, "method": method, "full model": ref,
                         f"at keep {widest['keep']:g}": widest[fam], f"at keep {narrowest['keep']:g}": narrowest[fam],
                         "retained at narrowest": m[fam].iloc[0] / ref if ref > 0 else float("nan"),
                         f"narrowest keep holding {retention:.0%}": kept.min() if len(kept) else None})
    return pd.DataFrame(rows)


def size_rule(table, retention: float = 0.9, method: str = "OverFill") -> dict:
    """The simplest rule the grid supports linking the full model's size and the prunable ratio.

    For each full model: the narrowest ``keep`` whose decoder holds ``retention`` of that model's overall
    score, and that decoder's parameter count. A *constant ratio* rule holds when those keeps agree
    within the coarser grid's spacing; a *constant decoder size* rule when the parameter counts agree
    within a factor of 1.5. With fewer than two full models reaching the threshold, no rule can be tested.
    """
    knees = {}
    for name, t in table.groupby("full_model", sort=False):
        full = t[t["method"] == FULL]
        m = t[t["method"] == method].sort_values("keep")
        if full.empty or m.empty:
            continue
        ref = float(full["overall"].iloc[0])
        ok = m[m["overall"] >= retention * ref] if ref > 0 else m.iloc[:0]
        grid = [float(k) for k in m["keep"]]
        knees[name] = {"full_model_parameters": int(full["parameters"].iloc[0]), "full_score": ref, "grid": grid,
                       "grid_spacing": max((b - a for a, b in itertools.pairwise(grid)), default=None),
                       "knee_keep": float(ok["keep"].min()) if len(ok) else None,
                       "knee_parameters": int(ok.sort_values("keep")["parameters"].iloc[0]) if len(ok) else None,
                       # the narrowest width tried already holds: the true knee may lie lower
                       "knee_at_grid_edge": bool(len(ok)) and float(ok["keep"].min()) == grid[0]}
    reached = {k: v for k, v in knees.items() if v["knee_keep"] is not None}
    verdict = {"full_models": knees, "retention": retention, "method": method}
    if len(knees) < 2:
        return verdict | {"rule": None,
                          "statement": "one full model only: no rule between its size and the ratio can be tested"}
    if len(reached) < len(knees):
        missing = [k for k in knees if k not in reached]
        return verdict | {"rule": None,
                          "statement": f"{', '.join(missing)} never holds {retention:.0%} of its full model's "
                                       "score within its grid, so no rule can be read off these points"}
    keeps = [v["knee_keep"] for v in reached.values()]
    params = [v["knee_parameters"] for v in reached.values()]
    tol = max((v["grid_spacing"] for v in reached.values() if v["grid_spacing"] is not None), default=0.0)
    ratio_ok = max(keeps) - min(keeps) <= tol + 1e-9
    size_ok = max(params) / max(1, min(params)) <= 1.5
    rule = ("constant ratio" if ratio_ok and not size_ok else "constant decoder size" if size_ok and not ratio_ok
            else "either (the grid cannot tell them apart)" if ratio_ok else None)
    described = "; ".join(f"{k}: keep {'<=' if v['knee_at_grid_edge'] else ''}{v['knee_keep']:g} "
                          f"({v['knee_parameters']:,} decoder parameters of "
                          f"{v['full_model_parameters']:,})" for k, v in reached.items())
    if rule is None:
        statement = (f"neither a constant ratio nor a constant decoder size fits: the narrowest decoders holding "
                     f"{retention:.0%} are {described}")
    else:
        statement = f"{rule} fits these points (grid spacing up to {tol:g}): {described}"
    return verdict | {"rule": rule, "statement": statement}


def compare_methods(table, score: str = "overall", full_model: str = MAIN_FULL_MODEL, a: str = "OverFill",
                    b: str = "pruned"):
    """Per width of ``full_model``: ``a`` against ``b`` (mean, std over seeds, difference, and whether the
    difference exceeds the sum of the two spreads: None with one seed on either side, where there is no spread)."""
    import pandas as pd

    t = table[table["full_model"] == full_model]
    x = t[t["method"] == a].set_index("keep")
    y = t[t["method"] == b].set_index("keep")
    keeps = sorted(set(x.index) & set(y.index))
    rows = []
    for k in keeps:
        xa, xs, ya, ys = x.loc[k, score], x.loc[k, f"{score}_std"], y.loc[k, score], y.loc[k, f"{score}_std"]
        seeds = int(min(x.loc[k, "seeds"], y.loc[k, "seeds"])) if "seeds" in x.columns else 2
        rows.append({"keep": k, "parameters": int(x.loc[k, "parameters"]), a: xa, f"{a} std": xs, b: ya,
                     f"{b} std": ys, "difference": xa - ya,
                     "beyond seed spread": bool(abs(xa - ya) > xs + ys) if seeds > 1 else None})
    return pd.DataFrame(rows)


# Pairs of trained methods compared at one width: the method and its baseline trained the same way.
COMPARED = (("OverFill", "pruned"), ("OverFill, distilled", "pruned, distilled"))


def seed_statistics(scores: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Per model, the mean and the standard deviation (ddof 1; 0 with one seed) of each metric over its seeds."""
    import numpy as np

    mean = {m: {k: float(np.mean([s[k] for s in v])) for k in v[0]} for m, v in scores.items()}
    std = {m: {k: float(np.std([s[k] for s in v], ddof=1)) if len(v) > 1 else 0.0 for k in v[0]}
           for m, v in scores.items()}
    return mean, std


def verdict(scores: dict[str, list[dict]], primary: str, pairs=COMPARED) -> dict[str, dict]:
    """Each method against its baseline on ``primary`` (lower is better for ``LOWER_IS_BETTER``): the means, the
    relative gain, whether it is ahead, and whether by more than the two seed spreads (None with one seed on
    either side: nothing to weigh the difference against); ``sentence`` says it in words."""
    mean, std = seed_statistics(scores)
    sign = -1 if primary in LOWER_IS_BETTER else 1
    out = {}
    for ours, theirs in ((a, b) for a, b in pairs if a in scores and b in scores):
        o, p = mean[ours][primary], mean[theirs][primary]
        seeds = min(len(scores[ours]), len(scores[theirs]))
        ahead = sign * (o - p) > 0
        beats = sign * (o - p) > std[ours][primary] + std[theirs][primary] if seeds > 1 else None
        said = (f"{ours} is {'ahead' if ahead else 'behind'} on one seed (no spread to weigh the difference against)."
                if beats is None else f"{ours} is ahead by more than the seed spread." if beats else
                f"{ours} is NOT ahead of {theirs} by more than the seed spread.")
        out[f"{ours} vs {theirs}"] = {
            "metric": primary, ours: o, theirs: p, "relative_gain": (o - p) / p if p else None, "seeds": seeds,
            "ahead": bool(ahead), "beats_beyond_seed_spread": beats,
            "sentence": f"{ours} {o:.3f} vs {theirs} {p:.3f} {primary} ({o - p:+.3f}); {said}"}
    return out


def narrowest_holding(table, method: str, level: float, score: str = "overall", full_model: str = MAIN_FULL_MODEL):
    """The row of the narrowest ``method`` decoder of ``full_model`` scoring at least ``level`` (None if none)."""
    t = table[(table["full_model"] == full_model) & (table["method"] == method) & (table[score] >= level)]
    return None if t.empty else t.sort_values("keep").iloc[0]


def conclusion(table, retention: float = 0.9, score: str = "overall", label: str = "exact match") -> str:
    """What the grid shows, in two sentences built from the measured numbers (``label``: what ``score`` is)."""
    cmp = compare_methods(table, score)
    full = table[(table["full_model"] == MAIN_FULL_MODEL) & (table["method"] == FULL)]
    parts = []
    if not cmp.empty:
        best = cmp.loc[cmp["difference"].idxmax()]
        gap = (f"the largest gap is {best['difference']:+.3f} {score} {label} at keep {best['keep']:.0%} "
               f"({best['OverFill']:.3f} vs {best['pruned']:.3f})")
        weighed = cmp[cmp["beyond seed spread"].notna()]
        if weighed.empty:  # one seed per width: differences only, nothing to weigh them against
            parts.append(f"OverFill is ahead of the pruned baseline at {int((cmp['difference'] > 0).sum())} of "
                         f"{len(cmp)} widths, on one seed per width (no spread to weigh the differences against); "
                         + gap)
        else:
            spread = weighed["beyond seed spread"].astype(bool)
            ahead, behind = weighed[(weighed["difference"] > 0) & spread], weighed[(weighed["difference"] < 0) & spread]
            parts.append(f"OverFill is ahead of the pruned baseline beyond the seed spread at {len(ahead)} of "
                         f"{len(weighed)} widths (behind at {len(behind)}); " + gap)
    if not full.empty:
        level = retention * float(full[score].iloc[0])
        held = {m: narrowest_holding(table, m, level, score) for m in ("OverFill", "pruned")}
        said = [f"{m} down to keep {r['keep']:.0%} ({int(r['parameters']):,} parameters)" if r is not None
                else f"{m} at no width tried" for m, r in held.items()]
        sentence = (f"{retention:.0%} of the full model's {float(full[score].iloc[0]):.3f} is held by "
                    + " and by ".join(said))
        small = table[table["method"] == SMALLER]
        if not small.empty:
            s = small.iloc[0]
            match = narrowest_holding(table, "OverFill", float(s[score]), score)
            sentence += (f"; the smaller fine-tuned model ({int(s['parameters']):,} parameters) scores {s[score]:.3f}, "
                         + (f"matched by OverFill from keep {match['keep']:.0%} ({int(match['parameters']):,} parameters)"
                            if match is not None else "which no OverFill decoder tried matches"))
        parts.append(sentence)
    return ". ".join(parts) + "." if parts else "no trained widths to compare."
