"""The library's layers and sizes, as tests: an import upward, a new long function or a new long module fails here.

The import graph is :func:`tests.test_imports.import_graph` (imports inside functions count, and so do the
``"overfill_lib.x:Name"`` strings the presets import by name); ``test_imports`` refuses a cycle in it.
"""

import ast

import pytest

from tests.test_imports import LIBRARY, import_graph

# The layers as the import graph drew them when this test was written, lowest first. A module may import modules of
# its own layer or a lower one, never a higher one (within a layer, the cycle test keeps the imports one-way).
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations: typed config, token rules, int8 weights and their CPU kernel, files, model shapes, timing",
     {"config", "tokens", "int8_kernel", "quantize", "artifacts", "architectures", "timing"}),
    ("inference: the stages, the pairing strategies, the pair, the fast path, what a step costs",
     {"generation", "pairing", "pair", "fast_decode", "cost"}),
    ("models and data: every measure of quality, the suite, the offline full model (and ``teacher``, its old name), "
     "GGUF and llama.cpp models, the lm-eval model, corpora",
     {"scoring", "tasks", "full_model", "teacher", "gguf_models", "llama_cpp", "lm_eval_model", "stdlib_corpus",
      "chat_data", "corpus"}),
    ("the work, on plain arguments: importance, pruning, window distillation, training and resuming it, latency",
     {"importance", "pruning", "windows", "training", "resume", "latency"}),
    ("presets: what a preset is", {"presets"}),
    ("runs that read a preset: the pipeline, lm-eval, the long runs, the planner, the GPU headline",
     {"pipeline", "evaluation", "ablation", "mmlu", "recovery", "distributed", "planner", "headline"}),
    ("what the notebooks use: figures, widgets, the workload a preset names, the workbook, the runner",
     {"plots", "widgets", "workloads", "workbook", "runner"}),
]

MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 800

# Today's offenders that other work is shortening: remove an entry when its function or module fits. Nothing may
# join this list; a function or module that grows past the limit fails the test below.
TOO_LONG_FOR_NOW: set[str] = set()


def layer_of() -> dict[str, int]:
    layers: dict[str, int] = {}
    for index, (_, modules) in enumerate(LAYERS):
        for module in modules:
            assert module not in layers, f"{module} is in two layers of LAYERS"
            layers[module] = index
    return layers


def upward_imports(graph: dict[str, dict[str, int]], layers: dict[str, int]) -> list[str]:
    """One line per import of a module from a higher layer than the importer's, naming both and the line."""
    found = []
    for module, imports in sorted(graph.items()):
        for imported, line in sorted(imports.items()):
            if layers[imported] > layers[module]:
                found.append(f"overfill_lib/{module}.py line {line} imports {imported}: {module} is in layer "
                             f"{layers[module]} ({LAYERS[layers[module]][0]}), {imported} in layer "
                             f"{layers[imported]} ({LAYERS[layers[imported]][0]})")
    return found


def test_every_module_has_one_layer():
    modules, layers = set(import_graph()), layer_of()
    unplaced, gone = sorted(modules - set(layers)), sorted(set(layers) - modules)
    assert not unplaced, (f"module(s) {unplaced} are in no layer: add each to the lowest layer of LAYERS "
                          "(tests/test_layers.py) that holds every module it imports")
    assert not gone, f"LAYERS names module(s) {gone} that overfill_lib no longer has: remove them"


def test_no_module_imports_from_a_higher_layer():
    graph, layers = import_graph(), layer_of()
    if set(graph) - set(layers):
        pytest.skip("a module is in no layer (test_every_module_has_one_layer says which)")
    upward = upward_imports(graph, layers)
    assert not upward, ("imports up a layer (move the code that needs the higher module up, or pass what it needs "
                        "as an argument; change LAYERS only if the layering itself should change):\n"
                        + "\n".join(upward))


def test_an_upward_import_is_named_by_file_line_and_layers():
    graph = {"tokens": {}, "pair": {"tokens": 3}}
    assert upward_imports(graph, {"tokens": 0, "pair": 1}) == []
    graph["tokens"]["pair"] = 7
    (message,) = upward_imports(graph, {"tokens": 0, "pair": 1})
    assert message.startswith("overfill_lib/tokens.py line 7 imports pair: tokens is in layer 0 (foundations")


def lengths(source: str, filename: str) -> dict[str, int]:
    """``file:qualified.name`` -> lines of every function and method (decorators, docstring and comments included),
    and ``file`` -> lines of the module."""
    out = {filename: len(source.splitlines())}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([d.lineno for d in child.decorator_list] + [child.lineno])
                    out[f"{filename}:{name}"] = child.end_lineno - first + 1
                visit(child, f"{name}.")

    visit(ast.parse(source), "")
    return out


def too_long(sizes: dict[str, int]) -> dict[str, int]:
    return {name: n for name, n in sizes.items()
            if n > (MAX_FUNCTION_LINES if ":" in name else MAX_MODULE_LINES)}


def test_no_function_over_80_lines_and_no_module_over_800():
    sizes: dict[str, int] = {}
    for path in sorted(LIBRARY.glob("*.py")):
        sizes.update(lengths(path.read_text(), path.name))
    over = too_long(sizes)
    new = {name: n for name, n in over.items() if name not in TOO_LONG_FOR_NOW}
    assert not new, (f"over {MAX_FUNCTION_LINES} lines a function or {MAX_MODULE_LINES} a module: "
                     + ", ".join(f"overfill_lib/{name} ({n} lines)" for name, n in sorted(new.items()))
                     + ": split it into named steps (or move a concept to its own module)")
    fixed = sorted(TOO_LONG_FOR_NOW - set(over))
    assert not fixed, f"{fixed} now fit (or are gone): remove them from TOO_LONG_FOR_NOW in tests/test_layers.py"


def test_the_size_check_measures_methods_and_nested_functions():
    source = "class A:\n    @staticmethod\n    def f():\n        def g():\n            pass\n        return g\n"
    assert lengths(source, "m.py") == {"m.py": 6, "m.py:A.f": 5, "m.py:A.f.g": 2}
    assert too_long({"m.py": 801, "m.py:f": 80, "m.py:g": 81}) == {"m.py": 801, "m.py:g": 81}
