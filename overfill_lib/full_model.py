"""The offline default's tokenizer and full model (and the smaller model beside it), built and trained here.

The tokenizer is character level (every printable ASCII character is one token) with a chat
template; the full model is a ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU, grouped-query attention),
the family the paper prunes; the smaller model is the same recipe, narrower (:meth:`FullModelConfig.narrower`).
Both save and load with the Auto classes. (The module's old name, ``overfill_lib.teacher``, still imports, with a
DeprecationWarning.)
"""

from __future__ import annotations

import logging
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from overfill_lib import scoring, tasks
from overfill_lib.architectures import head_dim_of
from overfill_lib.artifacts import atomic_directory, environment_record, read_json, write_json
from overfill_lib.config import parse
from overfill_lib.generation import returned_cache
from overfill_lib.tokens import encode_examples

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer whose end-of-turn token is its eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=4096,
    )


@dataclass(frozen=True)
class FullModelConfig:
    """Architecture and training recipe of a locally trained full model (a preset's ``full_model.train``), or of
    the smaller model (:meth:`narrower`)."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 256
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 500  # validation exact match logged every N steps (0: never)
    eval_records: int = 250

    @classmethod
    def from_dict(cls, d: dict) -> FullModelConfig:
        return parse(cls, d, "full_model.train")

    def narrower(self, width_ratio: float, heads: bool = False) -> FullModelConfig:
        """The same recipe at a fraction of the width: the smaller model (the paper's 'smaller finetuned' reference).

        Hidden and intermediate sizes always shrink; with ``heads`` the query and KV head counts shrink too
        (head_dim kept), as they do between sizes of a real model family, so attention is narrower as well.
        """
        if not 0 < width_ratio <= 1:
            raise ValueError(f"width_ratio must be in (0, 1], got {width_ratio}")
        change = {"hidden_size": int(self.hidden_size * width_ratio),
                  "intermediate_size": int(self.intermediate_size * width_ratio)}
        if heads:
            q, kv = (max(1, round(n * width_ratio)) for n in (self.num_attention_heads, self.num_key_value_heads))
            if q % kv:
                raise ValueError(f"{width_ratio=} gives {q} query heads for {kv} KV heads; pick a ratio that keeps "
                                 "the query heads a multiple of the KV heads, or heads: false")
            change |= {"num_attention_heads": q, "num_key_value_heads": kv}
        return FullModelConfig(**{**asdict(self), **change})


def build_model(cfg: FullModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


class _Collator:
    """Right-padded prompt + reply with labels only on the reply (as ``chat_data.ChatCollator``'s causal layout)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        from overfill_lib.generation import pad_sequences

        ids, mask = pad_sequences([f["input_ids"] for f in features], self.pad_id, side="right")
        labels, _ = pad_sequences([f["labels"] for f in features], -100, side="right")
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class _ProgressLogger(TrainerCallback):
    """Adds wall time to every log entry and, every ``every`` steps, validation exact match per family."""

    def __init__(self, tokenizer, records: list[dict], every: int):
        self.start = time.perf_counter()
        self.tokenizer, self.records, self.every = tokenizer, records, every

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None:
            logs["elapsed_s"] = round(time.perf_counter() - self.start, 1)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and self.records and (state.global_step % self.every == 0 or state.global_step == state.max_steps):
            scores = scoring.exact_match(model, self.tokenizer, self.records)
            model.train()
            state.log_history.append({"step": state.global_step, "val_exact_match": scores})
            log.info("step %d: validation exact match %s", state.global_step, {k: round(v, 2) for k, v in scores.items()})


def train_full_model(
    cfg: FullModelConfig,
    suite_dir: str | Path,
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    eval_records: int | None = None,
) -> dict:
    """Train a full model (or the smaller model) from scratch on the suite's train split; save an HF directory
    atomically.

    Returns the training record (recipe, wall time, test exact match, environment), also written
    as ``training_record.json`` inside the checkpoint.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    rows = encode_examples(tokenizer, [r["messages"] for r in tasks.load_split(suite_dir, "train")])
    work_dir = Path(work_dir or out_dir.parent / f".{out_dir.name}.work")
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(cfg.warmup_ratio * cfg.steps)),
        weight_decay=cfg.weight_decay,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=max(1, cfg.steps // 50),
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(rows),
        data_collator=_Collator(tokenizer.pad_token_id),
        callbacks=[_ProgressLogger(tokenizer, tasks.load_split(suite_dir, "validation")[: cfg.eval_records], cfg.eval_every)],
    )
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    shutil.rmtree(work_dir, ignore_errors=True)  # nothing is checkpointed mid-run (save_strategy="no")
    model = trainer.model.cpu().eval()
    test = tasks.load_split(suite_dir, "test")[:eval_records]
    metrics = scoring.exact_match(model, tokenizer, test)
    record = {
        "recipe": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "test_exact_match": metrics,
        "test_records": len(test),
        "suite": read_json(Path(suite_dir) / "suite.json"),
        "log_history": trainer.state.log_history,
        "environment": environment_record("cpu", cfg.seed),
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "training_record.json", record)
    log.info("model saved to %s: test exact match %.3f", out_dir, metrics["overall"])
    return record


def compare_checkpoints(reference: str | Path, candidate: str | Path) -> dict:
    """Test exact match of two trained checkpoints (from their training records) and their largest weight difference."""
    from safetensors.torch import load_file

    a, b = load_file(Path(reference) / "model.safetensors"), load_file(Path(candidate) / "model.safetensors")
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError(f"{reference} and {candidate} hold different architectures; nothing to compare")
    ra, rb = read_json(Path(reference) / "training_record.json"), read_json(Path(candidate) / "training_record.json")
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return {"reference": str(reference), "candidate": str(candidate),
            "reference_exact_match": ra["test_exact_match"], "candidate_exact_match": rb["test_exact_match"],
            "same_metrics": ra["test_exact_match"] == rb["test_exact_match"], "max_abs_weight_difference": diff,
            "bit_identical": diff == 0.0, "reference_train_seconds": ra["train_seconds"],
            "candidate_train_seconds": rb["train_seconds"], "candidate_environment": rb.get("environment")}


def describe(model, record: dict | None = None):
    """One-row DataFrame: architecture, parameter count and the training record (trained here) or the source
    record (converted from a GGUF file)."""
    import pandas as pd

    c = model.config
    row = {
        "model": c.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "q heads": c.num_attention_heads,
        "kv heads": c.num_key_value_heads,
        "head_dim": head_dim_of(c),
        "vocab": c.vocab_size,
        "tied embeddings": bool(getattr(c, "tie_word_embeddings", False)),
    }
    if record and "source" in record:  # converted from a GGUF file (gguf_models.source_record)
        src = record["source"]
        row |= {"source": f"{src['package']}=={src['version']}: {Path(src['file']).name}",
                "quantization": ", ".join(f"{n} {t}" for t, n in record["gguf"]["tensor_types"].items()),
                "stored as": record["stored_dtype"]}
    elif record:
        env = record.get("environment", {})
        row |= {
            "train steps": record["recipe"]["steps"],
            "train minutes": round(record["train_seconds"] / 60, 1),
            "trained on": f"{env.get('device_name') or env.get('device')} ({env.get('cpu_threads')} threads)",
            "stored test EM": round(record["test_exact_match"]["overall"], 3),
        }
    return pd.DataFrame([row])


@torch.no_grad()
def cache_shapes(model, tokenizer, text: str = "hello"):
    """Per-layer key/value shapes of the model's cache for one short prompt."""
    import pandas as pd

    batch = tokenizer(text, return_tensors="pt")
    cache = returned_cache(model(**batch.to(model.device), use_cache=True))
    rows = []
    for i, layer in enumerate(cache.layers):
        rows.append({"layer": i, "keys": tuple(layer.keys.shape), "values": tuple(layer.values.shape)})
    df = pd.DataFrame(rows)
    df.attrs["note"] = "shape = (batch, kv heads, tokens, head_dim)"
    return df
