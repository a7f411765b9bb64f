"""Evaluation through lm-evaluation-harness: this project's tasks, runs, tables, and lm-eval's own command line.

The model is ``overfill`` (:mod:`overfill_lib.lm_eval_model`, registered with lm-eval on import). Here: the data the
project's task YAMLs read (the synthetic suite, a full model's held-out answers), upstream task formats over local
files, :func:`evaluate` (``lm_eval.simple_evaluate`` with our tasks on the include path, results written atomically)
and tables of several runs. Model arguments and tasks are described in docs/evaluation.md. As a command, lm-eval's
CLI with the ``overfill`` model and our tasks::

    python -m overfill_lib.evaluation --model overfill --model_args full=DIR --tasks overfill_suite
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from overfill_lib.artifacts import PROJECT_ROOT, atomic_write_text, environment_record, read_json
from overfill_lib.lm_eval_model import OverFillLM  # noqa: F401  (importing it registers the `overfill` model)

log = logging.getLogger(__name__)

LM_TASKS_DIR = Path(__file__).parent / "lm_tasks"
SUITE_TASKS = "overfill_suite"
SUITE_ENV = "OVERFILL_SUITE_DIR"
DEFAULT_SUITE_PRESET = "tiny"

# --------------------------------------------------------------------------------------------------
# The synthetic suite as lm-eval tasks (the YAMLs in lm_tasks/overfill_suite call these)
# --------------------------------------------------------------------------------------------------


def _project_relative(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` expanded, relative paths taken from the project root (any cwd works)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def _preset(name: str):
    """The named preset (the lm-eval tasks' ``preset=NAME`` metadata), loaded through the one preset loader."""
    from overfill_lib.presets import load_preset

    return load_preset(name)


def resolve_suite_dir(suite_dir: str | os.PathLike | None = None, preset: str | None = None) -> Path:
    """Where the suite's JSONL splits are: ``suite_dir``, else the ``preset``'s, else ``$OVERFILL_SUITE_DIR``,
    else the offline default preset's. Relative paths are taken from the project root (any cwd works)."""
    if suite_dir is None and preset is not None:
        suite_dir = _preset(preset).suite_dir
        if suite_dir is None:
            raise ValueError(f"preset {preset!r} has no synthetic suite (suite_dir is null)")
    if suite_dir is None:
        suite_dir = os.environ.get(SUITE_ENV) or None
    if suite_dir is None:
        suite_dir = _preset(DEFAULT_SUITE_PRESET).suite_dir
    path = _project_relative(suite_dir)
    if not (path / "test.jsonl").is_file():
        raise ValueError(
            f"no synthetic suite at {path} (test.jsonl missing). Create it with overfill_lib.tasks.write_suite (or "
            f"pipeline.suite(preset)), or point the tasks elsewhere: evaluate(..., suite_dir=DIR), "
            f"--metadata suite_dir=DIR or preset=NAME, or ${SUITE_ENV}=DIR"
        )
    return path.resolve()


def load_suite_dataset(suite_dir: str | None = None, preset: str | None = None, **_task_metadata):
    """``custom_dataset`` of the suite tasks: the local test and validation JSONL files as a DatasetDict.

    lm-eval calls it with the task metadata (which includes ``--metadata`` and, from the CLI, the model
    arguments), hence the catch-all. The files are read with the ``json`` builder and absolute
    ``data_files``, which is what ``dataset_path: json`` would do if a YAML could name a cwd-independent path.
    """
    import datasets

    root = resolve_suite_dir(suite_dir, preset)
    # Validation serves as the few-shot pool (held out from test); train is not needed to evaluate.
    files = {split: str(root / f"{split}.jsonl") for split in ("test", "validation") if (root / f"{split}.jsonl").is_file()}
    return datasets.load_dataset("json", data_files=files)


def family_docs(family: str):
    """``process_docs`` for one family: the records whose ``family`` field is ``family``."""

    def select(dataset):
        return dataset.select([i for i, f in enumerate(dataset["family"]) if f == family])

    select.__name__ = f"{family}_docs"
    return select


# --------------------------------------------------------------------------------------------------
# Upstream task formats over local files
# --------------------------------------------------------------------------------------------------


def read_task_yaml(path: str | os.PathLike) -> dict:
    """A task YAML as data, its ``include`` s merged (local keys win) and ``!function`` tags kept as text.

    Only to read split names and the task name: lm-eval itself loads the file when it runs.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    path = Path(path)
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader) or {}  # noqa: S506 (SafeLoader subclass)
    includes = config.pop("include", None) or []
    merged: dict = {}
    for include in [includes] if isinstance(includes, str) else includes:
        merged.update(read_task_yaml(Path(include) if Path(include).is_absolute() else path.parent / include))
    return merged | config


def find_task_yaml(name: str) -> Path:
    """The YAML file defining lm-eval's built-in task ``name`` (a text search: no full task index needed)."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    pattern = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.MULTILINE)
    files = sorted(root.rglob("*.yaml"))
    # Files named after the task (gsm8k-cot-llama.yaml for gsm8k_cot_llama) first: usually no full scan.
    named = [p for p in files if p.stem.replace("-", "_") == name.replace("-", "_")]
    for path in named + files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if pattern.search(text) and read_task_yaml(path).get("task") == name:
            return path
    raise ValueError(f"no built-in lm-eval task named {name!r}; `python -m overfill_lib.evaluation ls tasks` lists them")


def local_task(
    upstream: str | os.PathLike,
    data_files: str | os.PathLike | Mapping[str, str | os.PathLike],
    directory: str | os.PathLike,
    *,
    task: str | None = None,
    **overrides: Any,
) -> Path:
    """Write ``directory/<task>.yaml``: an upstream task's configuration over local data in its schema.

    The YAML ``include`` s the upstream file (by absolute path), so prompt, few-shot examples, stop
    sequences, filters and metrics are the upstream ones; only the data source changes to
    ``dataset_path: json`` with absolute ``data_files`` ({split: file}; a single file is the test split).
    ``overrides`` set any other task field. Returns the YAML path; put ``directory`` on the include path.
    """
    import yaml

    source = Path(upstream) if str(upstream).endswith(".yaml") else find_task_yaml(str(upstream))
    if not source.is_file():
        raise ValueError(f"no task file {source}; give an lm-eval task name or an existing task YAML")
    base = read_task_yaml(source)
    files = dict(data_files) if isinstance(data_files, Mapping) else {"test": data_files}
    resolved = {}
    for split, file in files.items():
        path = Path(file).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"data file for split {split!r} not found: {path}")
        resolved[split] = str(path)
    config: dict[str, Any] = {
        "include": str(source.resolve()),
        "task": task or f"{base.get('task', source.stem)}_local",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": resolved},
        "tag": [],  # not a member of the upstream task's tags or groups
    }
    test_split = base.get("test_split")
    if test_split and test_split not in resolved:
        raise ValueError(f"{source.name} evaluates split {test_split!r}; give data_files={{{test_split!r}: FILE}}")
    for key in ("training_split", "validation_split"):
        if base.get(key) and base[key] not in resolved:
            config[key] = None  # unused for evaluation when the test split is present
    fewshot_split = base.get("fewshot_split")
    if fewshot_split and fewshot_split not in resolved and not overrides.get("num_fewshot") == 0:
        raise ValueError(
            f"{source.name} draws few-shot examples from split {fewshot_split!r}; add it to data_files or pass num_fewshot=0"
        )
    config.update(overrides)
    out = Path(directory) / f"{config['task']}.yaml"
    atomic_write_text(out, yaml.safe_dump(config, sort_keys=False))
    return out


# --------------------------------------------------------------------------------------------------
# A full model's held-out answers as an lm-eval task (lm_tasks/overfill_chat calls these)
# --------------------------------------------------------------------------------------------------

CHAT_TASK = "overfill_chat"


def resolve_chat_dir(data_dir: str | os.PathLike | None = None, preset: str | None = None) -> Path:
    """Where the chat task's ``test.jsonl`` is: ``data_dir``, else the ``preset``'s self-distilled data
    (its ``distill.dir``, else ``training.data``). Relative paths are taken from the project root."""
    if data_dir is None and preset is not None:
        p = _preset(preset)
        if p.distill is not None:
            data_dir = p.distill.dir
        elif p.training.data != "suite":  # the suite is no chat folder; its own tasks are overfill_suite
            data_dir = p.training.data
    if data_dir is None:
        raise ValueError(f"task {CHAT_TASK} needs its data: --metadata data_dir=DIR (a folder with test.jsonl, e.g. "
                         "data/distill-smollm2-135m) or preset=NAME, or evaluate(..., metadata={'data_dir': DIR})")
    path = _project_relative(data_dir)
    if not (path / "test.jsonl").is_file():
        raise ValueError(f"no test.jsonl in {path}; make the data with `python -m overfill_lib.pipeline distill --preset NAME`")
    return path.resolve()


def _metadata_tokenizer(metadata: Mapping[str, Any]):
    """The evaluated model's tokenizer, from the model arguments lm-eval passes as task metadata."""
    from transformers import AutoTokenizer

    from overfill_lib.artifacts import resolve_model

    for key in ("tokenizer", "full", "pretrained", "decoder"):
        name = metadata.get(key)
        if isinstance(name, (str, os.PathLike)) and str(name):
            return AutoTokenizer.from_pretrained(resolve_model(name))
    raise ValueError(f"task {CHAT_TASK} counts answer tokens with the model's tokenizer: give model_args with "
                     "pretrained= or full= (a directory), or --metadata tokenizer=DIR")


def load_chat_dataset(data_dir: str | None = None, preset: str | None = None, **metadata):
    """``custom_dataset`` of ``overfill_chat``: the test split of chat records whose last turn is the full model's
    answer, one document per record with the fields the YAML reads.

    ``target`` is the answer followed by the tokenizer's end-of-turn token and ``answer_tokens`` counts both as
    training and ``fidelity`` encode them (answer tokens + end-of-turn), so the task's per-token ``nll`` is
    ``fidelity.answer_fidelity``'s. Run with ``--apply_chat_template``: ``system`` (empty when the record has no
    system turn) becomes the system message and ``user`` the user message.
    """
    import datasets

    from overfill_lib.chat_data import load_conversations, to_messages

    root = resolve_chat_dir(data_dir, preset)
    tokenizer = _metadata_tokenizer(metadata)
    eos = tokenizer.eos_token
    docs = []
    for i, record in enumerate(load_conversations(root, "test")):
        try:  # training's content rule (text parts joined; None, numbers and other parts refused)
            messages = to_messages({k: v for k, v in record.items() if k in ("messages", "conversations")})
        except ValueError as e:
            raise ValueError(f"{root / 'test.jsonl'} record {i + 1}: {e}") from None
        roles = [m["role"] for m in messages]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            raise ValueError(f"{root / 'test.jsonl'} record {i + 1}: {CHAT_TASK} scores single-turn chats "
                             f"([system,] user, assistant), got roles {roles}")
        answer = messages[-1]["content"]
        docs.append({"system": messages[0]["content"] if roles[0] == "system" else "", "user": messages[-2]["content"],
                     "target": answer + eos,
                     "answer_tokens": len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# --------------------------------------------------------------------------------------------------
# Running lm-eval
# --------------------------------------------------------------------------------------------------


def task_manager(tasks: Sequence[str], include_path: Sequence[str | os.PathLike] = (), metadata: dict | None = None):
    """A TaskManager over our task directory (plus ``include_path``), with lm-eval's built-in tasks only when
    a requested name is not ours (indexing the built-ins takes seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(LM_TASKS_DIR), *(str(Path(p).resolve()) for p in include_path)]
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata or {})
    if all(t in manager.all_tasks for t in tasks):
        return manager
    return TaskManager(include_path=paths, include_defaults=True, metadata=metadata or {})


def evaluate(
    model_args: str | dict | Any,
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] = (),
    suite_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    apply_chat_template: bool = True,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
    gen_kwargs: dict | str | None = None,
    log_samples: bool = False,
    output_path: str | os.PathLike | None = None,
    metadata: dict | None = None,
    model: str = "overfill",
    **simple_evaluate_kwargs: Any,
) -> dict:
    """Run lm-eval (``lm_eval.simple_evaluate``) and return its results dict; write it to ``output_path``.

    ``model_args``: the ``overfill`` model's arguments (string ``"full=X,decoder=Y"`` or dict), or an
    already built lm-eval model (an ``OverFillLM`` reused across calls). ``tasks``: our task names (e.g.
    ``overfill_suite``), names from ``include_path`` directories, or any lm-eval task. ``suite_dir``: the
    synthetic suite to read (default: ``$OVERFILL_SUITE_DIR`` or the tiny preset's). Chat templates are on by
    default (instruction-tuned models; the suite tasks need them), few-shot as multi-turn with them.

    The JSON file has lm-eval's own output format (what its CLI writes: results, groups, configs, versions,
    n-shot, n-samples, config, task_hashes, timing) plus an ``overfill`` block (suite dir, environment);
    with ``log_samples`` the per-document records go to ``<stem>_samples_<task>.jsonl`` beside it. Writes
    are atomic.
    """
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM
    from lm_eval.loggers import EvaluationTracker

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no tasks given; e.g. tasks=['overfill_suite'] or an lm-eval task name")
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    lm = model_args if isinstance(model_args, LM) else None
    meta = _task_metadata(metadata, suite_dir, lm)
    manager = task_manager(tasks, includes, meta)
    tracker = EvaluationTracker()
    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = apply_chat_template
    results = simple_evaluate(
        model=lm if lm is not None else model,
        model_args=None if lm is not None else model_args,
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        system_instruction=system_instruction,
        gen_kwargs=gen_kwargs,
        log_samples=log_samples,
        task_manager=manager,
        evaluation_tracker=tracker,
        **simple_evaluate_kwargs,
    )
    if results is None:  # non-zero ranks in a distributed run
        return {}
    samples = results.pop("samples", None)
    tracker.general_config_tracker.log_end_time()
    results["task_hashes"] = _task_hashes(samples)
    results.update(asdict(tracker.general_config_tracker))
    results["overfill"] = _run_record(results, tasks, includes, meta, device)
    if output_path is not None:
        write_results(results, output_path, samples)
    if samples is not None:
        results["samples"] = samples
    return results


def _task_metadata(metadata: dict | None, suite_dir: str | os.PathLike | None, lm: Any) -> dict:
    """The task metadata lm-eval hands our tasks: the caller's, the resolved suite, and a built model's tokenizer."""
    meta = dict(metadata or {})
    if suite_dir is not None:
        meta["suite_dir"] = str(resolve_suite_dir(suite_dir))
    # Tasks that count tokens (overfill_chat) read the tokenizer from the metadata, as the CLI's model_args give it.
    source = getattr(getattr(lm, "tokenizer", None), "name_or_path", None)
    if source and Path(source).is_dir():
        meta.setdefault("tokenizer", str(source))
    return meta


def _run_record(results: dict, tasks: list[str], includes: list, meta: dict, device: str | None) -> dict:
    """The ``overfill`` block of a results file: what was asked for, which suite, and the machine that ran it."""
    model_device = ((results["config"].get("overfill") or {}).get("environment") or {}).get("device")
    return {
        "tasks": tasks,
        "include_path": [str(LM_TASKS_DIR), *map(str, includes)],
        "suite_dir": meta.get("suite_dir") or os.environ.get(SUITE_ENV),
        "environment": environment_record(device=model_device or device, seed=results["config"].get("random_seed")),
    }


def _task_hashes(samples: dict | None) -> dict[str, str]:
    # The per-task fingerprint lm-eval's EvaluationTracker stores (only computable with samples).
    from lm_eval.utils import hash_string

    if not samples:
        return {}
    return {
        task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))
        for task, rows in samples.items()
    }


def _dumps(obj, **kw) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(obj, default=handle_non_serializable, ensure_ascii=False, **kw)


def write_results(results: dict, path: str | os.PathLike, samples: dict | None = None) -> Path:
    """Write a results dict (lm-eval format) and optional per-task samples (JSONL beside it), atomically."""
    path = Path(path)
    if path.suffix != ".json":
        raise ValueError(f"output_path must be a .json file, got {path}")
    payload = {k: v for k, v in results.items() if k != "samples"}
    atomic_write_text(path, _dumps(payload, indent=2) + "\n")
    for task, rows in (samples or {}).items():
        atomic_write_text(path.with_name(f"{path.stem}_samples_{task}.jsonl"), "".join(_dumps(r) + "\n" for r in rows))
    log.info("lm-eval results written to %s", path)
    return path


def load_results(path: str | os.PathLike) -> dict:
    return read_json(path)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ["run", "task", "metric", "filter", "value", "stderr", "samples", "is_group"]


def results_table(runs: Mapping[str, dict | str | os.PathLike]):
    """Long DataFrame of several runs: one row per (run, task or group, metric, filter).

    ``runs`` maps a label ("full", "pruned", "OverFill", "finetuned", ...) to a results dict from
    :func:`evaluate` or the path of a results JSON (ours or lm-eval CLI's).
    """
    import math

    import pandas as pd

    rows = []
    for run, res in runs.items():
        res = res if isinstance(res, Mapping) else load_results(res)
        groups = set(res.get("groups") or {})
        counts = res.get("n-samples") or {}
        for task, metrics in (res.get("results") or {}).items():
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key:
                    continue  # alias, sample counts, and the stderr read below
                metric, filt = key.split(",", 1)
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                rows.append(
                    {
                        "run": run,
                        "task": task,
                        "metric": metric,
                        "filter": filt,
                        "value": float(value),
                        "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                        "samples": (counts.get(task) or {}).get("effective"),
                        "is_group": task in groups,
                    }
                )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def compare_runs(table, metric: str | None = None, filter: str | None = None):
    """Wide view of :func:`results_table`: rows (task, metric, filter), one column per run (in run order)."""
    if metric is not None:
        table = table[table["metric"] == metric]
    if filter is not None:
        table = table[table["filter"] == filter]
    runs = list(dict.fromkeys(table["run"]))
    wide = table.pivot_table(index=["task", "metric", "filter"], columns="run", values="value", sort=False)
    return wide[runs]


# --------------------------------------------------------------------------------------------------
# Command line: lm-eval's own, with the overfill model registered and our tasks on the include path
# --------------------------------------------------------------------------------------------------

_TASK_COMMANDS = ("run", "ls", "validate")


def with_our_tasks(args: Sequence[str]) -> list[str]:
    """The command line with ``--include_path <our lm_tasks>`` added where lm-eval reads tasks and none is given."""
    args = list(args)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args) or any(a in ("-h", "--help") for a in args):
        return args
    command = args[0] if args else None
    # lm-eval inserts `run` itself when no subcommand is given and there are arguments.
    if command in _TASK_COMMANDS or (command is not None and command.startswith("-")):
        return [*args, "--include_path", str(LM_TASKS_DIR)]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m overfill_lib.evaluation ARGS``: lm-eval's CLI (the ``overfill`` model is registered on import)."""
    from lm_eval.__main__ import cli_evaluate

    args = with_our_tasks(sys.argv[1:] if argv is None else argv)
    # lm-eval's parser reads sys.argv itself.
    saved = sys.argv
    sys.argv = [saved[0] if saved else "overfill_lib.evaluation", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
