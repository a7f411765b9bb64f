"""Chat data: both schemas, the prompt/response split, counted length drops, clear errors, collation."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from overfill_lib import chat_data, tasks, teacher

SYSTEM = {"role": "system", "content": "sort"}


@pytest.fixture(scope="module")
def tok():
    return teacher.build_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_sharegpt(messages):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"], "weight": None} for m in messages]}


def test_prompt_is_every_turn_before_the_final_reply_and_response_ends_with_eos(tmp_path, tok):
    conv = [SYSTEM, {"role": "user", "content": "31"}, {"role": "assistant", "content": "13"},
            {"role": "user", "content": "52"}, {"role": "assistant", "content": "25"},
            {"role": "user", "content": "trailing question without an answer"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])
    ds, stats = chat_data.prepare_chat_data(src, tok)
    row = ds[0]
    assert tok.decode(row["response_ids"]) == "25<|end|>" and row["response_ids"][-1] == tok.eos_token_id
    expected_prompt = tok.apply_chat_template(conv[:4], add_generation_prompt=True, tokenize=False)
    assert tok.decode(row["prompt_ids"]) == expected_prompt  # earlier turns kept, the trailing user turn dropped
    assert row["length"] == len(row["prompt_ids"]) + len(row["response_ids"])
    assert stats.kept == stats.records == 1
    assert stats.response_tokens == len(row["response_ids"]) and stats.prompt_tokens == len(row["prompt_ids"])


def test_sharegpt_conversations_schema_matches_messages_schema(tmp_path, tok):
    suite = tasks.generate_suite(tasks.SuiteConfig(n_train=20, n_validation=1, n_test=1))["train"]
    a, _ = chat_data.prepare_chat_data(write_jsonl(tmp_path / "m.jsonl", [{"messages": r["messages"]} for r in suite]), tok)
    b, _ = chat_data.prepare_chat_data(write_jsonl(tmp_path / "s.jsonl", [as_sharegpt(r["messages"]) for r in suite]), tok)
    assert a["prompt_ids"] == b["prompt_ids"] and a["response_ids"] == b["response_ids"]
    for r, resp in zip(suite, a["response_ids"]):
        assert tok.decode(resp) == r["messages"][-1]["content"] + "<|end|>"


def test_suite_source_reads_the_preset_split(tmp_path, tok):
    suite_dir = tasks.write_suite(tasks.SuiteConfig(n_train=12, n_validation=3, n_test=4), tmp_path / "suite")
    ds, stats = chat_data.prepare_chat_data("suite", tok, suite_dir=suite_dir, split="validation")
    assert len(ds) == stats.kept == 3
    with pytest.raises(ValueError, match="suite_dir"):
        chat_data.prepare_chat_data("suite", tok)


def test_length_limit_drops_are_counted_and_logged(tmp_path, tok, caplog):
    suite = tasks.generate_suite(tasks.SuiteConfig(n_train=40, n_validation=1, n_test=1))["train"]
    full, _ = chat_data.prepare_chat_data(write_jsonl(tmp_path / "a.jsonl", suite), tok)
    limit = sorted(full["length"])[len(full) // 2]
    too_long = sum(1 for n in full["length"] if n > limit)
    assert 0 < too_long < len(full)
    with caplog.at_level(logging.INFO, logger="overfill_lib.chat_data"):
        kept, stats = chat_data.prepare_chat_data(tmp_path / "a.jsonl", tok, max_length=limit)
    assert stats.dropped["too_long"] == too_long and stats.kept == len(kept) == len(full) - too_long
    assert max(kept["length"]) <= limit
    assert f"too_long {too_long}" in caplog.text
    with pytest.raises(ValueError, match="no training examples left.*max_length"):
        chat_data.prepare_chat_data(tmp_path / "a.jsonl", tok, max_length=min(full["length"]) - 1)


def test_conversation_without_assistant_turn_is_a_clear_error_or_counted(tmp_path, tok):
    good = {"messages": [SYSTEM, {"role": "user", "content": "21"}, {"role": "assistant", "content": "12"}]}
    bad = {"messages": [SYSTEM, {"role": "user", "content": "21"}]}
    src = write_jsonl(tmp_path / "b.jsonl", [good, bad, good])
    with pytest.raises(ValueError, match=r"no_assistant_turn.*first at index 1.*skip_invalid"):
        chat_data.prepare_chat_data(src, tok)
    ds, stats = chat_data.prepare_chat_data(src, tok, skip_invalid=True)
    assert len(ds) == 2 and stats.dropped["no_assistant_turn"] == 1
    with pytest.raises(chat_data.InvalidConversation, match="no assistant turn"):
        chat_data.split_final_reply(bad["messages"])


def test_unknown_speaker_and_missing_chat_column(tmp_path, tok):
    src = write_jsonl(tmp_path / "u.jsonl", [{"conversations": [{"from": "tool", "value": "x"}, {"from": "gpt", "value": "y"}]}])
    with pytest.raises(ValueError, match="unknown_role"):
        chat_data.prepare_chat_data(src, tok)
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}])
    with pytest.raises(ValueError, match=r"no chat column.*'messages', 'conversations'.*\['text'\]"):
        chat_data.prepare_chat_data(src, tok)


def test_where_filter_is_counted(tmp_path, tok):
    rows = [{**as_sharegpt([SYSTEM, {"role": "user", "content": "1"}, {"role": "assistant", "content": "1"}]),
             "langdetect": lang} for lang in ("en", "zh-cn", "en")]
    ds, stats = chat_data.prepare_chat_data(write_jsonl(tmp_path / "w.jsonl", rows), tok, where={"langdetect": "en"})
    assert len(ds) == 2 and stats.dropped["filtered_by_where"] == 1
    with pytest.raises(ValueError, match="lacks"):
        chat_data.prepare_chat_data(tmp_path / "w.jsonl", tok, where={"language": "en"})


def test_hub_name_offline_fails_fast_with_a_fix(monkeypatch, tok):
    import datasets
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"offline.*save_to_disk"):
        chat_data.prepare_chat_data("nobody-here/no-such-chat-set", tok)
    with pytest.raises(ValueError, match="does not exist"):
        chat_data.load_conversations("missing.jsonl")


def test_collator_layouts_score_the_same_response_tokens(tmp_path, tok):
    suite = tasks.generate_suite(tasks.SuiteConfig(n_train=6, n_validation=1, n_test=1))["train"]
    ds, _ = chat_data.prepare_chat_data(write_jsonl(tmp_path / "p.jsonl", suite), tok)
    features = [ds[i] for i in range(len(ds))]
    pad = tok.pad_token_id
    pair = chat_data.ChatCollator(pad, "pair")(features)
    causal = chat_data.ChatCollator(pad, "causal")(features)
    for i, f in enumerate(features):
        p, r = f["prompt_ids"], f["response_ids"]
        ctx = pair["context_ids"][i][pair["context_mask"][i].bool()].tolist()
        cont = pair["continuation_ids"][i][pair["continuation_mask"][i].bool()].tolist()
        assert ctx == p and cont == r
        assert pair["context_mask"][i, -1] == 1 and pair["continuation_mask"][i, 0] == 1  # left / right padded
        assert causal["labels"][i][causal["labels"][i] != -100].tolist() == r
        assert causal["input_ids"][i][causal["attention_mask"][i].bool()].tolist() == p + r
    assert int((causal["labels"] != -100).sum()) == int(pair["continuation_mask"].sum())
    with pytest.raises(ValueError, match="layout"):
        chat_data.ChatCollator(pad, "packed")
    assert isinstance(pair["context_ids"], torch.Tensor)


GOOD = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "lang": "en"}


@pytest.mark.parametrize("lines, kwargs, message", [
    ([], {}, r"is empty: it needs one JSON chat record per line"),
    ([json.dumps(GOOD), '{"messages": [oops'], {}, r"line 2: not valid JSON .*one complete JSON record"),
    ([json.dumps({"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]})], {},
     r"turn_without_role.*first at index 0.*skip_invalid=True"),
    ([json.dumps(GOOD), json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})],
     {}, r"mixes the two chat schemas: 'messages' \(first at row 0\), 'conversations' \(first at row 1\)"),
    ([json.dumps(GOOD)], {"where": {"lang": "de"}}, r"where=\{'lang': 'de'\} keeps none of the 1 records"),
    ([json.dumps(GOOD)], {"limit": 0}, r"limit=0 keeps no records"),
])
def test_bad_data_files_get_an_error_naming_the_file_the_row_and_the_fix(tok, tmp_path, lines, kwargs, message):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        chat_data.prepare_chat_data(path, tok, **kwargs)
