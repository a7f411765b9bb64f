"""English technical prose at scale, offline: the docstrings of Python's standard library.

Python ships several MB of English prose in its modules' docstrings. Each public module (and the submodules of
its packages) is rendered the way ``pydoc`` lays it out (module, then classes with their own methods, then
functions, each name with its signature and docstring), keeping only what the module itself defines: inherited
members and re-exported names would put the same text in several modules and so across splits.

Modules are split whole, by their top-level package (``email.*`` all in one split, by a hash of the name), into
``train`` (the text decoders are trained on), ``validation`` (scored during training) and ``test`` (scored once,
at the end). The help topics (``corpus.py``, which calibrates channel importance) are a separate source. A
docstring that occurs in two modules is kept only in the first (in name order), and any held-out document
repeated in ``train`` is dropped, so no held-out text was trained on.

Rendering imports a few hundred modules, so it runs in a child process; the result is cached under
``artifacts/corpus/`` with a record (Python version, modules, sizes, fingerprint per split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

from overfill_lib.artifacts import PROJECT_ROOT, atomic_write_text, read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Of 20 hash buckets of the top-level package name: 1 for validation, 3 for test, the rest for training.
VALIDATION_BUCKETS, TEST_BUCKETS = frozenset({0}), frozenset({1, 2, 3})
# Modules that act when imported (open a browser, print, start a GUI), are tests, or hold no prose.
EXCLUDED = frozenset({
    "antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "test", "lib2to3", "ensurepip",
    "pydoc_data", "xxsubtype", "xxlimited", "msvcrt", "winreg", "winsound", "nt", "msilib", "encodings",
    "__phello__", "sre_compile", "sre_constants", "sre_parse", "distutils", "venv", "pip",
})
MIN_CHARS = 200  # a module whose own docstrings add up to less is skipped
CACHE_DIR = PROJECT_ROOT / "artifacts" / "corpus"


def split_of(module: str) -> str:
    """The split of a module: a hash of its top-level package, the same on every machine and Python version."""
    bucket = int(hashlib.sha256(module.split(".")[0].encode()).hexdigest(), 16) % 20
    return "validation" if bucket in VALIDATION_BUCKETS else "test" if bucket in TEST_BUCKETS else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


# ----------------------------------------------------------------------------------------------
# Rendering (in a child process: python -m overfill_lib.stdlib_corpus --render)


def _module_names() -> list[str]:
    import pkgutil

    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in EXCLUDED:
            continue
        names.append(name)
        spec = __import__("importlib.util").util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for info in pkgutil.walk_packages(spec.submodule_search_locations, prefix=f"{name}."):
                parts = info.name.split(".")
                if not any(p.startswith("_") or p in {"test", "tests", "idle_test"} for p in parts[1:]):
                    names.append(info.name)
    return names


class _Shown:
    """A default value as the rendering shows it (``inspect.Signature`` prints a default by its ``repr``)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _machine_paths() -> list[tuple[str, str]]:
    """Paths that differ between machines and virtual environments, longest first, with the name shown instead."""
    import os

    paths = {sys.executable: "sys.executable", sys.prefix: "sys.prefix", sys.exec_prefix: "sys.exec_prefix",
             sys.base_prefix: "sys.base_prefix", sys.base_exec_prefix: "sys.base_exec_prefix",
             os.path.expanduser("~"): "~"}
    return sorted(((p, name) for p, name in paths.items() if p and p != "/"), key=lambda item: -len(item[0]))


def default_text(value) -> str:
    """A parameter's default as text that is the same in every process and on every machine: its ``repr``, except
    where the ``repr`` is not (objects and functions show their memory address, ``<object object at 0x7f...>``;
    ``os.environ`` shows the process's environment; sets list their strings in hash-seed order; some defaults are
    paths of this machine, such as ``sys.executable``). Only those parts change, so every other default reads as
    ``pydoc`` shows it."""
    import os
    import re

    kind = type(value)
    if value is os.environ:
        return "os.environ"
    if kind in (str, bytes):
        text = repr(value)
        for path, name in _machine_paths():
            text = text.replace(path if kind is str else repr(path.encode())[2:-1], f"<{name}>")
        return text
    if kind in (tuple, list):
        items = [default_text(v) for v in value]
        return ("({},)" if kind is tuple and len(items) == 1 else "({})" if kind is tuple else "[{}]").format(
            ", ".join(items))
    if kind in (set, frozenset):
        items = ", ".join(sorted(default_text(v) for v in value))
        return f"{kind.__name__}()" if not items else f"{{{items}}}" if kind is set else f"frozenset({{{items}}})"
    if kind is dict:
        return "{" + ", ".join(f"{default_text(k)}: {default_text(v)}" for k, v in value.items()) + "}"
    try:
        text = repr(value)
    except Exception:  # a repr that fails on a half-built default: its type says enough
        return f"<{kind.__name__}>"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _signature(obj) -> str:
    import inspect

    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    shown = [p.replace(default=_Shown(default_text(p.default))) if p.default is not p.empty else p
             for p in signature.parameters.values()]
    return str(signature.replace(parameters=shown))


def render_module(module) -> str:
    """A module's own prose laid out as ``pydoc`` does: its docstring, then each class it defines (with the
    methods defined in that class), then its functions; names with signatures, docstrings indented."""
    import inspect

    def doc(obj, indent: str) -> list[str]:
        text = inspect.cleandoc(obj.__doc__) if isinstance(getattr(obj, "__doc__", None), str) else ""
        return [indent + line if line else indent.rstrip() for line in text.splitlines()] if text.strip() else []

    name = module.__name__
    out = [f"Help on module {name}:", "", "NAME", f"    {name}", ""]
    if (own := doc(module, "    ")):
        out += ["DESCRIPTION", *own, ""]
    members = sorted(vars(module).items())
    classes = [(n, c) for n, c in members if inspect.isclass(c) and c.__module__ == name and not n.startswith("_")]
    functions = [(n, f) for n, f in members
                 if inspect.isroutine(f) and getattr(f, "__module__", None) == name and not n.startswith("_")]
    if classes:
        out.append("CLASSES")
        for cname, cls in classes:
            out += [f"    class {cname}{_signature(cls)}", *doc(cls, "     |  "), "     |"]
            for mname, member in sorted(vars(cls).items()):
                func = getattr(member, "__func__", member)  # classmethods, staticmethods
                if (mname.startswith("_") and mname != "__init__") or not inspect.isroutine(func):
                    continue
                if (body := doc(func, "     |      ")):
                    out += [f"     |  {mname}{_signature(func)}", *body, "     |"]
            out.append("")
    if functions:
        out.append("FUNCTIONS")
        for fname, func in functions:
            if (body := doc(func, "        ")):
                out += [f"    {fname}{_signature(func)}", *body, ""]
    return "\n".join(out).rstrip() + "\n"


def _render_all() -> list[dict]:
    """Every module's rendering, in name order, with duplicated docstrings removed (see the module docstring)."""
    import contextlib
    import importlib
    import io
    import warnings

    warnings.simplefilter("ignore")
    docs = []
    for name in _module_names():
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
            text = render_module(module)
        except BaseException:  # platform modules that do not import here (SystemExit included) are simply absent
            continue
        docs.append({"module": name, "split": split_of(name), "text": text})
    # The same paragraph in two modules (copied docstrings, aliases) is kept in the first: train before held out.
    seen: set[str] = set()
    order = sorted(range(len(docs)), key=lambda i: (docs[i]["split"] != "train", docs[i]["module"]))
    for i in order:
        paragraphs = docs[i]["text"].split("\n\n")
        kept = []
        for p in paragraphs:
            key = " ".join(p.split())
            if len(key) < 80 or key not in seen:  # short lines (headings, names) may repeat
                kept.append(p)
                seen.add(key)
        docs[i]["text"] = "\n\n".join(kept)
    return [d for d in docs if len(d["text"]) >= MIN_CHARS]


# ----------------------------------------------------------------------------------------------
# The cached corpus


def cache_dir() -> Path:
    return CACHE_DIR / f"stdlib-python{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def fingerprint(docs: list[dict]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d["module"].encode() + b"\0" + d["text"].encode() + b"\0")
    return h.hexdigest()[:16]


def build(out_dir: str | Path | None = None) -> Path:
    """Render the corpus in a child process into ``out_dir`` (``documents.jsonl`` + ``record.json``), once."""
    out = Path(out_dir) if out_dir else cache_dir()
    if (out / "record.json").is_file() and (out / "documents.jsonl").is_file():
        return out
    log.info("rendering the standard library's docstrings into %s (a few hundred imports, about half a minute)", out)
    done = subprocess.run([sys.executable, "-m", "overfill_lib.stdlib_corpus", "--render"], capture_output=True,
                          text=True, cwd=PROJECT_ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rendering the standard library's docstrings failed:\n{done.stderr[-2000:]}")
    docs = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    empty = [s for s in SPLITS if not any(d["split"] == s for d in docs)]
    if empty:  # nothing is cached: a corpus without a split would fail later, at every run, far from the cause
        raise RuntimeError(f"rendering the standard library's docstrings gave {len(docs)} modules and none in the "
                           f"{', '.join(empty)} split(s); is this a full Python install (python -c 'import email, "
                           f"json')? stderr:\n{done.stderr[-2000:]}")
    record = {
        "source": "docstrings of Python's standard library (modules and their packages' submodules), laid out as pydoc",
        "python": sys.version.split()[0],
        "excluded": sorted(EXCLUDED),
        "split_rule": "sha256(top-level package) % 20: 0 validation, 1-3 test, else train",
        "splits": {s: {"modules": sum(d["split"] == s for d in docs),
                       "characters": sum(len(d["text"]) for d in docs if d["split"] == s),
                       "fingerprint": fingerprint([d for d in docs if d["split"] == s])} for s in SPLITS},
        "fingerprint": fingerprint(docs),
    }
    atomic_write_text(out / "documents.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    write_json(out / "record.json", record)
    return out


def record() -> dict:
    path = build() / "record.json"
    found = read_json(path)
    if not isinstance(found, dict) or not all(isinstance(found.get("splits", {}).get(s), dict) for s in SPLITS):
        raise ValueError(f"{path} is not a corpus record (no splits {', '.join(SPLITS)}); delete {path.parent} to have "
                         "it rendered again")
    return found


def documents(split: str) -> list[dict]:
    """``{"module", "split", "text"}`` of one split, in module order (built on first use), checked against the
    split's fingerprint in ``record.json``: a file changed since it was built is refused, not read."""
    check_split(split)
    expected = record()["splits"][split]["fingerprint"]
    path = build() / "documents.jsonl"
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number}: not valid JSON ({e.msg}); the file was cut short or edited: "
                                 f"delete {path.parent} to have it rendered again") from None
            if not (isinstance(d, dict) and all(isinstance(d.get(k), str) for k in ("module", "split", "text"))):
                raise ValueError(f"{path} line {number}: not a document (module, split, text); delete {path.parent} "
                                 "to have it rendered again")
            if d["split"] == split:
                docs.append(d)
    if fingerprint(docs) != expected:
        raise ValueError(f"the {split} documents in {path} ({len(docs)} modules, fingerprint {fingerprint(docs)}) are not "
                         f"the ones its record.json describes (fingerprint {expected}): the file was changed after it "
                         f"was built. Delete {path.parent} to have it rendered again")
    if not docs:
        raise ValueError(f"the {split} split of {path} holds no documents; delete {path.parent} to render it again")
    return docs


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build (once) the standard library's docstrings corpus and print "
                                                 "its record.")
    parser.add_argument("--render", action="store_true", help="internal: render every module as JSON lines on stdout")
    args = parser.parse_args(argv)
    if args.render:
        out = sys.stdout  # modules may print when imported: keep the real stdout for the documents
        for d in _render_all():
            out.write(json.dumps(d) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(record(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
