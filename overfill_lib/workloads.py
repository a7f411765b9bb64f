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
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from overfill_lib import corpus, pipeline, scoring, tasks


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
