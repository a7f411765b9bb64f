"""OverFill sharded for real: FSDP2 on two CPU processes (gloo) trains the tiny pair through the project's Trainer,
with the same per-step loss as one process at the same global batch, a sharded checkpoint that a killed run
resumes from on the same curve, and a final pair that loads as an ordinary one; the planner's memory arithmetic
against what those processes held; the shipped ZeRO-3 config as far as this machine can check it.

Two 2-process launches (the killed run and its resume) take most of the time: the file ran in 44 s on 2 cores
shared with a training job.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from transformers import AutoConfig

from overfill_lib import distributed, full_model, importance, pipeline, planner, pruning, training
from overfill_lib.artifacts import PROJECT_ROOT
from overfill_lib.pair import OverFillModel
from overfill_lib.presets import load_preset
from tests.tiny_models import tiny_model

STEPS, CRASH_AT = 6, 3
# One process accumulates the two micro-batches that two processes compute side by side, so both average the same
# two per-micro-batch means: the losses agree to float rounding (measured: identical to the last digit).
LOSS_RTOL = 1e-5
# FSDP2 pads each parameter's first dimension to a multiple of the processes; the planner does not.
STATE_RTOL = 0.05
ACTIVATION_RTOL = 0.02  # the planner counts the Llama layer's saved tensors per operation (measured: within 0.1%)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight tiny full model (tests/tiny_models.py) with the suite's tokenizer, a preset that names it,
    and its pruned decoder built here, so the launched processes only train."""
    root = tmp_path_factory.mktemp("fsdp")
    tok = full_model.build_tokenizer()
    full = tiny_model("llama", vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    full.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    (root / "full" / "training_record.json").write_text(json.dumps({"note": "random weights, tests/tiny_models.py"}))
    raw = load_preset("smoke").to_dict()
    raw.update(name="fsdp-tiny", workdir=str(root / "work"), suite_dir=str(root / "suite"))
    raw["suite"] = {"seed": 0, "n_train": 64, "n_validation": 4, "n_test": 4}
    raw["full_model"]["id"] = str(root / "full")
    raw["smaller"]["id"] = str(root / "smaller")
    raw["training"].update(steps=STEPS, batch_size=4, learning_rate=3e-3, logging_steps=1, save_steps=CRASH_AT,
                           max_length=128, warmup_steps=1)
    (root / "preset.yaml").write_text(yaml.safe_dump(raw))
    preset = load_preset(root / "preset.yaml")
    decoder_dir = pipeline.pruned_decoder(preset)
    return {"root": root, "preset": preset, "preset_path": str(root / "preset.yaml"), "decoder_dir": decoder_dir}


def losses(run_dir):
    return {h["step"]: h["loss"] for h in distributed.run_losses(run_dir)}


def workdir_for(tiny, name):
    """A workdir of its own (runs of one recipe share a folder name whatever the world size) with the decoder."""
    work = tiny["root"] / name
    work.mkdir(exist_ok=True)
    if not (work / "pruned_decoder").exists():
        (work / "pruned_decoder").symlink_to(tiny["decoder_dir"])
    return work


@pytest.fixture(scope="module")
def single(tiny):
    """The reference: one process, in this one, accumulating 2 micro-batches of 4 (global batch 8)."""
    preset = load_preset(tiny["preset_path"], {"workdir": str(workdir_for(tiny, "single"))})
    config = dataclasses.replace(training.TrainingConfig.from_preset(preset), grad_accum=2)
    return pipeline.training_run(preset, "overfill", config=config)


@pytest.fixture(scope="module")
def fsdp(tiny):
    """2-process FSDP2 with global batch 8, killed (SIGKILL) right after its sharded checkpoint at step 3, then
    relaunched: it resumes from that checkpoint and finishes."""
    work = workdir_for(tiny, "fsdp")
    mem = tiny["root"] / "mem-fsdp"
    crashed = distributed.launch("fsdp", tiny["preset_path"], work, STEPS, {}, mem,
                                 extra=["--crash-after-save", str(CRASH_AT)], timeout=300)
    runs = list((work / "training").glob("overfill-seed0-*"))
    assert crashed.returncode != 0 and len(runs) == 1, crashed.stdout[-2000:] + crashed.stderr[-3000:]
    killed = {"checkpoints": sorted(p.name for p in (runs[0] / "checkpoints").iterdir()),
              "record": (runs[0] / "record.json").exists(), "model": (runs[0] / "model").exists()}
    resumed = distributed.launch("fsdp", tiny["preset_path"], work, STEPS, {}, mem, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    return {"run_dir": runs[0], "killed": killed, "memory": distributed.memory_records(mem)}


@pytest.mark.xdist_group("distributed")  # one worker runs the launches (module fixtures)
def test_fsdp_on_cpu_matches_one_process_resumes_from_a_sharded_checkpoint_and_saves_a_pair(tiny, single, fsdp):
    run_dir = fsdp["run_dir"]
    # Killed after step 3: a sharded checkpoint (each process's shard, torch.distributed.checkpoint), nothing final.
    assert fsdp["killed"] == {"checkpoints": [f"checkpoint-{CRASH_AT}"], "record": False, "model": False}
    ckpt = run_dir / "checkpoints" / f"checkpoint-{CRASH_AT}"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert training.checkpoint_problem(ckpt) is None
    record = json.loads((run_dir / "record.json").read_text())
    assert record["complete"] and record["world_size"] == 2 and record["resumed_from"].endswith(f"checkpoint-{CRASH_AT}")
    assert all(m["distributed_type"] == "DistributedType.FSDP" for m in fsdp["memory"])

    # The killed-and-resumed sharded run follows the one-process curve step for step.
    ref, got = losses(single.run_dir), losses(run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=LOSS_RTOL), (step, got[step], ref[step])
    assert len(set(ref.values())) > 1  # the loss moves: equality is not of a constant

    # The gathered result is an ordinary pair, with the weights one process trained.
    pair = OverFillModel.from_pretrained(run_dir / "model")
    trained = single.model.decoder.state_dict()
    gathered = pair.decoder.state_dict()
    assert gathered.keys() == trained.keys()
    for name, value in gathered.items():
        torch.testing.assert_close(value, trained[name].to(value.dtype), rtol=1e-4, atol=1e-5, msg=name)
    out = pair.chat([[{"role": "user", "content": "abc"}]], max_new_tokens=3)
    assert len(out.texts) == 1


@pytest.mark.xdist_group("distributed")
def test_planner_state_memory_matches_what_each_fsdp_process_held(tiny, fsdp):
    full, decoder = (AutoConfig.from_pretrained(d) for d in (tiny["root"] / "full", tiny["decoder_dir"]))
    predicted = planner.memory_per_device(full, decoder, "fsdp", 2, planner.Workload(4, 16, 8), "fp32")
    unsharded = planner.memory_per_device(full, decoder, "ddp", 1, planner.Workload(4, 16, 8), "fp32")
    for held in fsdp["memory"]:
        assert held["full_model"] == predicted["full_weights"]  # replicated, exactly
        for measured, part in (("parameters", "decoder_weights"), ("gradients", "decoder_gradients"),
                               ("optimizer", "optimizer")):
            if measured in held:  # gradients are measured at step 1, which the resumed process did not run
                assert held[measured] == pytest.approx(predicted[part], rel=STATE_RTOL), measured
                assert held[measured] < 0.6 * unsharded[part]  # sharded, not replicated


def test_cpu_fsdp_config_is_the_gpu_configs_twin():
    """The CPU config the tests run differs from the shipped GPU one only where a CPU must."""
    gpu, cpu = (yaml.safe_load((training.CONFIG_DIR / f"{n}.yaml").read_text()) for n in ("fsdp", "cpu_fsdp"))
    assert gpu["fsdp_config"] == cpu["fsdp_config"]
    assert cpu["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"  # resumable (checkpoint_problem)
    assert {k for k in gpu.keys() | cpu.keys() if gpu.get(k) != cpu.get(k)} <= {
        "use_cpu", "mixed_precision", "num_processes", "main_process_port"}
    assert cpu["use_cpu"] and cpu["num_processes"] == 2 and cpu["mixed_precision"] == "no"


@pytest.mark.parametrize("arch,batch,prompt,response", [("llama", 4, 20, 12), ("qwen2", 2, 7, 30)])
def test_planner_activation_count_matches_the_tensors_saved_for_backward(arch, batch, prompt, response):
    """The decoder's activations as the planner counts them against the bytes autograd keeps for one OverFill loss."""
    full = tiny_model(arch)
    decoder, _ = pruning.prune_width(full, importance.compute_importance(full, criterion="magnitude"),
                                     hidden=0.5, intermediate=0.5)
    pair = OverFillModel(full, decoder.train())
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(3, 96, (batch, prompt), generator=gen)
    continuation = torch.randint(3, 96, (batch, response), generator=gen)
    with distributed.SavedTensors() as saved:
        pair.loss(context, continuation, torch.ones_like(context), torch.ones_like(continuation),
                  include_first_token=True)
    predicted = planner.activation_bytes(decoder.config, planner.Workload(batch, prompt, response), "fp32")
    assert saved.bytes == pytest.approx(predicted["total"], rel=ACTIVATION_RTOL)
    # Checkpointing keeps one layer's worth, not every layer's.
    assert planner.activation_bytes(decoder.config, planner.Workload(batch, prompt, response), "fp32",
                                    checkpointing=True)["total"] < predicted["total"]


def test_plan_picks_the_cheapest_layout_that_fits():
    from overfill_lib.latency import real_size_pairs

    full, decoder = real_size_pairs()["llama-3.1-8b"]
    work = planner.Workload(batch=2, prompt=1024, response=1024, grad_accum=8)
    one = planner.plan(full, decoder, 1, 80, work)
    assert [r["layout"] for r in one] == ["ddp", "ddp_ckpt"]  # nothing to shard over on one device
    eight = {r["layout"]: r for r in planner.plan(full, decoder, 8, 80, work)}
    mem = {k: r["memory"] for k, r in eight.items()}
    # Sharding divides the decoder's 16 bytes per parameter by 8; the replicated full model does not shrink.
    assert mem["fsdp"]["optimizer"] * 8 == pytest.approx(mem["ddp"]["optimizer"], rel=1e-9)
    assert mem["fsdp"]["full_weights"] == mem["ddp"]["full_weights"] == 2 * pruning.count_parameters(full)
    assert mem["fsdp_full"]["full_weights"] * 8 == pytest.approx(mem["fsdp"]["full_weights"], rel=1e-9)
    chosen = [k for k, r in eight.items() if r["chosen"]]
    assert len(chosen) == 1 and eight[chosen[0]]["fits"]
    assert all(not eight[k]["fits"] for k in planner.PREFERENCE[:planner.PREFERENCE.index(chosen[0])] if k in eight)
    b = eight["fsdp"]["bounds"]
    assert b["bound"] in ("compute", "memory", "communication") and b["tokens_per_s"] > 0
    with pytest.raises(ValueError, match="unknown layout"):
        planner.get_layout("zero2")


def test_shipped_zero3_config_is_accepted_by_accelerate_and_deepspeeds_checker():
    """DeepSpeed does not train here (docs/distributed.md says what was tried); its config is checked as far as the
    installed packages allow: accelerate reads the launcher config and every "auto" sits where the Trainer fills
    one; the next test has the Trainer fill them and DeepSpeed's own config class validate the result."""
    from accelerate.commands.config.config_args import load_config_from_file

    launcher = load_config_from_file(str(training.CONFIG_DIR / "deepspeed_zero3.yaml"))
    assert launcher.distributed_type.value == "DEEPSPEED" and launcher.num_processes == 8
    ds = json.loads((PROJECT_ROOT / launcher.deepspeed_config["deepspeed_config_file"]).read_text())
    autos = {f"{k}.{kk}" if isinstance(v, dict) else k for k, v in ds.items()
             for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)]) if vv == "auto"}
    fills = {"bf16.enabled", "fp16.enabled", "zero_optimization.reduce_bucket_size",
             "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
             "gradient_accumulation_steps", "gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu"}
    assert autos <= fills, autos - fills  # transformers' HfTrainerDeepSpeedConfig fills exactly these
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_shipped_zero3_config_filled_by_the_trainer_passes_deepspeeds_checker():
    """With deepspeed importable (``pip install deepspeed``, on a GPU node; skipped otherwise: it is no dependency of
    the workbook, and environment.yml would have to carry it too)."""
    deepspeed_config = pytest.importorskip("deepspeed.runtime.config")
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=4, gradient_accumulation_steps=4,
                             max_grad_norm=1.0, use_cpu=True, report_to=[])
    ds = json.loads((training.CONFIG_DIR / "ds_zero3.json").read_text())
    hf = HfTrainerDeepSpeedConfig(ds)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, tiny_model("llama"), num_training_steps=10)
    assert "auto" not in json.dumps(hf.config)
    checked = deepspeed_config.DeepSpeedConfig(hf.config)
    assert checked.zero_optimization_stage == 3 and checked.zero_config.gather_16bit_weights_on_model_save
    assert checked.train_micro_batch_size_per_gpu == 4 and checked.gradient_accumulation_steps == 4
