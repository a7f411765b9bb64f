"""A preset's cached artifacts, in the order they are made:

    suite -> full model (and the smaller model) -> distilled data -> importance -> pruned decoder -> training runs

One function per artifact: each builds it when it is missing or stale and returns where it lives, so a preset
reaches any artifact in at most three calls. This is the one module that reads a preset's sections to drive the
modules that do the work (tasks, full_model, gguf_models, corpus, importance, pruning, training), which take plain
arguments or the sections' typed objects.

    python -m overfill_lib.pipeline train --preset tiny --objective overfill --seed 0
    python -m overfill_lib.pipeline distill --preset smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from overfill_lib import corpus, gguf_models, importance, pruning, tasks, training
from overfill_lib.artifacts import load_causal_lm, load_model, read_json, resolve_model, write_json
from overfill_lib.config import DecoderSection, SmallerSection, check_limit, parse, torch_dtype
from overfill_lib.full_model import FullModelConfig, compare_checkpoints, train_full_model
from overfill_lib.presets import Preset, load_preset

log = logging.getLogger(__name__)

MODELS = ("full_model", "smaller")  # the preset sections that name the full model and the smaller model


def runtime(preset: Preset) -> dict:
    """The preset's ``runtime`` as the plain ``{"device", "dtype"}`` mapping ``training.train`` takes."""
    return {"device": preset.runtime.device, "dtype": preset.runtime.dtype}


def suite(preset: Preset) -> Path:
    """The synthetic suite's directory, its splits written (or rewritten when stale)."""
    return tasks.write_suite(preset.suite_config(), preset.suite_dir)


# --------------------------------------------------------------------------------------------------
# The full model and the smaller model
# --------------------------------------------------------------------------------------------------


def _which(which: str) -> str:
    """``which`` checked against ``MODELS`` (``"teacher"``, the old name of ``"full_model"``, refused by name)."""
    if which == "teacher":
        raise ValueError("model 'teacher' is now 'full_model' (the preset section of the model that prefills); "
                         "rename it in the call")
    if which not in MODELS:
        raise ValueError(f"unknown model {which!r}; choose from {MODELS}")
    return which


def model_recipe(preset: Preset, which: str = "full_model") -> FullModelConfig:
    """The local preset's training recipe for its full model, or for its smaller model (the same, narrower)."""
    cfg = preset.full_model_config()
    if _which(which) == "smaller":
        spec = preset.smaller or SmallerSection()
        cfg = cfg.narrower(spec.width_ratio, heads=spec.heads)
    return cfg


def model(preset: Preset, which: str = "full_model", retrain: bool = False) -> tuple[Path, dict | None]:
    """The directory of the preset's full model (``which="full_model"``) or its smaller model (``"smaller"``), with
    its record.

    Presets with a local recipe (``full_model.train``): train it on the suite when its checkpoint is missing or
    ``retrain``, and return its training record. GGUF presets (``gguf:`` beside the id): convert the file once into
    the directory ``id`` and return its source record. Hub presets: resolve the id to a local directory (a clear
    error offline), no record.
    """
    spec = getattr(preset, _which(which))
    if preset.full_model.train is None:  # a pretrained full model (and smaller model): found, not trained
        if spec is None or spec.id is None:
            raise ValueError(f"preset {preset.name!r} names no {which} model id")
        if getattr(spec, "gguf", None) is not None:
            path = preset.path(spec.id)
            return gguf_models.ensure_model(spec.gguf, path), gguf_models.source_record(path)
        return resolve_model(spec.id, revision=spec.revision), None
    cfg = model_recipe(preset, which)
    path = preset.path(spec.id if spec is not None and spec.id else preset.workdir / which)
    suite_dir = suite(preset)
    if retrain or not (path / "config.json").exists():
        log.info("training the %s (%s) into %s", which, cfg, path)
        return path, train_full_model(cfg, suite_dir, path)
    return path, read_json(path / "training_record.json")


def full_model(preset: Preset, retrain: bool = False) -> tuple[Path, dict | None]:
    return model(preset, "full_model", retrain)


def reproduce(preset: Preset, which: str = "full_model", out_dir: str | Path | None = None) -> dict:
    """Retrain the preset's committed ``which`` model with its recipe and seed into ``out_dir`` (default
    ``<workdir>/reproduce/<which>``) and compare the two (:func:`full_model.compare_checkpoints`)."""
    committed, _ = model(preset, which)
    out = Path(out_dir) if out_dir is not None else preset.workdir / "reproduce" / which
    train_full_model(model_recipe(preset, which), suite(preset), out)
    return compare_checkpoints(committed, out)


def __getattr__(name: str):
    # teacher_recipe is now model_recipe (the model that prefills is the "full model"; "teacher" means a distillation
    # teacher only): still callable, with a DeprecationWarning.
    if name == "teacher_recipe":
        import warnings

        warnings.warn("pipeline.teacher_recipe is now pipeline.model_recipe", DeprecationWarning, stacklevel=2)
        return model_recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def distilled_data(preset: Preset, full=None, tokenizer=None, splits: Sequence[str] = corpus.DATA_SPLITS) -> Path:
    """The preset's self-distilled chat data (``distill.dir``), written or completed by its full model when a split
    (of ``splits``) is missing or was made by another request (another model, size, instructions or decoding)."""
    section = preset.distill
    if section is None:
        raise ValueError(f"preset {preset.name!r} has no distill section (the smollm2-135m preset has one)")
    source = None
    if full is None:
        model_dir, _ = full_model(preset)
        full, tokenizer = load_model(model_dir)
        source = gguf_models.source_record(model_dir)
    return corpus.build_distilled_data(
        full, tokenizer, preset.path(section.dir), sizes={s: tuple(getattr(section, s)) for s in corpus.DATA_SPLITS},
        max_new_tokens=section.max_new_tokens, batch_size=section.batch_size, seed=section.seed,
        source=source and {k: source[k] for k in ("source", "gguf_sha256")},
        splits=splits)


# --------------------------------------------------------------------------------------------------
# Importance and the pruned decoder
# --------------------------------------------------------------------------------------------------


def channel_importance(preset: Preset, full, tokenizer, *, directory: str | Path | None = None,
                       **kwargs) -> dict[str, importance.Importance]:
    """Importance of ``full`` by each criterion, calibrated as the preset's ``calibration`` section says and cached
    under ``directory`` (default ``<workdir>/importance``); ``kwargs`` as :func:`importance.cached_importance`
    (given the section as the preset wrote it, which is what its cache key has always recorded)."""
    return importance.cached_importance(
        full, tokenizer, preset.plain("calibration"),
        Path(directory) if directory is not None else preset.workdir / "importance",
        suite_dir=preset.suite_dir, **kwargs)


def pruned_decoder(preset: Preset, retrain: bool = False, *, decoder: dict | None = None,
                   full_dir: str | Path | None = None, out: str | Path | None = None,
                   importance_dir: str | Path | None = None) -> Path:
    """A pruned decoder, pruned once and reused: by default the preset's (its ``decoder`` section applied to its
    full model) under ``<workdir>/pruned_decoder``.

    ``decoder`` / ``full_dir`` / ``out`` prune another width or another full model into another directory (the
    pruning-ratio ablation; give another full model its own ``importance_dir``). Re-pruned when the decoder
    spec, the ``calibration`` section or the full model changes.
    """
    from transformers import AutoTokenizer

    full_dir = Path(full_dir) if full_dir is not None else full_model(preset)[0]
    out = Path(out) if out is not None else preset.workdir / "pruned_decoder"
    # The stamp records the sections as the preset wrote them (as every earlier stamp did), so a decoder pruned
    # before presets were typed is still found.
    spec = {"decoder": decoder if decoder is not None else preset.plain("decoder"),
            "calibration": preset.plain("calibration"), "full": training.dir_signature(full_dir)}
    spec["decoder"] = {k: v for k, v in dict(spec["decoder"]).items() if k != "weights"}  # run time, not pruning
    stamp = out / "prepared.json"
    if not retrain and stamp.is_file() and read_json(stamp).get("spec") == json.loads(json.dumps(spec)):
        return out
    section: DecoderSection = parse(DecoderSection, spec["decoder"], "decoder")
    log.info("pruning %s into %s (%s)", full_dir, out, section)
    full = load_causal_lm(full_dir, "full model", dtype=torch_dtype(preset.runtime.dtype))
    full = full.to(preset.runtime.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(full_dir)
    scores = channel_importance(preset, full, tokenizer, directory=importance_dir,
                                criteria=[section.criterion])[section.criterion]
    pruned, record = pruning.prune_width(full, scores, hidden=section.hidden, intermediate=section.intermediate,
                                         heads=section.heads, round_to=section.round_to)
    pruning.save_pruned(pruned.cpu(), record, out, tokenizer=tokenizer)
    write_json(stamp, {"spec": spec, "full_dir": str(full_dir)})
    return out


def decoder_sizes(preset: Preset, model_config, dtype_bytes=None) -> dict:
    """``pruning.size_report`` of ``model_config`` pruned as the preset's ``decoder`` section says (bytes per value:
    ``dtype_bytes``, default the preset's runtime dtype); no weights are read."""
    d = preset.decoder
    return pruning.size_report(model_config, hidden=d.hidden, intermediate=d.intermediate, heads=d.heads,
                               round_to=d.round_to, dtype_bytes=dtype_bytes or preset.runtime.dtype)


def decoder_as_run(preset: Preset, model):
    """``model`` with the weights the preset's decoder runs with where it is timed and scored (notebook 03's
    decoder, the ablation's decoders): ``decoder.weights``, unchanged for "float", quantized in place for "int8"
    (``quantize.apply_decoder_weights``). ``model`` is a decoder, or an ``OverFillModel`` whose decoder this changes
    (never the full model, which prefills in the runtime dtype)."""
    from overfill_lib.pair import OverFillModel
    from overfill_lib.quantize import apply_decoder_weights

    apply_decoder_weights(model.decoder if isinstance(model, OverFillModel) else model, preset.decoder.weights)
    return model


# --------------------------------------------------------------------------------------------------
# Training data and runs
# --------------------------------------------------------------------------------------------------


def training_sources(preset: Preset, config: training.TrainingConfig | None = None,
            objectives: Sequence[str] | None = None) -> training.Sources:
    """Every model the objectives read, built first for local presets."""
    config = config or preset.training
    objectives = list(objectives or config.objectives)
    full_dir, _ = full_model(preset)
    decoder_dir = pruned_decoder(preset, full_dir=full_dir)
    smaller_dir = None
    if any(training.get_objective(o).trains == "smaller" for o in objectives):
        smaller_dir = resolve_model(config.smaller_id) if config.smaller_id else model(preset, "smaller")[0]
    return training.Sources(Path(full_dir), Path(decoder_dir), smaller_dir and Path(smaller_dir),
                            str(preset.full_model.id))


def _data_source(preset: Preset, config: training.TrainingConfig):
    source = config.data
    if source == "suite":
        suite(preset)  # written (or rewritten when stale) before anything reads it
    elif preset.path(source).exists():
        source = preset.path(source)  # a project-relative file or directory, whatever the working directory
    return source


def training_data(preset: Preset, config: training.TrainingConfig, tokenizer):
    """The preset's training data, tokenized once for every objective (the dataset and its stats)."""
    from overfill_lib import chat_data

    return chat_data.prepare_chat_data(
        _data_source(preset, config), tokenizer, split=config.data_split, config=config.data_config,
        suite_dir=preset.suite_dir, max_length=config.max_length, limit=config.data_limit, where=config.data_where,
        skip_invalid=config.skip_invalid, num_proc=config.num_proc)


def data_records(preset: Preset, config: training.TrainingConfig, split: str = "validation") -> list[dict]:
    """Chat records of another split of the training data: ``validation`` is what ``training.FidelityProbe``
    scores during training, ``test`` what the notebooks score after it."""
    from overfill_lib import chat_data

    source = _data_source(preset, config)
    found = chat_data.load_conversations(source, split, config=config.data_config, suite_dir=preset.suite_dir)
    if len(found) == 0:
        raise ValueError(f"the {split} split of {source} is empty")
    return [dict(r) for r in found]


def test_records(preset: Preset, config: training.TrainingConfig, limit: int | float | None = None) -> list[dict]:
    """The held-out records the notebooks score after training: the first ``limit`` of the test split (None: the
    preset's ``evaluation.limit``; None there too: all). As in lm-eval, an int counts records and a float below 1
    is a share of the split."""
    import math

    records = data_records(preset, config, "test")
    limit = preset.evaluation.limit if limit is None else check_limit(limit, "eval_limit")
    if limit is None:
        return records
    if isinstance(limit, float) and limit < 1:
        return records[: math.ceil(len(records) * limit)]
    return records[: int(limit)]


def training_run(
    preset: Preset,
    objective: str,
    *,
    seed: int = 0,
    config: training.TrainingConfig | None = None,
    sources: training.Sources | None = None,
    dataset=None,
    data_stats: dict | None = None,
    retrain: bool = False,
    resume: bool = True,
    full=None,
    callbacks: Sequence = (),
) -> training.RunResult:
    """Train ``objective`` with the preset's recipe; a finished run with the same recipe, models and data is reused.

    The run lives in ``<workdir>/training/<objective>-seed<seed>-<hash of recipe, models and data>``.
    """
    from transformers import AutoTokenizer

    config = config or preset.training
    training.get_objective(objective)
    sources = sources or training_sources(preset, config, [objective])
    if dataset is None:
        dataset, stats = training_data(preset, config, AutoTokenizer.from_pretrained(sources.full_dir))
        data_stats = stats.to_dict()
    key = training.run_fingerprint(objective, seed, config, sources, data_stats or {"examples": len(dataset)})
    run_dir = preset.workdir / "training" / f"{objective}-seed{seed}-{key}"
    done = run_dir / "record.json"
    if retrain:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
        if training.world_size() > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
    elif done.is_file() and read_json(done).get("complete"):
        record = read_json(done)
        log.info("%s seed %d: reusing the finished run in %s", objective, seed, run_dir)
        return training.RunResult(objective, seed, run_dir, True, record["steps"], record,
                                  training.load_trained(run_dir, full=full))
    probe = data_records(preset, config, "validation") if config.eval_steps else None
    return training.train(objective, sources, dataset, config, run_dir, seed=seed, runtime=runtime(preset),
                          resume=resume, callbacks=callbacks, data_stats=data_stats, full=full, probe_records=probe)


def latest_run(preset: Preset, objective: str) -> Path | None:
    """The model directory of the newest finished run of ``objective`` under the preset (any recipe or seed), if any."""
    records = sorted((preset.workdir / "training").glob(f"{objective}-seed*/record.json"), key=lambda p: p.stat().st_mtime)
    done = [p.parent / "model" for p in records if read_json(p).get("complete") and (p.parent / "model").is_dir()]
    return done[-1] if done else None


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def train_overrides(args) -> dict:
    """The preset overrides of a ``train`` command line: ``--override`` (a JSON object) with ``--steps`` on top."""
    try:
        overrides = json.loads(args.override)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--override must be a JSON object: {e}") from e
    if args.steps is not None:
        overrides.setdefault("training", {})["steps"] = args.steps
    return overrides


def _train(args) -> int:
    from accelerate import PartialState
    from transformers import AutoTokenizer

    overrides = train_overrides(args)
    preset = load_preset(args.preset, overrides)
    config = preset.training
    objectives = args.objective or list(config.objectives)
    for name in objectives:
        training.get_objective(name)
    rt = runtime(preset)
    # Created first and with the Trainer's CPU choice, so every later PartialState agrees (it is a singleton).
    state = PartialState(cpu=training.on_cpu(rt))
    # The main process builds the full model, the pruned decoder and the tokenized data first; the others reuse them.
    with state.main_process_first():
        found = training_sources(preset, config, objectives)
        dataset, stats = training_data(preset, config, AutoTokenizer.from_pretrained(found.full_dir))
    # Loaded once, before any TrainingArguments (see training.load_full), and shared by every OverFill run.
    full = None
    if any(training.get_objective(o).layout == "pair" for o in objectives):
        full = training.load_full(found, training.full_dtype(rt))
    results = [training_run(preset, name, seed=seed, config=config, sources=found, dataset=dataset,
                            data_stats=stats.to_dict(), retrain=args.retrain, resume=not args.no_resume, full=full)
               for name, seed in config.runs(objectives, args.seed)]
    if state.is_main_process:
        for r in results:
            last = training.loss_history(r.log_history)[-1:] or [{}]
            print(f"{r.objective:10s} seed {r.seed}: {'complete' if r.complete else 'stopped'} at step {r.steps}, "
                  f"last loss {last[0].get('loss')}, {r.run_dir}")
    return 0 if all(r.complete for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train decoder objectives (also under accelerate launch)")
    train.add_argument("--preset", default="tiny", help="preset name or path to a preset YAML")
    train.add_argument("--objective", nargs="+", default=None,
                       help=f"objectives to train (default: the preset's training.objectives); from {sorted(training.OBJECTIVES)}")
    train.add_argument("--seed", type=int, nargs="+", default=None,
                       help="seeds for every objective (default: the preset's training.seeds and objective_seeds)")
    train.add_argument("--steps", type=int, help="optimizer steps (overrides training.steps)")
    train.add_argument("--override", default="{}",
                       help="JSON dict merged onto the preset, e.g. '{\"training\": {\"batch_size\": 4}}'")
    train.add_argument("--retrain", action="store_true", help="discard earlier runs of the same recipe")
    train.add_argument("--no-resume", action="store_true", help="start from scratch even when checkpoints exist")
    distill = commands.add_parser("distill", help="write or complete a preset's self-distilled chat data")
    distill.add_argument("--preset", required=True, help="a preset with a distill section (e.g. smollm2-135m)")
    distill.add_argument("--split", nargs="+", choices=corpus.DATA_SPLITS, default=corpus.DATA_SPLITS,
                         help="only these splits (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "distill":
        print(distilled_data(load_preset(args.preset), splits=args.split))
        return 0
    return _train(args)


if __name__ == "__main__":
    sys.exit(main())
