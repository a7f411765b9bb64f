"""The standard library's docstrings as a corpus: splits whole by top-level package, no held-out text in training,
a record that says what it was made from."""

from __future__ import annotations

from overfill_lib import stdlib_corpus


def test_splits_are_whole_packages_and_no_held_out_paragraph_was_trained_on():
    record = stdlib_corpus.record()
    assert record["python"] and record["fingerprint"]
    docs = {s: stdlib_corpus.documents(s) for s in stdlib_corpus.SPLITS}
    assert all(docs.values()), {s: len(d) for s, d in docs.items()}
    assert record["splits"]["train"]["characters"] > 1_000_000  # "at scale": several times the help topics
    packages = {s: {d["module"].split(".")[0] for d in found} for s, found in docs.items()}
    assert not packages["train"] & packages["test"] and not packages["train"] & packages["validation"]
    assert not packages["validation"] & packages["test"]
    trained = {" ".join(p.split()) for d in docs["train"] for p in d["text"].split("\n\n")}
    for split in ("validation", "test"):
        for d in docs[split]:
            for p in d["text"].split("\n\n"):
                key = " ".join(p.split())
                assert len(key) < 80 or key not in trained, (d["module"], key[:80])
    for split, found in docs.items():
        assert record["splits"][split]["fingerprint"] == stdlib_corpus.fingerprint(found)


def test_split_rule_is_a_stable_hash_of_the_top_level_package():
    assert stdlib_corpus.split_of("email.parser") == stdlib_corpus.split_of("email")
    assert {stdlib_corpus.split_of(m) for m in ("json", "os", "re", "abc", "ast", "csv", "enum", "math")} >= {"train"}
    rendered = stdlib_corpus.render_module(__import__("textwrap"))
    assert "class TextWrapper" in rendered and "def " not in rendered and "Text wrapping and filling" in rendered
