"""Decoder training: the OverFill objective is the pair's scoring path, the full model stays frozen,
baselines score the same tokens, runs resume, and a two-process data-parallel run works on CPU.

Micro models (hidden 32, 2 layers) built here; the whole file runs in well under a minute on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from overfill_lib import chat_data, full_model, importance, pruning, tasks, training
from overfill_lib.artifacts import PROJECT_ROOT
from overfill_lib.generation import returned_cache, with_cache
from overfill_lib.pair import OverFillModel

torch.set_num_threads(1)
MICRO = full_model.FullModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def recipe(**kw) -> training.TrainingConfig:
    base = dict(steps=3, batch_size=8, learning_rate=3e-3, logging_steps=1, save_steps=100, max_length=128)
    return training.TrainingConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A micro full model, its magnitude-pruned half-width decoder, a smaller model, and 8 suite examples."""
    root = tmp_path_factory.mktemp("train")
    tok = full_model.build_tokenizer()
    for name, cfg in (("full", MICRO), ("smaller", MICRO.narrower(0.5))):
        model = full_model.build_model(cfg, tok)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    full = AutoModelForCausalLM.from_pretrained(root / "full")
    pruned, record = pruning.prune_width(full, importance.compute_importance(full, criterion="magnitude"),
                                         hidden=0.5, intermediate=0.5)
    pruning.save_pruned(pruned, record, root / "decoder", tokenizer=tok)
    suite_dir = tasks.write_suite(tasks.SuiteConfig(n_train=8, n_validation=1, n_test=1), root / "suite")
    dataset, stats = chat_data.prepare_chat_data("suite", tok, suite_dir=suite_dir)
    sources = training.Sources(root / "full", root / "decoder", root / "smaller")
    return {"root": root, "tok": tok, "dataset": dataset, "sources": sources}


def load_full(setup):
    return AutoModelForCausalLM.from_pretrained(setup["sources"].full_dir).eval()


def first_logged_loss(result) -> float:
    return training.loss_history(result.log_history)[0]["loss"]


class OptimizerSpy(TrainerCallback):
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.ids = {id(p) for g in optimizer.param_groups for p in g["params"]}


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_registry_and_recipe_refuse_unknown_names():
    assert set(training.OBJECTIVES) >= {"overfill", "pruned", "scratch", "full", "smaller", "overfill_kd", "pruned_kd"}
    with pytest.raises(ValueError, match=r"unknown objective or baseline 'prunned'; valid names: overfill .*pruned"):
        training.get_objective("prunned")
    with pytest.raises(ValueError, match="unknown objective"):
        training.TrainingConfig.from_dict({"objectives": ["overfill", "distill"]})
    with pytest.raises(ValueError, match=r"training: unknown keys \['lr'\]; valid keys"):
        training.TrainingConfig.from_dict({"lr": 1e-3})


def test_objective_seeds_plan_the_runs_seed_major():
    cfg = training.TrainingConfig.from_dict({"objectives": ["overfill", "pruned", "overfill_kd"], "seeds": [0, 1],
                                             "objective_seeds": {"overfill_kd": [0]}})
    assert cfg.runs() == [("overfill", 0), ("pruned", 0), ("overfill_kd", 0), ("overfill", 1), ("pruned", 1)]
    assert cfg.runs(["pruned"], [3]) == [("pruned", 3)] and cfg.seeds_for("pruned") == (0, 1)
    # Which objectives get which seeds does not change what one run is.
    other = training.TrainingConfig.from_dict({"objectives": ["pruned"], "seeds": [5]})
    sources = training.Sources(Path("."), Path("."))
    sources.fingerprint = lambda objective: "same models"
    assert training.run_fingerprint("pruned", 0, cfg, sources, {}) == training.run_fingerprint("pruned", 0, other, sources, {})
    with pytest.raises(ValueError, match="not in training.objectives"):
        training.TrainingConfig.from_dict({"objectives": ["overfill"], "objective_seeds": {"pruned": [0]}})
    with pytest.raises(ValueError, match="non-empty list"):
        training.TrainingConfig.from_dict({"objectives": ["overfill"], "objective_seeds": {"overfill": []}})


def test_step0_loss_is_the_pairs_scoring_nll_and_only_the_decoder_learns(setup, tmp_path):
    sources, ds, tok = setup["sources"], setup["dataset"], setup["tok"]
    full = load_full(setup)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    # The pair's own scoring of the whole dataset (= the first batch: 8 examples, batch size 8), before training.
    decoder0 = AutoModelForCausalLM.from_pretrained(sources.decoder_dir).eval()
    scored = OverFillModel(full, decoder0, tokenizer=tok).score(ds["prompt_ids"], ds["response_ids"], batch_size=3)
    nll = -sum(lp for lp, _ in scored) / sum(len(r) for r in ds["response_ids"])

    spy = OptimizerSpy()
    result = training.train("overfill", sources, ds, recipe(), tmp_path / "run", full=full, callbacks=[spy])
    assert result.complete and result.steps == 3
    assert first_logged_loss(result) == pytest.approx(nll, abs=1e-5)

    pair = result.model
    assert pair.full is full
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, before[name]), f"full-model tensor {name} changed"
    assert not any(p.requires_grad for p in full.parameters())
    assert spy.ids == {id(p) for p in pair.decoder.parameters()} and not spy.ids & {id(p) for p in full.parameters()}
    changed = [k for k, v in pair.decoder.state_dict().items() if not torch.equal(v, decoder0.state_dict()[k])]
    assert len(changed) == len(decoder0.state_dict())
    # The finished run is a loadable pair (safetensors, no pickle) with its logs.
    again = training.load_trained(result, full=full)
    assert isinstance(again, OverFillModel)
    for k, v in again.decoder.state_dict().items():
        assert torch.equal(v, pair.decoder.state_dict()[k])
    files = {p.name for p in result.model_dir.iterdir()}
    assert "model.safetensors" in files and "overfill_config.json" in files and not any(f.endswith(".bin") for f in files)
    header = (result.run_dir / "log.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "learning_rate", "tokens_per_s"} <= set(header)
    assert all(h["tokens_per_s"] > 0 for h in training.loss_history(json.loads((result.run_dir / "log.json").read_text())))


def reference_kl(full, decoder, ds, overfill: bool) -> float:
    """Mean KL(full || student) per response token, each example alone, from the two models' own logits: the
    student is the decoder alone, or (``overfill``) the full model for token 0 and the decoder reading its prompt
    cache after; token 0's KL is then 0 and, as in the OverFill loss, counted (include_first_token)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(ds["prompt_ids"], ds["response_ids"]):
            ids = torch.tensor([p + r])
            teacher_lp = torch.log_softmax(full(ids).logits[0, len(p) - 1 : -1].double(), -1)
            if overfill:
                prefill = full(torch.tensor([p]), use_cache=True)
                rest = decoder(torch.tensor([r[:-1]]), **with_cache(decoder, returned_cache(prefill))).logits[0]
                student = torch.cat([prefill.logits[0, -1:], rest])
            else:
                student = decoder(ids).logits[0, len(p) - 1 : -1]
            student_lp = torch.log_softmax(student.double(), -1)
            total += float((teacher_lp.exp() * (teacher_lp - student_lp)).sum())
            count += len(r)
    return total / count


@pytest.mark.parametrize("objective", ["overfill_kd", "pruned_kd"])
def test_distillation_step0_loss_is_the_kl_from_both_models_logits_and_only_the_decoder_learns(setup, tmp_path,
                                                                                                objective):
    sources, ds = setup["sources"], setup["dataset"]
    full = load_full(setup)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    decoder0 = AutoModelForCausalLM.from_pretrained(sources.decoder_dir).eval()
    expected = reference_kl(full, decoder0, ds, overfill=objective == "overfill_kd")
    spy = OptimizerSpy()
    result = training.train(objective, sources, ds, recipe(), tmp_path / "run", full=full, callbacks=[spy])
    assert result.complete and first_logged_loss(result) == pytest.approx(expected, rel=1e-4)
    assert all(torch.equal(t, before[k]) for k, t in full.state_dict().items())
    decoder = result.model.decoder if objective == "overfill_kd" else result.model
    assert spy.ids == {id(p) for p in decoder.parameters()} and not spy.ids & {id(p) for p in full.parameters()}
    assert any(not torch.equal(v, decoder0.state_dict()[k]) for k, v in decoder.state_dict().items())
    assert result.record["parameters"]["full"] == sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("objective", ["pruned", "scratch", "full", "smaller"])
def test_baselines_score_the_same_response_tokens(setup, tmp_path, objective):
    sources, ds = setup["sources"], setup["dataset"]
    model_dir = {"pruned": sources.decoder_dir, "full": sources.full_dir, "smaller": sources.smaller_dir}.get(objective)
    result = training.train(objective, sources, ds, recipe(steps=1), tmp_path / "run")
    trained = result.model
    if objective == "scratch":  # the decoder's architecture, not its weights
        decoder = AutoModelForCausalLM.from_pretrained(sources.decoder_dir)
        assert trained.config.hidden_size == decoder.config.hidden_size
        assert sum(p.numel() for p in trained.parameters()) == sum(p.numel() for p in decoder.parameters())
        return
    # Step 0: the causal-LM loss is the model's mean NLL over exactly the response tokens.
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(ds["prompt_ids"], ds["response_ids"]):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)
            total -= float(logp.gather(-1, torch.tensor(r)[:, None]).sum())
            count += len(r)
    assert first_logged_loss(result) == pytest.approx(total / count, abs=1e-5)


def test_interrupted_run_resumes_to_the_same_curve(setup, tmp_path):
    sources, ds = setup["sources"], setup["dataset"]
    cfg = recipe(steps=6, save_steps=3, batch_size=4)
    full = load_full(setup)
    straight = training.train("overfill", sources, ds, cfg, tmp_path / "a", full=full)
    cut = training.train("overfill", sources, ds, cfg, tmp_path / "b", full=full, callbacks=[StopAt(3)])
    assert not cut.complete and cut.steps == 3 and not (tmp_path / "b" / "record.json").exists()
    resumed = training.train("overfill", sources, ds, cfg, tmp_path / "b", full=full)
    assert resumed.complete and resumed.steps == straight.steps == 6
    assert resumed.record["resumed_from"].endswith("checkpoint-3")
    a = [h["loss"] for h in training.loss_history(straight.log_history)]
    b = [h["loss"] for h in training.loss_history(resumed.log_history)]
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_a_run_resumes_only_under_its_own_recipe_and_data(setup, tmp_path):
    """A checkpoint resumed after the learning rate (or the data) changed would make one run of two recipes while
    its record claims the last: refused, naming both values. A longer budget is a legitimate resume."""
    sources, ds = setup["sources"], setup["dataset"]
    full = load_full(setup)
    cfg = recipe(steps=4, save_steps=2, batch_size=4, learning_rate=1e-3)
    cut = training.train("pruned", sources, ds, cfg, tmp_path / "run", full=full, callbacks=[StopAt(2)])
    assert not cut.complete and (tmp_path / "run" / "identity.json").is_file()
    with pytest.raises(ValueError, match=r"(?s)another recipe.*learning_rate: was 0\.001, now 0\.5.*resume=False"):
        training.train("pruned", sources, ds, recipe(steps=4, save_steps=2, batch_size=4, learning_rate=0.5),
                       tmp_path / "run", full=full)
    with pytest.raises(ValueError, match=r"(?s)another recipe.*data\.(examples|sample_sha256)"):
        training.train("pruned", sources, ds.select(range(6)), cfg, tmp_path / "run", full=full)
    longer = training.train("pruned", sources, ds, recipe(steps=6, save_steps=2, batch_size=4, learning_rate=1e-3),
                            tmp_path / "run", full=full)
    assert longer.complete and longer.steps == 6 and longer.record["resumed_from"].endswith("checkpoint-2")
    fresh = training.train("pruned", sources, ds, recipe(steps=2, batch_size=4, learning_rate=0.5), tmp_path / "run",
                           full=full, resume=False)  # starting over is always allowed, and re-records the identity
    assert fresh.complete and json.loads((tmp_path / "run" / "identity.json").read_text())["recipe"]["learning_rate"] == 0.5


def test_a_seed_or_objective_listed_twice_is_refused():
    with pytest.raises(ValueError, match=r"training.seeds lists 0 more than once \(\[0, 0\]\).*count twice"):
        training.TrainingConfig.from_dict({"seeds": [0, 0]})
    with pytest.raises(ValueError, match="training.objectives lists 'pruned' more than once"):
        training.TrainingConfig.from_dict({"objectives": ["overfill", "pruned", "pruned"]})
    with pytest.raises(ValueError, match=r"training.objective_seeds.pruned lists 1 more than once"):
        training.TrainingConfig.from_dict({"objectives": ["pruned"], "objective_seeds": {"pruned": [1, 1]}})


@pytest.mark.parametrize("objective", ["overfill", "pruned"])
def test_validation_probe_logs_fidelity_at_step_0_every_n_steps_and_the_end(setup, tmp_path, objective):
    """``eval_steps``: the probe's step-0 entry is the untrained model's fidelity on the held-out records, later
    entries follow training (the model changes), and the token axis counts the examples' tokens."""
    from overfill_lib import scoring

    sources, ds = setup["sources"], setup["dataset"]
    full = load_full(setup)
    held = [dict(r) for r in chat_data.load_conversations("suite", "train", suite_dir=setup["root"] / "suite")][:4]
    decoder0 = AutoModelForCausalLM.from_pretrained(sources.decoder_dir).eval()
    untrained = scoring.answer_fidelity(OverFillModel(full, decoder0) if objective == "overfill" else decoder0,
                                         setup["tok"], held)
    result = training.train(objective, sources, ds, recipe(steps=5, batch_size=4, eval_steps=2), tmp_path / "run",
                            full=full, probe_records=held)
    probes = training.probe_history(result.log_history)
    assert [p["step"] for p in probes] == [0, 2, 4, 5]
    assert probes[0]["eval_nll"] == pytest.approx(untrained["nll"], abs=1e-4) and probes[0]["tokens_seen"] == 0
    assert probes[-1]["eval_nll"] < probes[0]["eval_nll"]  # it learns the suite (these records are in its data)
    per_example = [len(p) + len(r) for p, r in zip(ds["prompt_ids"], ds["response_ids"])]
    assert 0 < probes[1]["tokens_seen"] < probes[-1]["tokens_seen"] <= 5 * 4 * max(per_example)
    with pytest.raises(ValueError, match="probe_records"):
        training.train(objective, sources, ds, recipe(steps=1, eval_steps=1), tmp_path / "again", full=full)
    with pytest.raises(ValueError, match="eval_steps"):
        recipe(eval_steps=0)


def test_a_checkpoint_cut_short_is_set_aside_and_the_run_resumes_from_the_last_whole_one(setup, tmp_path):
    """A kill during a checkpoint save leaves an empty folder or a truncated optimizer state: the rerun resumes
    from the newest whole checkpoint (the same curve as an uninterrupted run) and keeps the broken ones aside."""
    import shutil

    sources, ds = setup["sources"], setup["dataset"]
    cfg = recipe(steps=6, save_steps=2, batch_size=4)
    full = load_full(setup)
    straight = training.train("overfill", sources, ds, cfg, tmp_path / "a", full=full)
    cut = training.train("overfill", sources, ds, cfg, tmp_path / "b", full=full, callbacks=[StopAt(4)])
    ckpts = tmp_path / "b" / "checkpoints"
    assert not cut.complete and (ckpts / "checkpoint-4").is_dir()
    shutil.copytree(ckpts / "checkpoint-4", ckpts / "checkpoint-5")
    with open(ckpts / "checkpoint-5" / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    (ckpts / "checkpoint-6").mkdir()  # the folder a kill -9 left before anything was written into it
    assert training.checkpoint_problem(ckpts / "checkpoint-6").startswith("trainer_state.json unreadable")
    assert training.checkpoint_problem(ckpts / "checkpoint-5") == "optimizer.pt truncated"
    resumed = training.train("overfill", sources, ds, cfg, tmp_path / "b", full=full)
    assert resumed.complete and resumed.record["resumed_from"].endswith("checkpoint-4")
    assert (ckpts / "incomplete-checkpoint-5").is_dir() and (ckpts / "incomplete-checkpoint-6").is_dir()
    a = [h["loss"] for h in training.loss_history(straight.log_history)]
    b = [h["loss"] for h in training.loss_history(resumed.log_history)]
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_a_second_training_of_the_same_run_folder_is_refused(setup, tmp_path):
    import json
    import os
    import socket

    sources, ds = setup["sources"], setup["dataset"]
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}))
    with pytest.raises(RuntimeError, match=f"being trained by pid {os.getpid()}.*delete .*lock"):
        training.train("pruned", sources, ds, recipe(steps=1), run)
    # A lock left by a process that is gone is taken over, and released when the run ends.
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 12345, "started": "then"}))
    assert training.train("pruned", sources, ds, recipe(steps=1), run).complete and not (run / ".lock").exists()



@pytest.mark.parametrize("content", ["", "{\"host\": ", "[]"], ids=["empty", "cut", "a list"])
def test_a_lock_that_names_no_holder_says_so(tmp_path, content):
    """A training killed between creating its lock and writing it: the message said 'pid None on None'."""
    (tmp_path / ".lock").write_text(content)
    with pytest.raises(RuntimeError, match=rf"{tmp_path / '.lock'} names no holder .*If no training of {tmp_path} "
                                           rf"is running, delete {tmp_path / '.lock'}"):
        with training.RunLock(tmp_path):
            pass
    assert (tmp_path / ".lock").read_text() == content  # not taken over: who holds it cannot be told

def test_tokenizer_mismatch_and_trainable_strategy_are_refused(setup, tmp_path):
    sources, ds = setup["sources"], setup["dataset"]
    other = tmp_path / "other"
    decoder = AutoModelForCausalLM.from_pretrained(sources.decoder_dir)
    decoder.save_pretrained(other)
    tok = full_model.build_tokenizer()
    tok.add_tokens(["<|tool|>"])
    tok.save_pretrained(other)
    bad = training.Sources(sources.full_dir, other, sources.smaller_dir)
    with pytest.raises(ValueError, match="different tokenizer"):
        training.train("overfill", bad, ds, recipe(), tmp_path / "run")
    with pytest.raises(ValueError, match="trainable weights"):
        training.train("overfill", sources, ds, recipe(strategy="kv_projection"), tmp_path / "run2")


@pytest.mark.xdist_group("notebooks")
def test_two_process_data_parallel_run_on_cpu(tmp_path):
    """``accelerate launch --num_processes 2`` on CPU (gloo) of the smoke preset, a few steps.

    The CPU choice comes from the config's ``use_cpu``: accelerate's ``--cpu`` flag starts a single process
    unless mpirun is set up, which would not test data parallelism at all.
    """
    override = {"workdir": str(tmp_path / "work"), "training": {"batch_size": 4, "logging_steps": 1, "save_steps": 2}}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(training.CONFIG_DIR / "cpu_ddp.yaml"), "--num_processes", "2",
           "-m", "overfill_lib.pipeline", "train", "--preset", "smoke", "--objective", "overfill", "--steps", "3",
           "--override", json.dumps(override)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "work" / "training").glob("overfill-seed0-*"))
    assert len(runs) == 1
    record = json.loads((runs[0] / "record.json").read_text())
    assert record["complete"] and record["steps"] == 3 and record["world_size"] == 2
    assert (runs[0] / "model" / "overfill_config.json").is_file()
    assert len(training.loss_history(record["log_history"])) == 3


def test_shipped_accelerate_configs_load_and_reference_their_deepspeed_json():
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"cpu_ddp": "MULTI_GPU", "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}
    for name, kind in kinds.items():
        cfg = load_config_from_file(str(training.CONFIG_DIR / f"{name}.yaml"))
        assert cfg.distributed_type.value == kind
    ds = yaml.safe_load((training.CONFIG_DIR / "deepspeed_zero3.yaml").read_text())["deepspeed_config"]
    ds_json = json.loads((PROJECT_ROOT / ds["deepspeed_config_file"]).read_text())
    assert ds_json["zero_optimization"]["stage"] == 3 and "optimizer" not in ds_json  # the Trainer's AdamW + cosine
    fsdp = yaml.safe_load((training.CONFIG_DIR / "fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # the unwrapped full model needs real weights on every rank


def test_batch_runs_show_a_bar_not_the_trainers_per_step_tables(monkeypatch):
    from transformers.utils.notebook import NotebookProgressCallback

    class FakeTrainer:
        def __init__(self):
            self.callbacks = [NotebookProgressCallback()]

        def remove_callback(self, kind):
            self.callbacks = [c for c in self.callbacks if not isinstance(c, kind)]

        def add_callback(self, kind):
            self.callbacks.append(kind())

    interactive = FakeTrainer()
    monkeypatch.delenv("OVERFILL_BATCH", raising=False)
    monkeypatch.delenv("PAPERMILL_INPUT_PATH", raising=False)
    training.batch_progress(interactive)
    assert [type(c) for c in interactive.callbacks] == [NotebookProgressCallback]
    batch = FakeTrainer()
    monkeypatch.setenv("OVERFILL_BATCH", "1")
    training.batch_progress(batch)
    assert [type(c) for c in batch.callbacks] == [training.BarOnly]
