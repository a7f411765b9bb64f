"""Real text that ships with Python (corpus): topic splits, prompts, windows, the self-distilled chat data, and
how faithfully a model continues the full model's answers (fidelity)."""

import copy
import json

import pytest

from overfill_lib import corpus
from overfill_lib.fast_decode import FastGenerator
from overfill_lib.generation import encode_chat
from tests.gguf_files import bpe_tokenizer
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def test_topic_splits_are_disjoint_and_prompts_come_from_held_out_topics(tokenizer):
    calibration, heldout = corpus.topic_names("calibration"), corpus.topic_names("heldout")
    assert not set(calibration) & set(heldout) and sorted(calibration + heldout) == sorted(corpus.topics())
    share = sum(map(len, corpus.texts("heldout"))) / sum(map(len, corpus.topics().values()))
    assert 0.1 < share < 0.3
    prompts = corpus.summary_prompts("heldout", 8)
    assert len(prompts) == 8 and all(p[0]["content"].startswith(corpus.SUMMARY_INSTRUCTION) for p in prompts)
    held_text = "\n".join(corpus.texts("heldout"))
    assert all(p[0]["content"].split("\n\n", 1)[1].split("\n\n")[0] in held_text for p in prompts)
    windows = corpus.token_windows(corpus.texts("calibration"), tokenizer, 3, 64)
    assert [len(w) for w in windows] == [64, 64, 64]


def test_distill_prompts_split_by_topic_and_are_unique():
    train, validation, test = (corpus.distill_prompts(s, 400, 20) for s in corpus.DATA_SPLITS)
    texts = [[r["messages"][0]["content"] for r in split] for split in (train, validation, test)]
    assert all(len(t) == len(set(t)) for t in texts) and not set(texts[0]) & set(texts[1])
    assert {r["topic"] for r in test if r["topic"]} <= set(corpus.topic_names("heldout"))
    assert {r["topic"] for r in train + validation if r["topic"]} <= set(corpus.topic_names("calibration"))
    kinds = {r["kind"] for r in train}
    assert set(corpus.INSTRUCTIONS) <= kinds and {"family:lookup", "family:add"} <= kinds
    assert corpus.distill_prompts("train", 5, 5, seed=1) != corpus.distill_prompts("train", 5, 5, seed=0)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus.distill_prompts("dev", 1, 1)


def test_answers_are_the_models_greedy_tokens_and_say_whether_they_ended(tokenizer):
    model = tiny_model("llama", tied=True, vocab_size=len(tokenizer)).eval()
    chats = [[{"role": "user", "content": "Name a fox."}], [{"role": "user", "content": "Reverse 'abc'."}]]
    records = corpus.answer(model, tokenizer, chats, max_new_tokens=5, batch_size=1)
    enc = encode_chat(tokenizer, chats)
    out = FastGenerator(full=model, compile=False).generate(enc["input_ids"], enc["attention_mask"], method="full",
                                                            max_new_tokens=5)
    for record, row, reason in zip(records, out.new_tokens.tolist(), out.finish_reasons):
        assert record["messages"][-1] == {"role": "assistant",
                                          "content": tokenizer.decode(row, skip_special_tokens=True).strip()}
        assert record["ended"] == (reason == "eos")


def test_distilled_data_keeps_finished_answers_records_how_and_resumes(tmp_path, tokenizer, monkeypatch):
    model = tiny_model("llama", tied=True, vocab_size=len(tokenizer)).eval()
    calls = []

    def fake_answer(model, tokenizer, conversations, **kw):  # every third answer runs out of tokens
        calls.append(len(conversations))
        return [{"messages": [*c, {"role": "assistant", "content": f"answer {i}"}], "ended": i % 3 != 2}
                for i, c in enumerate(conversations)]

    monkeypatch.setattr(corpus, "answer", fake_answer)
    sizes = {"train": (6, 3), "validation": (2, 1), "test": (3, 0)}
    out = corpus.build_distilled_data(model, tokenizer, tmp_path / "d", sizes=sizes, max_new_tokens=8)
    record = json.loads((out / "record.json").read_text())
    for split, (n_passage, n_family) in sizes.items():
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        asked = n_passage + n_family
        assert len(rows) == record["splits"][split]["kept"] == asked - asked // 3
        assert record["splits"][split]["dropped_unfinished"] == asked // 3
        assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][0]["role"] == "user" for r in rows)
    assert record["model_fingerprint"] and record["decoding"]["max_new_tokens"] == 8
    assert record["corpus"]["heldout"]["fingerprint"] == corpus.fingerprint("heldout")
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    corpus.build_distilled_data(model, tokenizer, out, sizes={**sizes, "test": (2, 0)}, max_new_tokens=8)
    assert calls[3:] == [2] and (out / "train.jsonl").stat().st_mtime_ns == stamp  # only the changed split reran


def test_fidelity_of_a_model_on_its_own_greedy_answers(tokenizer):
    """Scored on its own greedy answers, a model agrees everywhere and reproduces every answer; a different
    decoder does not; alone and as an identity pair the numbers are the same."""
    from overfill_lib import fidelity, pruning
    from overfill_lib.pair import OverFillModel

    model = tiny_model("llama", tied=True, vocab_size=len(tokenizer)).eval()
    other = copy.deepcopy(model)
    other.model.norm.weight.data.neg_()  # every logit flips sign: its greedy choice is the model's least likely token
    chats = [[{"role": "user", "content": "Name a fox."}], [{"role": "user", "content": "Reverse 'abcdef' now."}]]
    enc = encode_chat(tokenizer, chats)
    eos = tokenizer.eos_token_id
    out = FastGenerator(full=model, compile=False).generate(enc["input_ids"], enc["attention_mask"], method="full",
                                                            max_new_tokens=6, eos_token_id=None)
    # Records whose answers are the greedy tokens, then the end-of-turn token the encoding appends.
    records = [{"messages": [*c, {"role": "assistant", "content": tokenizer.decode(row)}]}
               for c, row in zip(chats, out.new_tokens.tolist()) if eos not in row]
    contexts, answers = fidelity.split_records(tokenizer, records)
    assert all(a[:-1] == row for a, row in zip(answers, out.new_tokens.tolist())) and all(a[-1] == eos for a in answers)
    alone = fidelity.answer_fidelity(model, tokenizer, records, batch_size=1)
    # Every generated position agrees; the appended end-of-turn token was not the model's choice.
    assert alone["agreement"] == pytest.approx(6 / 7) and alone["exact"] == 0.0
    assert fidelity.answer_fidelity(OverFillModel(model, model), tokenizer, records) == pytest.approx(alone)
    assert alone["nll"] == pytest.approx(pruning.reply_loss(model, tokenizer, records), rel=1e-5)
    stranger = fidelity.answer_fidelity(other, tokenizer, records)
    assert stranger["nll"] > alone["nll"] and stranger["agreement"] < 1 / 7
    windows = [tokenizer(t)["input_ids"][:12] for t in ("The quick brown fox jumps over it all.", "A decoder reads the cache.")]
    ppl = fidelity.split_perplexity(model, windows, prefix=4)
    assert ppl == pytest.approx(fidelity.split_perplexity(OverFillModel(model, model), windows, prefix=4), rel=1e-5)
    assert fidelity.split_perplexity(OverFillModel(model, other), windows, prefix=4) != pytest.approx(ppl)
