"""Evaluation through lm-evaluation-harness: the ``overfill`` model, this project's tasks, runs and tables.

``OverFillLM`` subclasses lm-eval's ``HFLM`` and replaces only the two calls that reach the network: scoring
(``OverFillModel.score``: the full model prefills the context and scores the first continuation token, the decoder
the rest) and generation (``OverFillModel.generate``). A single model runs as an identity pair, which computes what
the plain model computes (tested against ``hf``), so the rows of a comparison share one code path. Model arguments
and tasks are described in docs/evaluation.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from tqdm.auto import tqdm

from overfill_lib.artifacts import PROJECT_ROOT, atomic_write_text, environment_record, load_causal_lm, read_json
from overfill_lib.config import torch_dtype
from overfill_lib.pair import CONFIG_NAME, OverFillModel

log = logging.getLogger(__name__)

LM_TASKS_DIR = Path(__file__).parent / "lm_tasks"
SUITE_TASKS = "overfill_suite"
SUITE_ENV = "OVERFILL_SUITE_DIR"
DEFAULT_SUITE_PRESET = "tiny"

# HFLM options that still act here: they shape prompts and tokens, not model loading. HFLM's loading
# options (parallelize, peft, quantization, ...) belong to its own loader, which is not used.
HF_PASSTHROUGH = frozenset(
    {
        "add_bos_token",
        "prefix_token_id",
        "truncation",
        "chat_template_args",
        "enable_thinking",
        "think_end_token",
        "use_fast_tokenizer",
        "max_batch_size",
    }
)


# --------------------------------------------------------------------------------------------------
# Loading what to evaluate
# --------------------------------------------------------------------------------------------------


def _device(device: str | torch.device | None) -> torch.device:
    available = "cuda" if torch.cuda.is_available() else "cpu"
    if device is None:
        return torch.device(available)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's CLI defaults to cuda:0; like its hf model, fall back rather than fail on a CPU box.
        log.warning("device %s requested but CUDA is not available: evaluating on cpu", device)
        return torch.device("cpu")
    return device


def _load_causal_lm(model_id: str | os.PathLike, dtype, revision: str | None):
    from overfill_lib.artifacts import resolve_model

    path = resolve_model(model_id, revision=revision)
    kw = {} if dtype is None else {"dtype": dtype}
    return load_causal_lm(path, "model", **kw).eval(), path


def is_saved_pair(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by ``OverFillModel.save_pretrained``."""
    for candidate in (Path(path), PROJECT_ROOT / str(path)):
        if (candidate / CONFIG_NAME).is_file():
            return True
    return False


def load_models(
    pretrained: Any = None,
    full: Any = None,
    decoder: Any = None,
    *,
    strategy: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> tuple[OverFillModel, str, str | None]:
    """The pair to evaluate, its role, and where its tokenizer can be loaded from.

    Role: ``overfill`` (a real pair), ``full`` / ``decoder`` (one of them alone) or ``model`` (any single
    model given as ``pretrained``). A single model becomes an identity pair ``OverFillModel(m, m)``.
    Arguments may be paths / hub ids, or loaded objects (an ``OverFillModel`` or a ``PreTrainedModel``).
    """
    from transformers import PreTrainedModel

    if pretrained is None and full is None and decoder is None:
        raise ValueError(
            "nothing to evaluate: give pretrained=DIR (a saved OverFill pair or one model), or full=ID,decoder=DIR "
            "(a pair), or only full=ID / only decoder=DIR (one model alone)"
        )
    if pretrained is not None and (full is not None or decoder is not None):
        raise ValueError(
            "give either pretrained=... or full=.../decoder=..., not both (pretrained names a saved pair or a single model)"
        )
    dtype = torch_dtype(dtype, "dtype")
    device = _device(device)
    source: str | None = None

    def alone(model, name, role):
        return OverFillModel(model, model, "shared_kv", full_id=name), role

    if pretrained is not None:
        if isinstance(pretrained, OverFillModel):
            pair = pretrained
            role = "model" if pair.full is pair.decoder else "overfill"
        elif isinstance(pretrained, PreTrainedModel):
            pair, role = alone(pretrained.eval(), getattr(pretrained.config, "_name_or_path", None) or None, "model")
        elif is_saved_pair(pretrained):
            path = Path(pretrained) if Path(pretrained).is_dir() else PROJECT_ROOT / str(pretrained)
            pair = OverFillModel.from_pretrained(path, dtype=dtype, revision=revision)
            role, source = "overfill", str(path)
        else:
            model, path = _load_causal_lm(pretrained, dtype, revision)
            (pair, role), source = alone(model, str(pretrained), "model"), str(path)
    elif full is not None and decoder is not None:
        if isinstance(full, PreTrainedModel) and isinstance(decoder, PreTrainedModel):
            pair = OverFillModel(full, decoder, strategy or "shared_kv")
        elif isinstance(full, (str, os.PathLike)) and isinstance(decoder, (str, os.PathLike)):
            pair = OverFillModel.from_models(full, decoder, strategy, dtype=dtype)
            from overfill_lib.artifacts import resolve_model

            source = str(resolve_model(full, revision=revision))
        else:
            raise ValueError("full= and decoder= must both be paths/hub ids or both be loaded models")
        role = "overfill"
    else:
        role = "full" if full is not None else "decoder"
        one = full if full is not None else decoder
        if isinstance(one, PreTrainedModel):
            pair, role = alone(one.eval(), getattr(one.config, "_name_or_path", None) or None, role)
        else:
            model, path = _load_causal_lm(one, dtype, revision)
            (pair, role), source = alone(model, str(one), role), str(path)
    pair.to(device)
    pair.eval()
    if pair.tokenizer is None and source is None and pair.full_id and role == "overfill":
        from overfill_lib.artifacts import resolve_model

        source = str(resolve_model(pair.full_id, revision=revision))
    return pair, role, source


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return 1
    text = str(value)
    if text.startswith("auto"):
        raise ValueError(
            "batch_size='auto' is not supported by the overfill model (its probe measures the hf forward, not the "
            "two-stage scoring and generation paths); give an integer, e.g. batch_size=16"
        )
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return size


# --------------------------------------------------------------------------------------------------
# The lm-eval model
# --------------------------------------------------------------------------------------------------


@register_model("overfill")
class OverFillLM(HFLM):
    """lm-eval model for an OverFill pair, or one model through the same path (see the module docstring).

    Args (all also accepted as ``--model_args`` strings):
        pretrained: a saved pair directory, or one causal LM (directory, hub id, or loaded model), or an
            ``OverFillModel`` instance.
        full, decoder: the pair's two models (ids/paths or loaded models); one of them alone evaluates that
            model alone. ``strategy``: pairing strategy for ``full=``/``decoder=`` (default: inferred).
        tokenizer: tokenizer path or instance (default: the pair's, else the full model's directory).
        dtype, device, batch_size, max_length: as for lm-eval's ``hf`` model (``batch_size`` an integer).
        refresh_every: prefill refresh period N for ``generate_until`` (0: never); scoring ignores it.
        revision: hub revision for models named by hub id.
        Other HFLM prompt/tokenization options pass through: add_bos_token, prefix_token_id, truncation,
        chat_template_args, enable_thinking, think_end_token, use_fast_tokenizer.
    """

    def __init__(
        self,
        pretrained: Any = None,
        full: Any = None,
        decoder: Any = None,
        strategy: str | None = None,
        tokenizer: Any = None,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = None,
        batch_size: int | str | None = 1,
        refresh_every: int = 0,
        max_length: int | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - HF_PASSTHROUGH)
        if unknown:
            raise ValueError(
                f"unknown overfill model argument(s) {unknown}; valid: pretrained, full, decoder, strategy, tokenizer, "
                f"dtype, device, batch_size, refresh_every, max_length, revision, {', '.join(sorted(HF_PASSTHROUGH))}"
            )
        if trust_remote_code:
            raise ValueError("trust_remote_code is off in this project; use models whose architecture transformers ships")
        batch_size = _batch_size(batch_size)
        refresh_every = int(refresh_every or 0)
        if refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0 (0: no prefill refresh), got {refresh_every}")
        pair, role, source = load_models(
            pretrained, full, decoder, strategy=strategy, dtype=dtype, device=device, revision=revision
        )
        tok = self._tokenizer_for(pair, tokenizer, source)
        super().__init__(pretrained=pair.full, tokenizer=tok, batch_size=batch_size, max_length=max_length, **kwargs)
        self.pair = pair
        self.role = role
        self.refresh_every = refresh_every
        self.revision = revision
        # What was evaluated, by name: for a model alone the pair's "full" slot holds that model.
        decoder_name = getattr(pair.decoder.config, "_name_or_path", None) or None
        self._names = {
            "overfill": {"full": pair.full_id, "decoder": decoder_name},
            "full": {"full": pair.full_id},
            "decoder": {"decoder": pair.full_id},
            "model": {"model": pair.full_id},
        }[role]
        self._warned_refresh = False
        log.info("overfill lm-eval model: role=%s strategy=%s device=%s", role, pair.strategy_name, self.device)

    @staticmethod
    def _tokenizer_for(pair: OverFillModel, tokenizer: Any, source: str | None):
        from transformers import AutoTokenizer

        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(str(tokenizer))
        if pair.tokenizer is not None:
            return pair.tokenizer
        candidates = [source, getattr(pair.full.config, "_name_or_path", None)]
        for candidate in candidates:
            if candidate and (Path(candidate) / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(candidate)
        raise ValueError("no tokenizer found for this model; pass tokenizer=PATH (a directory holding tokenizer files)")

    # -- scoring ----------------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """HFLM's split, except after a line break that is a token of its own.

        lm-eval moves a context's trailing whitespace into the continuation so that ``"Answer:" + " Paris"`` keeps
        the word's leading-space token. A chat template ends the prompt with a line break after the assistant
        header; when the context's tokens are already a prefix of the whole string's, moving it only changes who
        reads that token. Keeping it in the context lets the full model prefill the whole prompt, as in
        generation, and scores exactly the answer tokens (so ``overfill_chat`` gives ``fidelity``'s numbers). A
        single model then differs from lm-eval's ``hf`` only by that line break's own log-prob, the same for every
        candidate continuation; spaces are moved as lm-eval moves them.
        """
        if "\n" in context[len(context.rstrip()) :]:
            whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
            if len(whole) > len(head) and whole[: len(head)] == head:
                return head, whole[len(head) :]
        return super()._encode_pair(context, continuation)

    def _fit_window(self, context: list[int], continuation: list[int]) -> list[int]:
        """Left-truncate the context exactly as HFLM does: the model sees at most ``max_length`` tokens.

        HFLM feeds ``(context + continuation)[-(max_length + 1):][:-1]``; the pair sees the context and all
        but the last continuation token, so it keeps the last ``max_length + 1 - len(continuation)`` context tokens.
        """
        keep = self.max_length + 1 - len(continuation)
        if keep < 1:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}; "
                "raise max_length in the model arguments"
            )
        return context[-keep:] if len(context) > keep else context

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self.refresh_every and not self._warned_refresh:
            log.warning("refresh_every=%d applies to generation only; log-likelihoods are scored without refresh", self.refresh_every)
            self._warned_refresh = True
        # Longest first, as HFLM sorts: batches pad little and an out-of-memory shows up at once.
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        answers: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="overfill loglikelihood")
        for chunk in collator.get_batched(n=override_bs or self.batch_size):
            scored = [i for i, (_, _, cont) in enumerate(chunk) if cont]
            results: list[tuple[float, bool]] = [(0.0, True)] * len(chunk)  # an empty continuation has log-prob 0
            if scored:
                contexts = [self._fit_window(chunk[i][1], chunk[i][2]) for i in scored]
                continuations = [chunk[i][2] for i in scored]
                for i, answer in zip(scored, self.pair.score(contexts, continuations, batch_size=len(scored))):
                    results[i] = answer
            for (request, _, _), answer in zip(chunk, results):
                answers.append(answer)
                if request is not None:  # rolling windows are cached per document by the caller
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                pbar.update(1)
        pbar.close()
        return collator.get_original(answers)

    # -- generation -------------------------------------------------------------------------------

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """Two-stage generation with the task's stop sequences; returns prompt + new ids like ``generate``."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        # lm-eval's greedy convention, as in HFLM: temperature 0 (or unset) without do_sample means greedy.
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample")
        if generation_kwargs["temperature"] == 0.0 and do_sample is None:
            generation_kwargs["do_sample"] = do_sample = False
        if do_sample is False and generation_kwargs["temperature"] == 0.0:
            generation_kwargs.pop("temperature")
        out = self.pair.generate(
            context,
            attention_mask,
            tokenizer=self.tokenizer,
            max_new_tokens=max_length - context.shape[1],
            stop_strings=[s for s in stop if s] or None,
            pad_token_id=self.tokenizer.pad_token_id,
            refresh_every=self.refresh_every,
            **generation_kwargs,
        )
        return out.sequences

    # -- provenance -------------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        """Stored in results["config"]: parameter counts, dtype, role and the environment."""

        def count(module) -> int:
            return sum(p.numel() for p in module.parameters())

        full, decoder = self.pair.full, self.pair.decoder
        alone = full is decoder
        total = count(full) if alone else count(full) + count(decoder) + count(self.pair.strategy)
        return {
            "model_num_parameters": total,
            "model_dtype": str(next(full.parameters()).dtype),
            "model_revision": self.revision,
            "model_sha": "",
            "overfill": {
                "role": self.role,
                "strategy": None if alone else self.pair.strategy_name,
                "refresh_every": self.refresh_every,
                "batch_size": self.batch_size,
                "max_length": self.max_length,
                "full_parameters": count(full),
                "decoder_parameters": count(decoder),
                **self._names,
                "environment": environment_record(device=str(self.device)),
            },
        }


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


def suite_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The project's own exact match (``tasks.exact_match``), so lm-eval and ``tasks.score`` agree by construction."""
    from overfill_lib import tasks

    return {"exact_match": float(tasks.exact_match(results[0], doc["messages"][-1]["content"]))}


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
    raise ValueError(f"no built-in lm-eval task named {name!r}; `python -m overfill_lib.evaluate ls tasks` lists them")


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


def chat_process_results(doc: dict, results: list) -> dict:
    """Per document: its answer's summed NLL with its token count (for the per-token mean), and whether greedy
    decoding under teacher forcing reproduces the whole answer."""
    logprob, greedy = results[0]
    return {"nll": (-float(logprob), int(doc["answer_tokens"])), "exact": float(greedy)}


def token_mean(items: list[tuple[float, int]]) -> float:
    """Aggregation of ``nll``: summed NLL over summed tokens (each token weighs the same, as in ``fidelity``)."""
    return sum(n for n, _ in items) / sum(t for _, t in items)


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
    meta = dict(metadata or {})
    if suite_dir is not None:
        meta["suite_dir"] = str(resolve_suite_dir(suite_dir))
    lm = model_args if isinstance(model_args, LM) else None
    # Tasks that count tokens (overfill_chat) read the tokenizer from the metadata, as the CLI's model_args give it.
    source = getattr(getattr(lm, "tokenizer", None), "name_or_path", None)
    if source and Path(source).is_dir():
        meta.setdefault("tokenizer", str(source))
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
    results["overfill"] = {
        "tasks": tasks,
        "include_path": [str(LM_TASKS_DIR), *map(str, includes)],
        "suite_dir": meta.get("suite_dir") or os.environ.get(SUITE_ENV),
        "environment": environment_record(
            device=((results["config"].get("overfill") or {}).get("environment") or {}).get("device") or device,
            seed=results["config"].get("random_seed"),
        ),
    }
    if output_path is not None:
        write_results(results, output_path, samples)
    if samples is not None:
        results["samples"] = samples
    return results


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
