"""What a preset's models are asked to do and what "quality" means: one object per kind of preset.

Two workloads, chosen by the preset (``Preset.workload``):

* ``synthetic``: a synthetic task suite with exact answers; the full model and the smaller model are trained
  here on it. Quality is exact match; the pruning sweep also scores the reply loss on validation records.
* ``pretrained``: a pretrained full model on real text; there are no exact answers, so quality is fidelity to the
  full model's own answers (their NLL, per-token agreement, exact reproduction) and perplexity of held-out text.

The notebooks and the ablation ask the workload (its data, scorers, labels and figure choices) instead of
branching on the kind of preset::

    work = workloads.for_preset(preset)
    measure = work.test_scorer(tokenizer)  # (model, records) -> {metric: value}; work.primary: the headline one
    sweep = work.sweep_scoring(preset, model, tokenizer)  # notebook 01's pruning sweep: loss_only, evaluate, ...
    view = work.full_model_view(preset)  # notebook 00, section by section: view.data(), view.models(), ...
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from overfill_lib import artifacts, corpus, full_model, pipeline, scoring, tasks


@dataclass
class SweepScoring:
    """How notebook 01 scores a pruned model before training: ``loss_only(model)`` (the slider's one number,
    ``primary``) and ``evaluate(model)`` (every column of the sweep, ``metrics``), on data described by ``scope``."""

    primary: str
    metrics: list[str]
    log_metrics: list[str]
    scope: str
    loss_only: Callable[[object], dict]
    evaluate: Callable[[object], dict]
    prompts: list[list[dict]]  # chat prompts for the side-by-side answers (a few per family, or held-out prompts)
    record: dict = field(default_factory=dict)  # what the results JSON keeps beside the sweep (corpus, answers)


class Workload:
    name: str
    description: str
    quality: str  # what the primary score is, in words for titles
    primary: str  # the headline column of test_scorer's scores
    trains_models: bool  # the full model and the smaller model are trained here (the smaller one is also a draft)
    sweep_extras: bool  # notebook 01's heads sweep and per-layer ablation (cheap on tiny models only)

    def test_scorer(self, tokenizer) -> Callable[[object], dict]:
        raise NotImplementedError

    def figure_metrics(self, metrics: list[str]) -> list[str]:
        """The test metrics that share a 0..1 axis in notebook 02's figure."""
        return metrics

    def sweep_scoring(self, preset, model, tokenizer, *, loss_records: int | None = 300, em_records: int = 300,
                      answer_prompts: int = 24) -> SweepScoring:
        raise NotImplementedError

    def check_prompts(self, preset, n: int | None = None) -> list[list[dict]]:
        """Chat prompts for notebook 03's correctness check and acceptance rate."""
        raise NotImplementedError

    def compare(self, lineup: dict, tokenizer, records: list[dict]):
        """Notebook 02's interactive comparison of every model on one prompt."""
        raise NotImplementedError

    def timing_threads(self) -> int:
        """Torch threads for timing on a CPU."""
        raise NotImplementedError

    def full_model_view(self, preset, *, retrain: bool = False, eval_limit: int | None = None,
                        chat_prompts: Sequence[str] = ()) -> FullModelView:
        """Notebook 00's sections for this workload (``FullModelView``); the full model is built or found first."""
        raise NotImplementedError


class SyntheticSuite(Workload):
    name = "synthetic"
    description = "synthetic suite, exact match (full model and smaller model trained here)"
    quality = "exact match per family"
    primary = "overall"
    trains_models = True
    sweep_extras = True

    def test_scorer(self, tokenizer):
        def measure(model, records):
            return scoring.exact_match(model, tokenizer, records)

        return measure

    def sweep_scoring(self, preset, model, tokenizer, *, loss_records=300, em_records=300, answer_prompts=24):
        validation = tasks.load_split(preset.suite_dir, "validation")
        loss_set, em_set = validation[:loss_records], validation[:em_records]
        # Greedy answers are cut one token past the longest reference: anything longer cannot be an exact match.
        max_new = 1 + max(len(tokenizer(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
                          for r in em_set)

        def loss_only(m):
            return {"loss": scoring.reply_loss(m, tokenizer, loss_set)}

        def evaluate(m):
            em = scoring.exact_match(m, tokenizer, em_set, max_new_tokens=max_new, batch_size=len(em_set))
            return loss_only(m) | {"exact_match": em["overall"]}

        return SweepScoring("loss", ["loss", "exact_match"], [],
                            f"{len(loss_set)} loss / {len(em_set)} exact-match validation records", loss_only, evaluate,
                            [r["messages"][:-1] for r in tasks.first_per_family(validation, 1)],
                            {"corpus": None, "reference_answers": None})

    def check_prompts(self, preset, n=None):
        return [r["messages"][:-1] for r in tasks.load_split(preset.suite_dir, "test")[:n or 32]]

    def compare(self, lineup, tokenizer, records):
        from overfill_lib import widgets

        return widgets.compare_answers(lineup, tokenizer, records)

    def timing_threads(self):
        return 1  # the suite's tiny models: more threads only add noise at their size

    def full_model_view(self, preset, *, retrain=False, eval_limit=None, chat_prompts=()):
        return SuiteView(preset, retrain=retrain, eval_limit=eval_limit)


class PretrainedModel(Workload):
    name = "pretrained"
    description = "pretrained full model, fidelity to its own answers"
    quality = "agreement with the full model"
    primary = "nll"
    trains_models = False
    sweep_extras = False  # 30 layers of a real model x the answer NLL: left to the calibration skip loss

    def test_scorer(self, tokenizer):
        windows = corpus.heldout_windows(tokenizer)

        def measure(model, records):
            found = scoring.answer_fidelity(model, tokenizer, records)
            return {k: found[k] for k in ("nll", "agreement", "exact")} | {
                "split_perplexity": scoring.split_perplexity(model, windows, len(windows[0]) // 2, tokenizer=tokenizer)}

        return measure

    def figure_metrics(self, metrics):
        return ["agreement", "exact"]

    def sweep_scoring(self, preset, model, tokenizer, *, loss_records=300, em_records=300, answer_prompts=24):
        from overfill_lib.pair import OverFillModel

        windows = corpus.heldout_windows(tokenizer)
        answers = corpus.reference_answers(model, tokenizer, preset.workdir / "reference_answers.json", n=answer_prompts)
        scope = (f"held-out text: {len(windows)} windows of {len(windows[0])} tokens; {len(answers)} full-model answers "
                 f"({sum(len(tokenizer(r['messages'][-1]['content'])['input_ids']) for r in answers)} tokens)")

        def loss_only(m):
            return {"answer_nll": scoring.reply_loss(m, tokenizer, answers, batch_size=8)}

        def evaluate(m):
            overfill = OverFillModel(model, m, tokenizer=tokenizer)
            return {"perplexity": math.exp(scoring.text_nll(m, windows)), **loss_only(m),
                    "overfill_answer_nll": scoring.reply_loss(overfill, tokenizer, answers, batch_size=8)}

        return SweepScoring("answer_nll", ["perplexity", "answer_nll", "overfill_answer_nll"], ["perplexity"], scope,
                            loss_only, evaluate, [r["messages"][:-1] for r in answers],
                            {"corpus": corpus.describe(), "reference_answers": answers})

    def check_prompts(self, preset, n=None):
        # held-out chat prompts (summarize a passage of Python's help topics) through the model's own template
        return corpus.summary_prompts("heldout", n or 8)

    def compare(self, lineup, tokenizer, records):
        from overfill_lib import widgets

        return widgets.side_by_side(lineup, tokenizer, records)

    def timing_threads(self):
        return os.cpu_count() or 1  # a pretrained model's matrix products do use every core

    def full_model_view(self, preset, *, retrain=False, eval_limit=None, chat_prompts=()):
        return PretrainedView(preset, chat_prompts=chat_prompts)


WORKLOADS: dict[str, Workload] = {w.name: w for w in (SyntheticSuite(), PretrainedModel())}


def for_preset(preset) -> Workload:
    """The workload ``preset`` names (``Preset.workload``: synthetic with a suite, pretrained without)."""
    return WORKLOADS[preset.workload]


def drafts(preset) -> dict:
    """Notebook 03's candidate speculative drafts by name (the untrained pruned decoder, the one trained alone in
    notebook 02 when there is one, and the smaller model trained here when the workload trains one)."""
    found = {"pruned decoder, untrained": pipeline.pruned_decoder(preset),
             "pruned decoder, trained alone (notebook 02)": pipeline.latest_run(preset, "pruned")}
    if for_preset(preset).trains_models:
        found["smaller model, trained (notebook 00)"] = pipeline.model(preset, "smaller")[0]
    return {name: path for name, path in found.items() if path is not None}


# --------------------------------------------------------------------------------------------------
# Notebook 00: the full model, section by section
# --------------------------------------------------------------------------------------------------


@dataclass
class Shown:
    """What one notebook section shows (``Workbook.show`` displays it): tables in order, figures by name (each saved
    as ``<notebook>_<name>``), then lines of text. Empty where the section does not apply to the workload."""

    tables: list = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    text: list[str] = field(default_factory=list)


LABELS = {"full_model": "full model", "smaller": "smaller model"}  # pipeline.MODELS as tables and figures name them


class FullModelView:
    """Notebook 00 for one workload: what the full model is measured on (:meth:`data`), the models (:meth:`models`),
    how well they do (:meth:`quality`), their answers through the chat template (:meth:`answers`), the KV cache
    (:meth:`cache`) and an interactive probe (:meth:`explore`). Each section returns what it shows and adds what the
    results JSON keeps to ``record``; ``seed`` is the seed the results record (None: nothing trained here)."""

    seed: int | None = None

    def __init__(self, preset, retrain: bool = False):
        self.preset = preset
        self.full_dir, self.full_record = pipeline.full_model(preset, retrain=retrain)
        self.model, self.tokenizer = artifacts.load_model(self.full_dir)
        self.record: dict = {"full_model_dir": str(self.full_dir)}

    def data(self) -> Shown:
        raise NotImplementedError

    def models(self) -> Shown:
        raise NotImplementedError

    def quality(self) -> Shown:
        raise NotImplementedError

    def answers(self) -> Shown:
        raise NotImplementedError

    def cache(self) -> Shown:
        return Shown(tables=[full_model.cache_shapes(self.model, self.tokenizer)])

    def explore(self) -> None:
        """An interactive probe of the full model where the workload has one (a widget; nothing otherwise)."""

    def _rendered(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class SuiteView(FullModelView):
    """The synthetic suite: the full model and the smaller model trained here on it, scored by exact match."""

    def __init__(self, preset, retrain: bool = False, eval_limit: int | None = None):
        super().__init__(preset, retrain)
        self.retrain, self.seed = retrain, preset.full_model_config().seed
        suite_dir = pipeline.suite(preset)
        self.splits = {split: len(tasks.load_split(suite_dir, split)) for split in tasks.SPLITS}
        self.suite_dir, self.test = suite_dir, tasks.load_split(suite_dir, "test")[:eval_limit]
        self.record["test_records"] = len(self.test)

    def data(self):
        return Shown(tables=[tasks.examples_table(tasks.first_per_family(self.test, 2))],
                     text=[f"{self.splits} records in {self.suite_dir}"])

    @cached_property
    def _smaller(self) -> tuple[Path, dict, object]:
        """The smaller model (trained first when missing or ``retrain``): its directory, record and weights."""
        smaller_dir, record = pipeline.model(self.preset, "smaller", retrain=self.retrain)
        return smaller_dir, record, artifacts.load_model(smaller_dir)[0]

    @property
    def records(self) -> dict:
        return {"full_model": self.full_record, "smaller": self._smaller[1]}

    def models(self):
        import pandas as pd

        from overfill_lib import plots

        smaller_dir, _, smaller = self._smaller
        table = pd.concat([full_model.describe(m, self.records[k]).assign(model=LABELS[k])
                           for k, m in (("full_model", self.model), ("smaller", smaller))]).set_index("model")
        self.record |= {"smaller_dir": str(smaller_dir)} | {
            key: {k: r[key] for k, r in self.records.items()} for key in ("train_seconds", "parameters")}
        histories = {LABELS[k]: r["log_history"] for k, r in self.records.items()}
        figures = {"training_loss": plots.loss_curves(histories, title="Training loss on reply tokens"),
                   "exact_match_during_training": plots.exact_match_during_training(
                       self.full_record["log_history"], "Full model: validation exact match while training")}
        return Shown(tables=[table], figures=figures)

    def quality(self):
        """Exact match per family on the test split, measured now beside the value stored at training time."""
        import pandas as pd

        from overfill_lib import plots

        scores = {k: scoring.exact_match(m, self.tokenizer, self.test)
                  for k, m in (("full_model", self.model), ("smaller", self._smaller[2]))}
        stored = {k: r["test_exact_match"] for k, r in self.records.items()}
        table = pd.DataFrame({LABELS[k]: v for k, v in scores.items()}
                             | {f"{LABELS[k]} (stored)": v for k, v in stored.items()}).T
        self.record |= {"exact_match": scores, "stored_exact_match": stored}
        figure = plots.bar_by_family({LABELS[k]: v for k, v in scores.items()},
                                     "Test exact match: full model vs smaller model (same recipe)")
        return Shown(tables=[table.style.format("{:.3f}")], figures={"exact_match": figure})

    def answers(self):
        sample = tasks.first_per_family(self.test, 3)
        found = scoring.greedy_answers(self.model, self.tokenizer, sample)
        return Shown(tables=[tasks.examples_table(sample, predictions=found)],
                     text=[self._rendered(sample[0]["messages"][:-1])])

    def explore(self):
        from overfill_lib import widgets

        widgets.ask_full_model(self.model, self.tokenizer, self.test)


class PretrainedView(FullModelView):
    """A pretrained full model: where its weights came from, its chats and its perplexity on held-out text."""

    def __init__(self, preset, chat_prompts: Sequence[str] = ()):
        super().__init__(preset)
        self.chat_prompts, self.corpus = list(chat_prompts), corpus.describe()

    def data(self):
        import pandas as pd

        text = self.record["corpus"] = self.corpus
        return Shown(tables=[pd.DataFrame({s: text[s] for s in corpus.SPLITS}).T])

    def models(self):
        import pandas as pd

        source = self.full_record if self.full_record and "source" in self.full_record else None
        self.record |= {"source": source, "parameters": sum(p.numel() for p in self.model.parameters())}
        tables = [full_model.describe(self.model, self.full_record)]
        if source:  # converted from a GGUF file (gguf_models.source_record)
            tables.append(pd.Series({
                "package": f"{source['source']['package']}=={source['source']['version']}",
                "file in the wheel": source["source"]["file"], "wheel sha256": source["wheel_sha256"],
                "GGUF sha256": source["gguf_sha256"], "GGUF name": source["gguf"]["name"],
                "license": source["gguf"]["license"], "tensor types": source["gguf"]["tensor_types"],
                "stored as": source["stored_dtype"],
                "converted with": {k: source["converted_with"].get(k) for k in ("transformers", "gguf", "torch")},
            }, name="source").to_frame())
        return Shown(tables=tables, text=[] if source else [f"weights found at {self.full_dir}"])

    def quality(self):
        """Perplexity of the held-out help topics (never calibrated on), every token predicted from its window."""
        windows = corpus.heldout_windows(self.tokenizer)
        nll = scoring.text_nll(self.model, windows)
        self.record |= {"heldout_windows": len(windows), "heldout_window_tokens": len(windows[0]),
                        "heldout_nll": nll, "heldout_perplexity": math.exp(nll)}
        line = (f"held-out perplexity {math.exp(nll):.2f} (mean NLL {nll:.4f} nats per token; {len(windows)} windows "
                f"of {len(windows[0])} tokens, Python {self.corpus['python']})")
        return Shown(text=[line])

    def answers(self):
        import pandas as pd

        chats = corpus.answer(self.model, self.tokenizer, [[{"role": "user", "content": p}] for p in self.chat_prompts],
                              max_new_tokens=64)
        self.record["chats"] = chats
        table = pd.DataFrame([{"prompt": r["messages"][0]["content"], "reply": r["messages"][-1]["content"],
                               "ended": r["ended"]} for r in chats])
        return Shown(tables=[table.style.set_properties(**{"white-space": "pre-wrap"})],
                     text=[self._rendered(chats[0]["messages"][:-1])] if chats else [])
