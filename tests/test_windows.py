"""Dense distillation on text windows (windows.py) and the long runs built on it (recovery.py): the window
objective's step-0 loss is the KL computed independently from both models' logits, the cached top-k KL is the
exact KL of the coarsened distributions, and a long run killed mid-way resumes to the same curve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, TrainerCallback

from overfill_lib import full_model, importance, pruning, recovery, training, windows
from overfill_lib.generation import returned_cache, with_cache
from overfill_lib.presets import Preset

torch.set_num_threads(1)
MICRO = full_model.FullModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
SPEC = windows.WindowSpec(window=24, context=10, teacher_topk=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A micro full model with O(1) weights (distributions far from uniform), its half-width decoder, windows."""
    root = tmp_path_factory.mktemp("windows")
    tok = full_model.build_tokenizer()
    full = full_model.build_model(MICRO, tok)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1 else 1.0) + (1.0 if p.ndim == 1 else 0))
        full.lm_head.weight.mul_(20)
    full.save_pretrained(root / "full")
    tok.save_pretrained(root / "full")
    full = AutoModelForCausalLM.from_pretrained(root / "full").eval()
    pruned, record = pruning.prune_width(full, importance.compute_importance(full, criterion="magnitude"),
                                         hidden=0.5, intermediate=0.5)
    pruning.save_pruned(pruned, record, root / "decoder", tokenizer=tok)
    rows = torch.randint(3, full.config.vocab_size, (24, SPEC.window), generator=gen).tolist()
    return {"root": root, "tok": tok, "full": full, "windows": rows}


def cache_for(models, rows, spec=SPEC, name="train"):
    from overfill_lib.artifacts import weights_fingerprint

    return windows.TeacherCache(models["root"] / f"cache-{name}-{spec.teacher_topk}", spec, rows,
                                weights_fingerprint(models["full"])).build(models["full"], batch_size=5)


def independent_logits(models, rows, layout):
    """Both models' logits at the scored positions, with plain Hugging Face calls (no library code)."""
    ids = torch.tensor(rows)
    full, decoder = models["full"], AutoModelForCausalLM.from_pretrained(models["root"] / "decoder").eval()
    c = SPEC.context
    with torch.no_grad():
        teacher_logits = full(input_ids=ids).logits[:, c : SPEC.window - 1]  # predicting tokens c+1 .. window-1
        if layout == "pair":
            out = full(input_ids=ids[:, :c], use_cache=True)
            # with_cache / returned_cache only name the cache keyword, which transformers renamed within 5.x
            student = decoder(input_ids=ids[:, c:-1], **with_cache(decoder, returned_cache(out)),
                              position_ids=torch.arange(c, SPEC.window - 1).expand(len(rows), -1)).logits
        else:
            student = decoder(input_ids=ids).logits[:, c : SPEC.window - 1]
    return teacher_logits, student


def bucketed_kl(teacher_logits, student_logits, k):
    """KL over the teacher's top k tokens plus one 'rest' outcome, by hand, in float64."""
    lp, lq = teacher_logits.double().log_softmax(-1), student_logits.double().log_softmax(-1)
    top = lp.topk(k, -1).indices
    lpk, lqk = lp.gather(-1, top), lq.gather(-1, top)
    pr, qr = (1 - lpk.exp().sum(-1)).clamp(min=1e-300), (1 - lqk.exp().sum(-1)).clamp(min=1e-300)
    return (lpk.exp() * (lpk - lqk)).sum(-1) + pr * (pr.log() - qr.log())


def test_topk_kl_is_the_full_kl_with_the_whole_vocabulary_and_the_coarsened_kl_below_it():
    gen = torch.Generator().manual_seed(1)
    t, s = torch.randn(3, 5, 40, generator=gen) * 3, torch.randn(3, 5, 40, generator=gen) * 3
    full_kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    top = t.log_softmax(-1).topk(40, -1)
    assert torch.allclose(windows.topk_kl(s, top.indices, top.values), full_kl, atol=1e-5)
    top = t.log_softmax(-1).topk(6, -1)
    coarse = windows.topk_kl(s, top.indices, top.values)
    assert torch.allclose(coarse.double(), bucketed_kl(t, s, 6), atol=1e-5)
    assert (coarse <= full_kl + 1e-6).all() and (coarse < full_kl - 1e-3).any()


@pytest.mark.parametrize("objective", ["overfill_kd", "pruned_kd"])
def test_window_objective_step0_loss_is_the_kl_from_both_models_logits(models, tmp_path, objective):
    rows = models["windows"][:4]
    for spec in (SPEC, windows.WindowSpec(SPEC.window, SPEC.context, models["full"].config.vocab_size)):
        cache = cache_for(models, rows, spec)
        layout = training.get_objective(objective).layout
        config = training.TrainingConfig(objectives=(objective,), steps=1, batch_size=4, learning_rate=1e-3,
                                         logging_steps=1, save_steps=100, include_first_token=False)
        sources = training.Sources(models["root"] / "full", models["root"] / "decoder")
        result = training.train(objective, sources, windows.WindowDataset(rows, cache), config,
                                tmp_path / f"{objective}-{spec.teacher_topk}", full=models["full"],
                                collator=windows.WindowCollator(spec.context, layout))
        logged = training.loss_history(result.log_history)[0]["loss"]
        teacher_logits, student = independent_logits(models, rows, layout)
        expected = float(bucketed_kl(teacher_logits, student, spec.teacher_topk).mean())
        assert logged > 0.05  # the models differ: a loss of 0 would prove nothing
        assert math.isclose(logged, expected, rel_tol=2e-3, abs_tol=2e-4), (spec.teacher_topk, logged, expected)


def test_teacher_cache_is_tied_to_its_weights_and_windows(models):
    rows = models["windows"][:6]
    cache = cache_for(models, rows, name="tied")
    ids, lp = cache[5]
    assert ids.shape == lp.shape == (SPEC.continuation, SPEC.teacher_topk) and ids.dtype == torch.int32
    assert 0 < cache.summary()["topk_mass_mean"] <= 1
    other = windows.TeacherCache(cache.directory, SPEC, models["windows"][6:12], cache.request["full_model"])
    with pytest.raises(ValueError, match="teacher cache of other windows or weights"):
        other.build(models["full"])


def resources(models, tmp_path, **overrides):
    config = recovery.RecoveryConfig(**{**dict(keep=(0.5,), window=SPEC.window, context=SPEC.context,
                                               teacher_topk=SPEC.teacher_topk, batch_size=2, eval_every=2 * 2 * 13,
                                               test_windows=2000,
                                               warmup_tokens=26, learning_rate=3e-3, validation_windows=4,
                                               flat_evals=2), **overrides})
    preset = Preset("test", {"workdir": str(tmp_path), "runtime": {"device": "cpu", "dtype": "float32"}})
    return recovery.Resources(preset, config, models["root"] / "full", models["full"], models["tok"],
                              cache_for(models, models["windows"][:16], name="run-train"),
                              cache_for(models, models["windows"][16:20], name="run-val"),
                              decoders={0.5: models["root"] / "decoder"})


@pytest.mark.parametrize("objective", ["overfill_kd", "pruned_kd"])
def test_a_long_run_killed_mid_way_resumes_to_the_same_curve(models, tmp_path, monkeypatch, objective):
    tokens = 6 * 2 * 13  # 6 steps of 2 windows x 13 scored tokens; validation every 2 steps
    straight = recovery.train_run(resources(models, tmp_path / "a"), objective, 0.5, 0, tokens, until_flat=False)
    real = recovery.TextProbe.on_step_end

    def killed(self, args, state, control, **kw):
        if state.global_step == 5:
            raise KeyboardInterrupt("killed")
        return real(self, args, state, control, **kw)

    res = resources(models, tmp_path / "b")
    monkeypatch.setattr(recovery.TextProbe, "on_step_end", killed)
    with pytest.raises(KeyboardInterrupt):
        recovery.train_run(res, objective, 0.5, 0, tokens, until_flat=False)
    monkeypatch.setattr(recovery.TextProbe, "on_step_end", real)
    resumed = recovery.train_run(res, objective, 0.5, 0, tokens, until_flat=False)
    assert straight["stopped"] == resumed["stopped"] == "budget" and resumed["steps"] == 6
    assert [h["step"] for h in straight["curve"]] == [0, 2, 4, 6] == [h["step"] for h in resumed["curve"]]
    for a, b in zip(straight["curve"], resumed["curve"]):
        assert a["val_kl"] == pytest.approx(b["val_kl"], abs=1e-5)
    losses = [h["loss"] for h in straight["train_loss"]]
    assert losses == pytest.approx([h["loss"] for h in resumed["train_loss"]], abs=1e-4)
    assert straight["curve"][-1]["val_kl"] < straight["curve"][0]["val_kl"]  # it learned


def test_flat_curve_detection_and_config_checks():
    curve = [{"val_kl": v} for v in (2.0, 1.5, 1.2, 1.19, 1.189)]
    assert recovery.is_flat(curve, flat=0.01, evals=2) and not recovery.is_flat(curve, flat=0.01, evals=3)
    assert not recovery.is_flat(curve[:2], flat=0.01, evals=2)
    with pytest.raises(ValueError, match="lists .* more than once"):
        recovery.RecoveryConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="not a window objective"):
        recovery.RecoveryConfig(objectives=("overfill",))
    with pytest.raises(ValueError, match="at least 2 continuation tokens"):
        recovery.RecoveryConfig(window=10, context=9)
    with pytest.raises(ValueError, match="held-out text needs at least 20k"):
        recovery.RecoveryConfig(test_windows=100)
    with pytest.raises(ValueError, match="recovery.precision"):
        recovery.RecoveryConfig(precision="int8")


def test_bf16_precision_autocasts_the_training_step_on_a_cpu(models, tmp_path):
    """training.precision: bf16 runs the step under autocast (products in bf16) with fp32 weights; its step-0 loss is
    the fp32 one within bf16's precision."""
    rows = models["windows"][:4]
    cache = cache_for(models, rows)
    seen = []
    losses = {}
    for precision in ("fp32", "bf16"):
        config = training.TrainingConfig(objectives=("pruned_kd",), steps=1, batch_size=4, learning_rate=1e-3,
                                         logging_steps=1, save_steps=100, include_first_token=False,
                                         precision=precision)
        sources = training.Sources(models["root"] / "full", models["root"] / "decoder")

        class Spy(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                layer = model.model.layers[0].mlp.down_proj
                layer.register_forward_hook(lambda m, i, o, p=precision: seen.append((p, o.dtype, m.weight.dtype)))

        result = training.train("pruned_kd", sources, windows.WindowDataset(rows, cache), config,
                                tmp_path / precision, full=models["full"], callbacks=[Spy()],
                                collator=windows.WindowCollator(SPEC.context, "causal"))
        losses[precision] = training.loss_history(result.log_history)[0]["loss"]
    assert ("fp32", torch.float32, torch.float32) in seen and ("bf16", torch.bfloat16, torch.float32) in seen
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05) and losses["bf16"] != losses["fp32"]
    with pytest.raises(ValueError, match="training.precision must be one of"):
        training.TrainingConfig(precision="fp16-ish")


def test_scores_of_every_run_with_intervals_and_the_untrained_starting_points(models, tmp_path):
    """``recovery.score_runs`` on micro runs: the full model at KL 0 and agreement 1 on text, every trained run and
    untrained decoder scored, intervals that hold their estimate, and a lead table per width."""
    import json

    from overfill_lib import tasks

    suite = tasks.write_suite(tasks.SuiteConfig(n_train=2, n_validation=1, n_test=6), tmp_path / "suite")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in tasks.load_split(suite, "test")))
    res = resources(models, tmp_path / "work", test_answers=str(answers))
    test = cache_for(models, models["windows"][18:24], name="run-test")
    for objective in recovery.METHODS:
        recovery.train_run(res, objective, 0.5, 0, 2 * 2 * 13, until_flat=False)
    out = recovery.score_runs(res, tmp_path / "recovery.json", test=test)
    results = json.loads(out.read_text())
    full = results["scores"]["full"]["text"]
    assert full["kl"] == pytest.approx(0, abs=1e-4) and full["agreement"] == 1.0
    assert set(results["scores"]) == {"full", "untrained-keep0.5-overfill_kd", "untrained-keep0.5-pruned_kd",
                                      "overfill_kd-keep0.5-seed0", "pruned_kd-keep0.5-seed0"}
    trained = results["scores"]["overfill_kd-keep0.5-seed0"]
    for part, metric in (("text", "kl"), ("text", "agreement"), ("answers", "nll"), ("answers", "agreement")):
        lo, hi = trained[part][f"{metric}_ci"]
        assert lo <= trained[part][metric] <= hi
    table = recovery.scores_frame(results)
    assert table.loc[table["method"] == "OverFill", "recovered"].notna().all()
    assert [row["keep"] for row in recovery.lead(results)] == [0.5]
    # The gap by distance from the prefill adds up to the whole; the paired difference is the difference of means.
    bins = trained["text"]["by_position"]
    assert [b["positions"] for b in bins] == [[1, 4], [5, 13]]  # 13 scored positions per micro window
    assert sum(b["kl"] * b["n"] for b in bins) == pytest.approx(trained["text"]["kl"] * trained["text"]["positions"])
    diff = results["paired"]["keep0.5-seed0"]
    pruned = results["scores"]["pruned_kd-keep0.5-seed0"]
    for metric, part, key in (("text_kl", "text", "kl"), ("answers_agreement", "answers", "agreement")):
        assert diff[metric]["difference"] == pytest.approx(trained[part][key] - pruned[part][key])
        assert diff[metric]["ci"][0] <= diff[metric]["difference"] <= diff[metric]["ci"][1]


def test_a_rescore_reuses_the_scores_of_models_that_did_not_change(models, tmp_path, monkeypatch):
    """Scores are kept per model: after one run trains further, ``score_runs`` scores that run alone again and
    writes the same numbers for the others."""
    import json

    from overfill_lib import tasks

    suite = tasks.write_suite(tasks.SuiteConfig(n_train=2, n_validation=1, n_test=4), tmp_path / "suite")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in tasks.load_split(suite, "test")))
    res = resources(models, tmp_path / "work", objectives=("pruned_kd",), test_answers=str(answers))
    test = cache_for(models, models["windows"][18:24], name="rescore-test")
    recovery.train_run(res, "pruned_kd", 0.5, 0, 2 * 2 * 13, until_flat=False)
    first = json.loads(recovery.score_runs(res, tmp_path / "a.json", test=test).read_text())
    scored = []
    real = windows.text_scores
    monkeypatch.setattr(windows, "text_scores", lambda model, *a, **k: scored.append(model) or real(model, *a, **k))
    again = json.loads(recovery.score_runs(res, tmp_path / "b.json", test=test).read_text())
    assert scored == [] and again["scores"] == first["scores"]
    recovery.train_run(res, "pruned_kd", 0.5, 0, 2 * 2 * 2 * 13, until_flat=False)
    scored.clear()  # the validation probes while training
    moved = json.loads(recovery.score_runs(res, tmp_path / "c.json", test=test).read_text())
    assert len(scored) == 1
    assert moved["scores"]["full"] == first["scores"]["full"]
    assert moved["scores"]["pruned_kd-keep0.5-seed0"] != first["scores"]["pruned_kd-keep0.5-seed0"]


def test_a_paired_bootstrap_is_tight_where_two_separate_intervals_overlap():
    from overfill_lib import scoring

    gen = torch.Generator().manual_seed(0)
    hard = torch.rand(200, generator=gen) * 4  # units differ a lot; the second model is better on every one
    a, b = hard + 0.1, hard
    n = [1] * 200
    diff = scoring.bootstrap_paired((a.tolist(), n), (b.tolist(), n))
    assert diff["difference"] == pytest.approx(0.1) and 0.099 < diff["ci"][0] <= diff["ci"][1] < 0.101
    lo_a, hi_a = scoring.bootstrap_ratio(a.tolist(), n)
    assert lo_a < float(b.mean()) < hi_a  # separately, the intervals overlap
    same = scoring.bootstrap_paired((b.tolist(), n), (b.tolist(), n))
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same units"):
        scoring.bootstrap_paired((a.tolist(), n), (b[:10].tolist(), n[:10]))


@pytest.mark.parametrize("argv,message", [
    (["train", "--tokens", "0"], "0 must be >= 1"),
    (["train", "--tokens", "2.5e4x"], "'2.5e4x' is not a whole number"),
    (["train", "--keep", "1.5"], "a kept fraction is in (0, 1]"),
    (["train", "--keep", "half"], "a kept fraction is in (0, 1]"),
])
def test_the_long_run_command_refuses_a_bad_budget_or_width_before_loading_anything(argv, message, capsys):
    with pytest.raises(SystemExit):
        recovery.main(argv)
    assert message in capsys.readouterr().err


def test_a_token_budget_may_be_written_in_scientific_notation():
    from overfill_lib.config import positive_int

    assert positive_int("1e6") == 1_000_000 and positive_int("25000") == 25_000
