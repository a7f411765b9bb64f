"""Recovery: how much of the full model a pruned decoder gets back when trained long, OverFill against pruning.

Each run trains one decoder width (``keep``) by one method (``overfill_kd``: the decoder reads the full model's
prefill; ``pruned_kd``: the decoder alone) with dense distillation on text windows (``windows.py``) from the
standard library's docstrings (``stdlib_corpus``), through the same Trainer as every other objective
(``training.train``). A run is named by its recipe, models and data but not by its token budget: the learning
rate is constant after warmup, so training to 200k tokens and later on to 1M gives the curve one 1M-token run
would, and ``--tokens`` can grow across sessions. Validation (held-out modules) every ``eval_every`` tokens; a
run stops early once the validation KL has improved by less than ``flat`` over its last ``flat_evals``
validations. Scores (``score``): the test modules' text and the held-out chat answers, with 95% bootstrap
intervals, beside the full model's own level.

Command line (``python -m overfill_lib.recovery``): ``train`` (one run, or every run of the preset's grid),
``score`` (writes ``results/<preset>/recovery.json``). On a GPU the same command runs the same recipe; set
``runtime.device: cuda`` (and a bf16 dtype) in the preset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from overfill_lib import pipeline, scoring, stdlib_corpus, training, windows
from overfill_lib.artifacts import (PROJECT_ROOT, content_sha256, environment_record, read_json, weights_fingerprint,
                                   write_json)
from overfill_lib.config import RECOVERY_OBJECTIVES as METHODS
from overfill_lib.config import RecoveryConfig, check_distinct, keep_fraction, keeping, positive_int, seed_arg
from overfill_lib.presets import Preset, load_preset

log = logging.getLogger(__name__)


def recipe(config: RecoveryConfig, objective: str, tokens: int) -> training.TrainingConfig:
    """The Trainer's recipe for one run trained to ``tokens`` (in whole validation segments)."""
    return training.TrainingConfig(
        objectives=(objective,), data="stdlib text windows", steps=config.steps(tokens),
        batch_size=config.batch_size, learning_rate=config.learning_rate, scheduler="constant_with_warmup",
        warmup_steps=config.steps(config.warmup_tokens), weight_decay=config.weight_decay, logging_steps=5,
        save_steps=config.eval_steps, save_total_limit=1, include_first_token=False, ce_weight=config.ce_weight,
        max_length=config.window, precision=config.precision)


def load_config(preset: Preset) -> RecoveryConfig:
    if not preset.has("recovery"):
        raise ValueError(f"preset {preset.name!r} has no recovery section (the smollm2-135m preset has one)")
    return preset.recovery


# ----------------------------------------------------------------------------------------------
# Data: windows of each split and the full model's distributions on them


def split_windows(split: str, tokenizer, config: RecoveryConfig, limit: int | None = None) -> list[list[int]]:
    return windows.token_windows([d["text"] for d in stdlib_corpus.documents(split)], tokenizer, config.spec, limit)


def teacher_cache(preset: Preset, split: str, full, tokenizer, config: RecoveryConfig,
                  limit: int | None = None) -> windows.TeacherCache:
    """The split's windows with the full model's top-k distributions, built once under the preset's workdir."""
    rows = split_windows(split, tokenizer, config, limit)
    fp = weights_fingerprint(full)
    key = hashlib.sha256(json.dumps([fp, windows.windows_fingerprint(rows), asdict(config.spec)]).encode()).hexdigest()
    cache = windows.TeacherCache(preset.workdir / "recovery" / "teacher" / f"{split}-{key[:12]}", config.spec, rows, fp)
    if not cache.complete:
        log.info("the full model's distributions on %d %s windows (once; reused by every run)", len(rows), split)
        cache.build(full)
    return cache


# ----------------------------------------------------------------------------------------------
# Validation during training, and the flat-curve stop


class TextProbe(TrainerCallback):
    """Every ``every`` steps (and at step 0): the model's text scores on the validation windows, appended to the log
    history as ``val_kl`` / ``val_nll`` / ``val_agreement`` with ``tokens`` (scored tokens trained on so far)."""

    def __init__(self, model, cache: windows.TeacherCache, every: int, tokens_per_step: int):
        self.model, self.cache, self.every, self.tokens_per_step = model, cache, every, tokens_per_step

    def _probe(self, state) -> None:
        found = scoring.summarize_text(windows.text_scores(self.model, self.cache), intervals=False)
        state.log_history.append({"step": state.global_step, "tokens": state.global_step * self.tokens_per_step,
                                  "val_kl": round(found["kl"], 5), "val_nll": round(found["nll"], 5),
                                  "val_agreement": round(found["agreement"], 5)})

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._probe(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._probe(state)


def validation_curve(history: list[dict]) -> list[dict]:
    return [h for h in history if "val_kl" in h]


def is_flat(curve: list[dict], flat: float, evals: int) -> bool:
    """The last ``evals`` validations improved KL by less than ``flat`` (a fraction of the earlier value)."""
    if len(curve) <= evals:
        return False
    before, last = curve[-evals - 1]["val_kl"], min(h["val_kl"] for h in curve[-evals:])
    return before - last < flat * before


# ----------------------------------------------------------------------------------------------
# Runs


@dataclass
class Resources:
    """What every run of a preset shares: the full model, its tokenizer, the windows with their teacher caches."""

    preset: Preset
    config: RecoveryConfig
    full_dir: Path
    full: torch.nn.Module
    tokenizer: object
    train: windows.TeacherCache
    validation: windows.TeacherCache
    decoders: dict[float, Path] = field(default_factory=dict)  # pruned once per width (tests give their own)

    @classmethod
    def load(cls, preset: Preset, config: RecoveryConfig | None = None) -> Resources:
        from transformers import AutoTokenizer

        config = config or load_config(preset)
        full_dir, _ = pipeline.full_model(preset)
        full = training.load_full(training.Sources(full_dir, full_dir), "float32")
        tokenizer = AutoTokenizer.from_pretrained(full_dir)
        train = teacher_cache(preset, "train", full, tokenizer, config)
        validation = teacher_cache(preset, "validation", full, tokenizer, config, limit=config.validation_windows)
        return cls(preset, config, Path(full_dir), full, tokenizer, train, validation)

    def project_path(self, path: str) -> Path:
        return self.preset.path(path)

    def decoder_dir(self, keep: float) -> Path:
        """The full model pruned to ``keep`` of its hidden and intermediate channels (the preset's criterion)."""
        if keep not in self.decoders:
            section = keeping(self.preset.plain("decoder"), keep)
            self.decoders[keep] = pipeline.pruned_decoder(
                self.preset, decoder=section, full_dir=self.full_dir,
                out=self.preset.workdir / "recovery" / f"decoder-keep{keep:g}")
        return self.decoders[keep]

    def run_dir(self, objective: str, keep: float, seed: int) -> Path:
        """Named by the recipe (not the budget), the decoder, the data and the teacher."""
        recipe = {k: v for k, v in asdict(self.config).items()
                  if k not in {"keep", "objectives", "seeds", "tokens", "spread_seeds", "spread_tokens", "flat",
                               "flat_evals", "validation_windows"}}
        decoder = training.dir_signature(self.decoder_dir(keep))
        blob = json.dumps([objective, keep, seed, recipe, decoder, self.train.request, self.validation.request],
                          sort_keys=True, default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:10]
        return self.preset.workdir / "recovery" / "runs" / f"{objective}-keep{keep:g}-seed{seed}-{key}"


def train_run(res: Resources, objective: str, keep: float, seed: int, tokens: int, *, until_flat: bool = True) -> dict:
    """Train (or resume, or extend) one run to ``tokens``, a validation segment at a time, stopping early on a flat
    validation curve when ``until_flat``. Returns the run's summary (also ``run_dir/recovery.json``)."""
    config = res.config
    run_dir = res.run_dir(objective, keep, seed)
    summary_path = run_dir / "recovery.json"
    summary = read_json(summary_path) if summary_path.is_file() else {}
    if summary.get("stopped") == "flat":
        log.info("%s keep %g seed %d: already flat at %d tokens", objective, keep, seed, summary["tokens"])
        return summary
    sources = training.Sources(res.full_dir, res.decoder_dir(keep), full_id=str(res.preset.full_model.id if res.preset.full_model else res.full_dir))
    layout = training.get_objective(objective).layout
    target = config.steps(tokens)
    steps_done = summary.get("steps", 0)
    result = None
    while steps_done < target:
        segment = min(target, (steps_done // config.eval_steps + 1) * config.eval_steps)
        run_recipe = recipe(config, objective, segment * config.tokens_per_step)
        result = training.train(
            objective, sources, windows.WindowDataset(res.train.windows, res.train), run_recipe, run_dir, seed=seed,
            runtime=pipeline.runtime(res.preset), full=res.full,
            probe=lambda model: TextProbe(model, res.validation, config.eval_steps, config.tokens_per_step),
            collator=windows.WindowCollator(config.context, layout),
            data_stats={"windows": len(res.train.windows), "teacher": res.train.request})
        steps_done = result.steps
        curve = validation_curve(result.log_history)
        summary = {"objective": objective, "keep": keep, "seed": seed, "steps": steps_done,
                   "tokens": steps_done * config.tokens_per_step, "tokens_per_step": config.tokens_per_step,
                   "stopped": "flat" if until_flat and is_flat(curve, config.flat, config.flat_evals) else
                   ("budget" if steps_done >= target else "interrupted"),
                   "curve": curve, "train_loss": training.loss_history(result.log_history),
                   "recipe": run_recipe.to_dict() | {"steps": None}, "run_dir": _relative(run_dir)}
        write_json(summary_path, summary)
        if not result.complete or summary["stopped"] == "flat":
            break
    return summary


def _relative(path: Path) -> str:
    """A path as results name it: relative to the project when inside it (results travel between clones)."""
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one run (or the preset's whole grid) to a token budget")
    train.add_argument("--preset", default="smollm2-135m")
    train.add_argument("--objective", choices=METHODS, nargs="+", help="default: the preset's recovery.objectives")
    train.add_argument("--keep", type=keep_fraction, nargs="+", help="decoder widths (default: the preset's recovery.keep)")
    train.add_argument("--seed", type=seed_arg, nargs="+", help="default: the preset's recovery.seeds")
    train.add_argument("--tokens", type=positive_int, help="scored continuation tokens per run (default: recovery.tokens)")
    train.add_argument("--no-flat-stop", action="store_true", help="train to the budget even on a flat curve")
    train.add_argument("--spread", action="store_true",
                       help="the spread runs: recovery.spread_seeds at recovery.spread_tokens")
    score = commands.add_parser("score", help="score every finished run; write results/<preset>/recovery.json")
    score.add_argument("--preset", default="smollm2-135m")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        preset, config = checked_args(args)
    except ValueError as e:
        parser.error(str(e))
    res = Resources.load(preset, config)
    if args.command == "score":
        print(score_runs(res))
        return 0
    config = res.config
    seeds = args.seed or (config.spread_seeds if args.spread else config.seeds)
    runs = [(o, k, s) for s in seeds for k in (args.keep or config.keep) for o in (args.objective or config.objectives)]
    budget = args.tokens or (config.spread_tokens if args.spread else config.tokens)
    # In rounds of one validation segment, so that a run stopped at any time leaves every run at the same budget.
    segment = config.eval_steps * config.tokens_per_step
    for target in range(segment, budget + segment, segment):
        for objective, keep, seed in runs:
            s = train_run(res, objective, keep, seed, min(target, budget), until_flat=not args.no_flat_stop)
            print(f"{objective} keep {keep:g} seed {seed}: {s['stopped']} at {s['tokens']} tokens, "
                  f"validation KL {s['curve'][-1]['val_kl'] if s['curve'] else None}", flush=True)
    return 0


def checked_args(args) -> tuple[Preset, RecoveryConfig]:
    """The preset and its recovery section, and the command's own arguments checked against them, before any model
    loads (a typo found after the teacher cache is built costs minutes; one found at scoring time, a whole run)."""
    preset = load_preset(args.preset)
    config = load_config(preset)
    if args.command == "score":
        answers = preset.path(config.test_answers)
        if not answers.is_file():
            raise ValueError(f"recovery.test_answers: {answers} does not exist; write it with python -m "
                             "overfill_lib.pipeline distill --split test, or point recovery.test_answers at it")
        return preset, config
    for what in ("objective", "keep", "seed"):
        if getattr(args, what):
            check_distinct(getattr(args, what), f"--{what}")
    if args.spread and not args.seed and not config.spread_seeds:
        raise ValueError(f"--spread: preset {preset.name!r} has no recovery.spread_seeds; list them, or give --seed")
    outside = [f"--keep {k:g}" for k in args.keep or () if k not in config.keep]
    outside += [f"--seed {s}" for s in args.seed or () if s not in (*config.seeds, *config.spread_seeds)]
    if outside:
        log.warning("%s: not in preset %r's recovery grid, so `score` will not read these runs (add them to the "
                    "preset's recovery section to have them scored)", ", ".join(outside), preset.name)
    return preset, config


def run_summaries(res: Resources) -> list[dict]:
    """The summaries of every run of the preset's grid (main and spread seeds) that has trained at all."""
    found = []
    config = res.config
    for seed in (*config.seeds, *config.spread_seeds):
        for keep in config.keep:
            for objective in config.objectives:
                path = res.run_dir(objective, keep, seed) / "recovery.json"
                if path.is_file():
                    found.append(read_json(path))
    return found


def evenly_spaced(total: int, n: int) -> list[int]:
    """``n`` indices spread over ``total`` (all when n >= total): the test windows come from every test module."""
    return list(range(total)) if n >= total else [i * total // n for i in range(n)]


SCORING = 2  # what a cached score means; bump when scoring changes, and every model is scored again
POSITIONS = ((1, 4), (5, 16), (17, 48), (49, 127))  # continuation tokens the decoder has read, for the gap by distance


def unit_scores(model, name: str, identity: dict, res: Resources, test: windows.TeacherCache,
                answers: list[dict] | None, answers_sha: str) -> dict:
    """Per-unit scores of one model (``text``: per test window; ``answers``: per held-out answer), kept under the
    preset's workdir and reused while the model (``identity``), the test data and ``SCORING`` are the same: a
    rescore after more training scores only the runs that moved."""
    indices = evenly_spaced(len(test.windows), res.config.test_windows)
    key = json.loads(json.dumps({"scoring": SCORING, "model": identity, "test": test.request, "windows": len(indices),
                                 "answers": answers_sha if answers is not None else None}))  # as JSON reads back
    path = res.preset.workdir / "recovery" / "scores" / f"{name}.json"
    if path.is_file() and (found := read_json(path)).get("key") == key:
        return found["units"]
    log.info("scoring %s", name)
    units = {"text": windows.text_scores(model, test, indices)}
    if answers is not None:
        units["answers"] = scoring.answer_fidelity(model, res.tokenizer, answers, units=True)["per_answer"]
    write_json(path, {"key": key, "units": units})
    return units


def position_units(text: dict, key: str) -> list[tuple[list[int], list[float], list[int]]]:
    """Per range of ``POSITIONS`` that the windows reach: the range and, per window, the sum of ``key`` over it and
    its count of positions."""
    out = []
    for first, last in POSITIONS:
        n = [len(row[first - 1 : last]) for row in text[key]]
        if sum(n):
            out.append(([first, min(last, first - 1 + max(n))], [sum(row[first - 1 : last]) for row in text[key]], n))
    return out


def by_position(text: dict) -> list[dict]:
    """KL to the full model and agreement with its greedy token per range of continuation positions, with 95%
    bootstrap intervals over windows."""
    return [{"positions": span, "n": sum(n), "kl": sum(kl) / sum(n), "kl_ci": scoring.bootstrap_ratio(kl, n),
             "agreement": sum(agree) / sum(n), "agreement_ci": scoring.bootstrap_ratio(agree, n)}
            for (span, kl, n), (_, agree, _) in zip(position_units(text, "kl_at"), position_units(text, "agree_at"))]


def summary(units: dict) -> dict:
    found = {"text": scoring.summarize_text(units["text"]) | {"by_position": by_position(units["text"])}}
    if "answers" in units:
        found["answers"] = scoring.summarize_answers(units["answers"], intervals=True)
    return found


def paired(a: dict, b: dict) -> dict:
    """``a`` minus ``b`` (OverFill minus pruned) on the same windows and answers, with paired 95% intervals."""
    ta, tb = a["text"], b["text"]
    out = {"text_kl": scoring.bootstrap_paired((ta["kl"], ta["n"]), (tb["kl"], tb["n"])),
           "text_agreement": scoring.bootstrap_paired((ta["agree"], ta["n"]), (tb["agree"], tb["n"])),
           "text_kl_by_position": [{"positions": span} | scoring.bootstrap_paired((kl_a, n_a), (kl_b, n_b))
                                   for (span, kl_a, n_a), (_, kl_b, n_b) in
                                   zip(position_units(ta, "kl_at"), position_units(tb, "kl_at"))]}
    if "answers" in a and "answers" in b:
        aa, ab = a["answers"], b["answers"]
        out["answers_agreement"] = scoring.bootstrap_paired((aa["hits"], aa["tokens"]), (ab["hits"], ab["tokens"]))
        out["answers_nll"] = scoring.bootstrap_paired((aa["nll"], aa["tokens"]), (ab["nll"], ab["tokens"]))
    return out


def score_runs(res: Resources, out: str | Path | None = None, *, test: windows.TeacherCache | None = None) -> Path:
    """Score the full model and every main-seed run on the test modules' text and the held-out answers, and each
    width's untrained decoder (as OverFill and alone) on the text (where ``recovered`` starts from); OverFill minus
    pruned per width with paired intervals; with every run's curve, into ``results/<preset>/recovery.json``."""
    from overfill_lib.chat_data import load_conversations
    from overfill_lib.pair import OverFillModel

    config = res.config
    test = test or teacher_cache(res.preset, "test", res.full, res.tokenizer, config)
    answers = [dict(r) for r in load_conversations(res.preset.path(config.test_answers), "test")]
    answers_sha = content_sha256(res.preset.path(config.test_answers).read_bytes())
    t0 = time.perf_counter()
    units = {"full": unit_scores(res.full, "full", {"full": test.request["full_model"]}, res, test, answers,
                                 answers_sha)}
    for keep in config.keep:
        decoder_dir = res.decoder_dir(keep)
        decoder = training.load_causal_lm(decoder_dir, "pruned decoder", dtype=torch.float32).eval()
        identity = {"decoder": training.dir_signature(decoder_dir), "full": test.request["full_model"]}
        for objective, model in (("overfill_kd", OverFillModel(res.full, decoder)), ("pruned_kd", decoder)):
            name = f"untrained-keep{keep:g}-{objective}"
            units[name] = unit_scores(model, name, identity | {"as": objective}, res, test, None, answers_sha)
    runs = run_summaries(res)
    for run in runs:
        if run["seed"] in config.seeds:
            name = f"{run['objective']}-keep{run['keep']:g}-seed{run['seed']}"
            model = training.load_trained(res.project_path(run["run_dir"]), full=res.full)
            identity = {"run": Path(run["run_dir"]).name, "steps": run["steps"]}
            units[name] = unit_scores(model, name, identity, res, test, answers, answers_sha)
    comparisons = {f"keep{keep:g}-seed{seed}": paired(units[f"overfill_kd-keep{keep:g}-seed{seed}"],
                                                      units[f"pruned_kd-keep{keep:g}-seed{seed}"])
                   for keep in config.keep for seed in config.seeds
                   if {f"overfill_kd-keep{keep:g}-seed{seed}", f"pruned_kd-keep{keep:g}-seed{seed}"} <= units.keys()}
    out = Path(out) if out else PROJECT_ROOT / "results" / res.preset.name / "recovery.json"
    write_json(out, {
        "what": "OverFill (overfill_kd) and the pruned decoder alone (pruned_kd) trained by dense distillation on text "
                "windows; scored on held-out text (test modules) and held-out chat answers, 95% bootstrap intervals; "
                "'paired': OverFill minus pruned on the same windows and answers, with paired 95% intervals",
        "config": asdict(config), "runs": runs, "scores": {name: summary(u) for name, u in units.items()},
        "paired": comparisons,
        "data": {"corpus": stdlib_corpus.record(), "train_teacher": res.train.summary(),
                 "test_teacher": test.summary(), "test_answers": {
                     "file": config.test_answers, "answers": len(answers), "sha256": answers_sha}},
        "score_seconds": round(time.perf_counter() - t0, 1),  # with the reused scores: see artifacts' scores/
        "environment": environment_record("cpu"),
    })
    return out


# ----------------------------------------------------------------------------------------------
# Reading the results (notebook 05)

LABELS = {"overfill_kd": "OverFill", "pruned_kd": "pruned"}


def results_path(preset_name: str) -> Path:
    return PROJECT_ROOT / "results" / preset_name / "recovery.json"


def curves_frame(results: dict):
    """One row per validation point of every run: method, keep, seed, tokens, val_kl, val_nll, val_agreement."""
    import pandas as pd

    rows = [{"method": LABELS[r["objective"]], "keep": r["keep"], "seed": r["seed"], **point}
            for r in results["runs"] for point in r["curve"]]
    return pd.DataFrame(rows)


def _model_row(name: str) -> dict:
    if name == "full":
        return {"model": "full model", "keep": 1.0, "method": "full model", "trained": True}
    parts = name.split("-")
    if parts[0] == "untrained":
        return {"model": name, "keep": float(parts[1][4:]), "method": f"{LABELS[parts[2]]} (untrained)", "trained": False}
    return {"model": name, "keep": float(parts[1][4:]), "method": LABELS[parts[0]], "trained": True}


def scores_frame(results: dict):
    """One row per scored model: held-out text (nll, agreement, kl) and held-out answers (nll, agreement, exact),
    each with its 95% interval, and ``recovered``: the share of the untrained decoder's text-KL gap to the full
    model that training closed (1 = the full model's distribution)."""
    import pandas as pd

    rows = []
    for name, found in results["scores"].items():
        row = _model_row(name)
        for part, metrics in (("text", ("nll", "agreement", "kl")), ("answers", ("nll", "agreement", "exact"))):
            for m in metrics:
                row[f"{part}_{m}"] = found[part][m] if part in found else None
                row[f"{part}_{m}_ci"] = found[part].get(f"{m}_ci") if part in found else None
        rows.append(row)
    table = pd.DataFrame(rows)
    untrained = {(r["keep"], r["method"].split(" (")[0]): r["text_kl"] for _, r in table.iterrows() if not r["trained"]}
    table["recovered"] = [1 - r["text_kl"] / untrained[(r["keep"], r["method"])] if r["trained"] and
                          (r["keep"], r["method"]) in untrained else None for _, r in table.iterrows()]
    return table


def _fmt(value: float, ci) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def lead(results: dict, seed: int = 0) -> list[dict]:
    """Per width: OverFill against pruned on held-out text KL and answer agreement, and who leads. With the paired
    comparison (both models on the same windows and answers; results since paired scoring) a lead is a difference
    whose paired 95% interval excludes zero; older results fall back to separate intervals that do not overlap."""
    table = scores_frame(results)
    out = []
    for keep in sorted(table.loc[table["trained"] & (table["keep"] < 1), "keep"].unique()):
        row = {"keep": float(keep)}
        pairs = results.get("paired", {}).get(f"keep{keep:g}-seed{seed}", {})
        for metric, better in (("text_kl", "lower"), ("answers_agreement", "higher")):
            o = table[(table["keep"] == keep) & (table["method"] == "OverFill")]
            p = table[(table["keep"] == keep) & (table["method"] == "pruned")]
            if o.empty or p.empty:
                continue
            o, p = o.iloc[0], p.iloc[0]
            oc, pc = o[f"{metric}_ci"], p[f"{metric}_ci"]
            o_better = o[metric] < p[metric] if better == "lower" else o[metric] > p[metric]
            row[metric] = {"OverFill": _fmt(o[metric], oc), "pruned": _fmt(p[metric], pc)}
            if metric in pairs:
                diff = pairs[metric]
                apart = diff["ci"][0] > 0 or diff["ci"][1] < 0
                row[metric]["OverFill - pruned"] = _fmt(diff["difference"], diff["ci"])
            else:
                apart = oc is not None and pc is not None and (oc[1] < pc[0] or pc[1] < oc[0])
            row[metric]["leader"] = ("OverFill" if o_better else "pruned") if apart else "neither (interval holds 0)"
        out.append(row)
    return out


def position_frame(results: dict):
    """One row per scored model and range of continuation positions: KL to the full model and agreement with its
    greedy token, with intervals (how the gap grows with distance from the prefill)."""
    import pandas as pd

    rows = [_model_row(name) | {"positions": f"{b['positions'][0]}-{b['positions'][1]}", **b}
            for name, found in results["scores"].items() for b in found["text"].get("by_position", [])]
    return pd.DataFrame(rows)


if __name__ == "__main__":
    sys.exit(main())
