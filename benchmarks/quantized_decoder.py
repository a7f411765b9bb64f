"""What int8 weights cost in quality: OverFill with an int8 decoder against OverFill in fp32 and the full model in int8
(and the same with int8 activations too, w8a8).

Scored as every decoder is (:func:`overfill_lib.scoring.answer_fidelity`): by teacher forcing on the full model's own
greedy answers to held-out prompts (``data/distill-smollm2-135m/test.jsonl`` for SmolLM2), per-token agreement with
the full model's greedy token and NLL of its answer, 95% bootstrap intervals over answers, and paired differences
(both models on the same resampled answers, :func:`overfill_lib.scoring.bootstrap_paired`). The decoder is the
preset's pruned decoder as :mod:`overfill_lib.pipeline` builds it; int8 is :func:`overfill_lib.quantize.quantize_int8`
(per-output-channel weights, fp32 activations), the setting a preset asks for with ``decoder: {weights: int8}``;
w8a8 is ``quantize_int8(model, quantize.W8A8)`` (the activations rounded per block of 32 as well, as llama.cpp's Q8_0
does), ``decoder: {weights: w8a8}``.

    nice -n 19 python -m benchmarks.quantized_decoder --out results/smollm2-135m/quantized_decoder.json
    python -m benchmarks.quantized_decoder --limit 150   # a seeded subset of the answers, said so in the record
    python -m benchmarks.quantized_decoder --decoder-dir artifacts/smollm2-135m/recovery/runs/<run>/model  # trained
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import time
from pathlib import Path

from overfill_lib import pipeline, quantize
from overfill_lib.artifacts import (
    PROJECT_ROOT,
    content_sha256,
    environment_record,
    load_model,
    read_json,
    weights_fingerprint,
    write_json,
)
from overfill_lib.chat_data import load_conversations
from overfill_lib.scoring import answer_fidelity, bootstrap_paired
from overfill_lib.pair import OverFillModel
from overfill_lib.presets import load_preset

log = logging.getLogger(__name__)

# name -> (full model's weights, decoder's weights or None for the full model alone)
MODELS = {
    "full_int8": ("int8", None),
    "overfill_fp32": ("float", "float"),
    "overfill_int8_decoder": ("float", "int8"),
    "overfill_int8_both": ("int8", "int8"),
    "full_w8a8": ("w8a8", None),
    "overfill_w8a8_decoder": ("float", "w8a8"),
}
COMPARISONS = (("overfill_int8_decoder", "overfill_fp32"), ("overfill_int8_decoder", "full_int8"),
               ("overfill_int8_both", "overfill_int8_decoder"), ("overfill_w8a8_decoder", "overfill_fp32"),
               ("overfill_w8a8_decoder", "overfill_int8_decoder"), ("overfill_w8a8_decoder", "full_w8a8"),
               ("full_w8a8", "full_int8"))


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_answer"}


def _relative(path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def _training_of(decoder_dir: Path) -> dict | None:
    """What trained the decoder, when it is a long run's model (its run's ``recovery.json``); None for the pruned
    decoder as pruning left it."""
    run = decoder_dir.parent / "recovery.json"
    if not run.is_file():
        return None
    r = read_json(run)
    return {k: r.get(k) for k in ("objective", "keep", "seed", "tokens", "steps", "stopped", "run_dir")}


def paired(a: dict, b: dict) -> dict:
    """``a - b`` on agreement and NLL over the same answers, with paired 95% intervals."""
    pa, pb = a["per_answer"], b["per_answer"]
    return {"agreement": bootstrap_paired((pa["hits"], pa["tokens"]), (pb["hits"], pb["tokens"])),
            "nll": bootstrap_paired((pa["nll"], pa["tokens"]), (pb["nll"], pb["tokens"]))}


def record(scores: dict, seconds: dict, answers: dict, identity: dict) -> dict:
    """The results JSON: every model scored so far and the comparisons whose two models both are."""
    return {
        "what": "agreement (share of answer tokens where the model's greedy token is the full model's) and NLL per "
                "answer token, by teacher forcing on the full model's greedy held-out answers "
                "(scoring.answer_fidelity); 95% bootstrap intervals over answers; comparisons: a - b on the same "
                "answers with paired 95% intervals (scoring.bootstrap_paired). int8: quantize.quantize_int8 "
                "(symmetric per-output-channel int8 weights, fp32 activations and KV cache), the setting "
                "decoder: {weights: int8}; w8a8: quantize_int8(model, quantize.W8A8) (activations rounded to int8 "
                "per block of 32 too), decoder: {weights: w8a8}; overfill_*: the full model prefills, the decoder "
                "continues",
        "models": {name: {"full_model": MODELS[name][0], "decoder": MODELS[name][1] or "none (full model alone)"}
                   for name in scores},
        "scores": {name: _strip(s) for name, s in scores.items()},
        "comparisons": {f"{a} - {b}": paired(scores[a], scores[b]) for a, b in COMPARISONS
                        if a in scores and b in scores},
        "answers": answers, **identity, "score_seconds": seconds, "environment": environment_record("cpu"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--answers", default="data/distill-smollm2-135m/test.jsonl",
                        help="held-out chat records whose last turn is the full model's answer")
    parser.add_argument("--limit", type=int, help="score a seeded random subset of this many answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", action="append", choices=list(MODELS), help="repeatable; default: all")
    parser.add_argument("--decoder-dir", type=Path,
                        help="a trained decoder to quantize (e.g. a long run's artifacts/<preset>/recovery/runs/<run>/"
                             "model); default: the preset's pruned decoder as pruning left it")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    preset = load_preset(args.preset)
    answers_path = preset.path(args.answers)
    records = [dict(r) for r in load_conversations(answers_path, "test")]
    total = len(records)
    if args.limit and args.limit < total:
        picked = sorted(random.Random(args.seed).sample(range(total), args.limit))
        records = [records[i] for i in picked]
    full_dir = pipeline.full_model(preset)[0]
    decoder_dir = preset.path(args.decoder_dir) if args.decoder_dir else pipeline.pruned_decoder(preset)
    if not (decoder_dir / "config.json").is_file():
        parser.error(f"--decoder-dir {decoder_dir}: no model there (config.json missing); give a saved decoder folder")
    full, tokenizer = load_model(full_dir, role="full model")
    decoder, _ = load_model(decoder_dir, role="decoder")
    for model in (full, decoder):
        model.requires_grad_(False)
    variants = {"float": {"full": full, "decoder": decoder}}
    for weights, scheme in quantize.DECODER_WEIGHTS.items():
        if scheme is not None:
            variants[weights] = {"full": quantize.quantize_int8(copy.deepcopy(full), scheme),
                                 "decoder": quantize.quantize_int8(copy.deepcopy(decoder), scheme)}
    scores, seconds = {}, {}
    identity = {"full_dir": _relative(full_dir), "decoder_dir": _relative(decoder_dir),
                "full_weights": weights_fingerprint(full), "decoder_weights": weights_fingerprint(decoder),
                "decoder_training": _training_of(decoder_dir)}
    answers = {"file": args.answers, "sha256": content_sha256(answers_path.read_bytes()), "total": total,
               "scored": len(records), "subset": None if len(records) == total else
               f"random.Random({args.seed}).sample of {len(records)} of the {total} answers"}
    for name in args.model or list(MODELS):
        full_w, decoder_w = MODELS[name]
        first = variants[full_w]["full"]
        model = first if decoder_w is None else OverFillModel(first, variants[decoder_w]["decoder"])
        t = time.perf_counter()
        scores[name] = answer_fidelity(model, tokenizer, records, batch_size=args.batch_size, intervals=True,
                                       units=True)
        seconds[name] = round(time.perf_counter() - t, 1)
        s = scores[name]
        print(f"{name:24s} agreement {s['agreement']:.4f} [{s['agreement_ci'][0]:.4f}, {s['agreement_ci'][1]:.4f}]"
              f"  nll {s['nll']:.4f} [{s['nll_ci'][0]:.4f}, {s['nll_ci'][1]:.4f}]  ({seconds[name]} s)", flush=True)
        if args.out:  # after every model, so a long run keeps what it has
            write_json(args.out, record(scores, seconds, answers, identity))
    for key, c in record(scores, seconds, answers, identity)["comparisons"].items():
        print(f"{key}: agreement {c['agreement']['difference']:+.4f} {c['agreement']['ci']}, "
              f"nll {c['nll']['difference']:+.4f} {c['nll']['ci']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
