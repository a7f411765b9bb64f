"""The library's modules form layers: no module imports, even inside a function, one that imports it back."""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "overfill_lib"


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line}, counting imports inside functions and the ``"overfill_lib.x:Name"`` strings
    that ``presets.SECTION_TYPES`` imports by name."""
    modules = {p.stem for p in LIBRARY.glob("*.py")} - {"__init__"}
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module in modules:
        for node in ast.walk(ast.parse((LIBRARY / f"{module}.py").read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "overfill_lib":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("overfill_lib."):
                names = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("overfill_lib.")]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("overfill_lib."):
                names = [node.value.split(":")[0].split(".")[1]] if ":" in node.value else []
            for name in names:
                if name in modules and name != module:
                    graph[module].setdefault(name, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_among_the_library_modules():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 2}}) is None
    graph = import_graph()
    assert "pair" in graph["training"]  # imported inside functions only
    assert "latency" in graph["presets"]  # the string "overfill_lib.latency:LatencySettings"


def test_gpu_headline_needs_only_torch_and_transformers():
    """`make gpu-headline` runs on a bare GPU machine (torch, transformers and what they pull in): the headline
    module and what it imports must load, and its dry run work, with the project's other dependencies absent."""
    import subprocess
    import sys

    absent = ["datasets", "accelerate", "lm_eval", "papermill", "nbconvert", "nbformat", "ipykernel", "ipywidgets",
              "IPython", "plotly", "pandas", "gguf", "kaleido", "jupyterlab"]
    # A None in sys.modules makes `import x` fail and importlib.util.find_spec("x") report it missing.
    code = f"""
import sys
sys.modules.update(dict.fromkeys({absent!r}))
from overfill_lib import headline
assert headline.run(dry_run=True)["plan"]
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=LIBRARY.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
