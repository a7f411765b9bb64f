"""Chat data: both schemas, the prompt/response split, counted length drops, clear errors, collation."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from overfill_lib import chat_data, full_model, tasks, tokens

SYSTEM = {"role": "system", "content": "sort"}


@pytest.fixture(scope="module")
def tok():
    return full_model.build_tokenizer()


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


USER, REPLY = {"role": "user", "content": "31"}, {"role": "assistant", "content": "13"}


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "look: "}, {"type": "image_url",
                                                 "image_url": {"url": "cat.png"}}]}, REPLY]},
     r"turn 0 \('user'\): content part 1 is a part of type 'image_url', not a text part"),
    ({"messages": [{"role": "user", "content": 0}, REPLY]}, r"turn 0 \('user'\): content is 0 \(int\), not text"),
    ({"messages": [{"role": "user", "content": None}, REPLY]}, r"turn 0 \('user'\): content is None \(or missing\)"),
    ({"messages": [USER, {"role": "assistant", "content": 0}]}, r"turn 1 \('assistant'\): content is 0 \(int\)"),
    ({"messages": [USER, {"role": "assistant", "content": {"text": "13"}}]},
     r"turn 1 \('assistant'\): content is \{'text': '13'\} \(dict\)"),
    ({"conversations": [{"from": "human", "value": 31}, {"from": "gpt", "value": "13"}]},
     r"turn 0 \('human'\): content is 31 \(int\)"),
])
def test_content_that_is_not_text_is_refused_naming_file_and_line(tmp_path, tok, bad, message):
    """Content as parts with an image, a number, None or a dict was trained on as its repr or as an empty turn."""
    good = GOOD if "messages" in bad else as_sharegpt(GOOD["messages"])
    path = write_jsonl(tmp_path / "chats.jsonl", [good, good, bad])
    with pytest.raises(ValueError, match=rf"content_not_text.*first at index 2, {path} line 3: " + message):
        chat_data.prepare_chat_data(path, tok)
    ds, stats = chat_data.prepare_chat_data(path, tok, skip_invalid=True)
    assert len(ds) == 2 and stats.dropped["content_not_text"] == 1


def test_text_parts_are_joined_as_the_string_would_be(tmp_path, tok):
    """In a file mixing string and list content, strings that read as JSON ("31", "null") stay strings (datasets alone
    would return 31 and None)."""
    text = lambda s: {"type": "text", "text": s}
    parts = {"messages": [SYSTEM, {"role": "user", "content": [text("3"), text("1")]},
                          {"role": "assistant", "content": [text("13")]}]}
    plain = {"messages": [SYSTEM, USER, REPLY]}
    null = {"messages": [SYSTEM, {"role": "user", "content": "null"}, REPLY]}
    a, _ = chat_data.prepare_chat_data(write_jsonl(tmp_path / "parts.jsonl", [parts, plain, null]), tok)
    assert a[0]["prompt_ids"] == a[1]["prompt_ids"] and a[0]["response_ids"] == a[1]["response_ids"]
    assert tok.decode(a[0]["response_ids"]) == "13<|end|>" and "null" in tok.decode(a[2]["prompt_ids"])


def test_generation_chat_follows_the_same_content_rule(tok):
    from overfill_lib.generation import encode_chat

    parts = [[{"role": "user", "content": [{"type": "text", "text": "3"}, {"type": "text", "text": "1"}]}]]
    assert torch.equal(encode_chat(tok, parts)["input_ids"], encode_chat(tok, [[USER]])["input_ids"])
    with pytest.raises(ValueError, match=r"conversation 1, turn 0 \('user'\): content is None \(or missing\)"):
        encode_chat(tok, [[USER], [{"role": "user", "content": None}]])


def test_file_errors_name_the_line_not_utf8_and_duplicate_keys(tmp_path, tok):
    good = json.dumps(GOOD).encode()
    latin1 = json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"}, REPLY]}, ensure_ascii=False)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + latin1.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"{path} line 2: not valid UTF-8 \(byte 0xe9 at byte \d+ of the line\); "
                                         r"save the file as UTF-8, e.g. iconv"):
        chat_data.prepare_chat_data(path, tok)
    path = tmp_path / "twice.jsonl"
    twice = '{"messages": [{"role": "user", "content": "1"}], "messages": [{"role": "user", "content": "2"}]}'
    path.write_bytes(good + b"\n" + twice.encode() + b"\n")
    with pytest.raises(ValueError, match=rf"{path} line 2: key 'messages' appears twice in one record.*remove or"):
        chat_data.prepare_chat_data(path, tok)
    path = write_jsonl(tmp_path / "twice2.jsonl", [GOOD, GOOD])
    path.write_text(path.read_text().replace('"lang"', '"lang": "de", "lang"', 1))
    with pytest.raises(ValueError, match=rf"{path} line 1: key 'lang' appears twice"):
        chat_data.prepare_chat_data(path, tok)
    # Blank lines: the line is counted from the file, not from the records.
    path = tmp_path / "blank.jsonl"
    path.write_text(f"{json.dumps(GOOD)}\n\n{json.dumps({'messages': [USER]})}\n")
    with pytest.raises(ValueError, match=rf"no_assistant_turn.*first at index 1, {path} line 3: conversation has no"):
        chat_data.prepare_chat_data(path, tok)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}, REPLY]}
    path.write_text(f"{json.dumps(GOOD)}\n\n{json.dumps(parts)}\n")
    with pytest.raises(ValueError, match=rf"{path} could not be read .*line 2 is blank.*remove the blank lines"):
        chat_data.prepare_chat_data(path, tok)


def test_a_conversation_too_long_by_its_characters_is_dropped_without_tokenizing(tmp_path, tok, monkeypatch):
    """A 30 MB line took minutes to tokenize only to be dropped: characters bound the tokens from below."""
    encoded = []
    real = tokens.encode_examples
    monkeypatch.setattr(tokens, "encode_examples", lambda t, convs: encoded.extend(convs) or real(t, convs))
    huge = {"messages": [SYSTEM, {"role": "user", "content": "7" * 5_000}, REPLY]}  # 64 tokens cover <= 1664 chars
    src = write_jsonl(tmp_path / "huge.jsonl", [{"messages": [SYSTEM, USER, REPLY]}, huge])
    ds, stats = chat_data.prepare_chat_data(src, tok, max_length=64)
    assert len(ds) == 1 and stats.dropped["too_long"] == 1
    assert encoded and max(len(m["content"]) for c in encoded for m in c) < 100  # the huge one never reached it
    # Without max_length nothing can be dropped, so it is tokenized (and counted) as before.
    ds, stats = chat_data.prepare_chat_data(src, tok)
    assert len(ds) == 2 and max(ds["length"]) > 5_000
