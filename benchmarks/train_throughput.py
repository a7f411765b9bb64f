"""Training throughput of the window objective: scored continuation tokens per second of one training step.

One step = the Trainer's ``compute_loss`` (the very code ``training.OverFillTrainer`` runs), backward, an AdamW
step, on a batch of text windows, for OverFill and the pruned decoder alone at each width of the preset's
``recovery`` section, two ways, interleaved in one run:

- ``before``: the KL objectives as they were (``overfill_kd`` / ``pruned_kd`` on chat data): the frozen full
  model runs live at every step (for OverFill a second time over the whole window, besides the prefill), the KL
  spans the whole vocabulary, and the LM head runs at every position;
- ``after``: the full model's distributions cached once per window (``windows.TeacherCache``, top-k), the KL over
  those k tokens plus a bucket for the rest, and the pruned decoder's LM head only at the scored positions;
- ``after_bf16``: the same under bf16 autocast (``training.precision: bf16``; fp32 weights and AdamW state), which
  the Trainer applies around ``compute_loss``: on CPUs with AMX (Intel Sapphire Rapids and later) bf16 products
  run several times faster than fp32; elsewhere they may not.

Prints a table and writes ``results/<preset>/train_throughput.json``. Usage:
``python benchmarks/train_throughput.py [--preset smollm2-135m] [--repeats 5] [--threads 2]``.
A profile of one step of each kind (``--profile``) prints the top operators by CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overfill_lib import recovery, training, windows  # noqa: E402
from overfill_lib.artifacts import PROJECT_ROOT, environment_record, write_json  # noqa: E402
from overfill_lib.presets import load_preset  # noqa: E402


def make_trainer(model, pair, full, out: Path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=1)
    # distill_from: the KL objectives (overfill_kd, pruned_kd); with cached teacher ids in the batch it goes unused
    return training.OverFillTrainer(model=model, args=args, pair=pair, include_first_token=False, distill_from=full)


def batches(res: recovery.Resources, layout: str, n: int) -> tuple[list[dict], list[dict]]:
    """``n`` batches of the train windows, both ways: with the cached teacher (after) and without (before)."""
    config = res.config
    collate = windows.WindowCollator(config.context, layout)
    data = windows.WindowDataset(res.train.windows, res.train)
    after = [collate([data[i] for i in range(b * config.batch_size, (b + 1) * config.batch_size)]) for b in range(n)]
    before = []
    for a in after:
        if layout == "pair":
            before.append({"context_ids": a["context_ids"], "context_mask": torch.ones_like(a["context_ids"]),
                           "continuation_ids": a["continuation_ids"],
                           "continuation_mask": torch.ones_like(a["continuation_ids"])})
        else:  # the chat layout's labels: the scored tokens (continuation 1..T-1), -100 elsewhere
            labels = a["input_ids"].clone()
            labels[:, : config.context + 1] = -100
            before.append({"input_ids": a["input_ids"], "attention_mask": torch.ones_like(a["input_ids"]),
                           "labels": labels})
    return before, after


def main(argv=None) -> int:
    from overfill_lib.pair import OverFillModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (after one warmup)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a profile of one step of each kind")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = load_preset(args.preset)
    res = recovery.Resources.load(preset)
    config = res.config
    rows, samples = [], {}
    tmp = preset.workdir / "recovery" / "benchmark"
    for keep in config.keep:
        decoder_dir = res.decoder_dir(keep)
        for method in config.objectives:
            layout = training.get_objective(method).layout
            decoder = training.load_causal_lm(decoder_dir, "pruned decoder", dtype=torch.float32).train()
            pair = OverFillModel(res.full, decoder) if layout == "pair" else None
            trainer = make_trainer(decoder, pair, res.full, tmp)
            optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-6)
            before, after = batches(res, layout, args.repeats + 1)
            times = {"before": [], "after": [], "after_bf16": []}
            kinds = (("before", before, False), ("after", after, False), ("after_bf16", after, True))
            for i in range(args.repeats + 1):  # interleaved; the first of each is a warmup
                for kind, data, bf16 in kinds:
                    t0 = time.perf_counter()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = trainer.compute_loss(decoder, data[i])
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if i:
                        times[kind].append(time.perf_counter() - t0)
            if args.profile:
                for kind, data, bf16 in kinds:
                    with torch.profiler.profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        trainer.compute_loss(decoder, data[0]).backward()
                        optimizer.zero_grad(set_to_none=True)
                    print(f"\n== {method} keep {keep:g} {kind}")
                    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
            tokens = config.tokens_per_step
            row = {"method": method, "keep": keep, "tokens_per_step": tokens}
            for kind in times:
                row[f"{kind}_s"] = round(statistics.median(times[kind]), 4)
                row[f"{kind}_tokens_per_s"] = round(tokens / statistics.median(times[kind]), 1)
            row["speedup"] = round(row["before_s"] / row["after_s"], 2)
            row["speedup_bf16"] = round(row["before_s"] / row["after_bf16_s"], 2)
            rows.append(row)
            samples[f"{method}-keep{keep:g}"] = times
            print(f"{method:12s} keep {keep:4g}: before {row['before_tokens_per_s']:7.1f} tok/s, "
                  f"after {row['after_tokens_per_s']:7.1f} tok/s ({row['speedup']:.2f}x), "
                  f"after with bf16 autocast {row['after_bf16_tokens_per_s']:7.1f} tok/s ({row['speedup_bf16']:.2f}x)",
                  flush=True)
    out = Path(args.out) if args.out else PROJECT_ROOT / "results" / preset.name / "train_throughput.json"
    import platform

    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    write_json(out, {"what": "scored continuation tokens per second of one training step (compute_loss, backward, "
                             "AdamW), median of interleaved repeats", "threads": args.threads,
                     "cpu": {"machine": platform.machine(), "amx_bf16": "amx_bf16" in cpu_flags,
                             "avx512_bf16": "avx512_bf16" in cpu_flags},
                     "repeats": args.repeats, "batch_size": config.batch_size, "window": config.window,
                     "context": config.context, "teacher_topk": config.teacher_topk, "rows": rows,
                     "samples_s": samples, "teacher_cache": res.train.summary(),
                     "environment": environment_record("cpu")})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
