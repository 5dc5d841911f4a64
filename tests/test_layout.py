"""The package's shape: commands on top, libraries by concern below, and no import cycle anywhere.

Every import statement of the package and the benchmarks (function-level ones included) is read from
the source, so a cycle that only bites at run time, or a library module that reaches up into a
command, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

PACKAGE = REPO / "posttrain"
BENCHMARKS = REPO / "benchmarks"
# Lower layers never import higher ones; modules of one layer may import each other (acyclically).
# The top-level modules (the commands users run) are above every subpackage.
LAYERS = {
    "outputs": 0,
    "conversion": 1,
    "data": 2,
    "generation": 3,
    "training": 4,
    "evaluation": 4,
    "demo": 5,
}
MAX_TOP_LEVEL_MODULES = 12


def module_name(path: Path) -> str:
    if path.is_relative_to(BENCHMARKS):
        return "benchmarks." + path.stem
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + sorted(BENCHMARKS.glob("*.py"))


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}, from every import statement in its source."""
    files = source_files()
    known = {module_name(p) for p in files}
    benchmark_names = {p.stem for p in BENCHMARKS.glob("*.py")}
    graph = {}
    for path in files:
        name = module_name(path)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if name.startswith("benchmarks.") and target.split(".")[0] in benchmark_names:
                    target = "benchmarks." + target.split(".")[0]
                while target and target not in known:  # `from pkg import name`: the module that defines it
                    target = target.rpartition(".")[0]
                if target and target != name and not (name.startswith(target + ".") and target == "posttrain"):
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> float:
    """A module's layer: its subpackage's, infinity for a top-level command, -1 for the package itself."""
    parts = module.split(".")
    if module == "posttrain":
        return -1
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return float("inf")


def test_no_import_cycle_in_the_package_or_the_benchmarks():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    upward = [
        (module, target, layer(module), layer(target))
        for module, targets in graph.items()
        if module.startswith("posttrain")
        for target in targets
        if target.startswith("posttrain") and layer(target) > layer(module)
    ]
    assert upward == []
    same_layer = [
        (module, target)
        for module, targets in graph.items()
        if module.startswith("posttrain.")
        for target in targets
        if target.startswith("posttrain.")
        and layer(module) == layer(target) < float("inf")
        and module.split(".")[1] != target.split(".")[1]
    ]
    assert same_layer == []  # training and evaluation stand side by side, neither using the other


def test_every_subpackage_is_a_known_layer_says_what_lives_there_and_is_in_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert set(subpackages) == set(LAYERS)
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc.splitlines()) <= 3, name
        assert f"`posttrain/{name}/`" in readme, name


def test_top_level_holds_only_the_commands():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    stray = [p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__" and p.name not in LAYERS]
    assert stray == []


@pytest.mark.parametrize("module", ["posttrain.outputs.atomic", "posttrain.conversion.tokenizer"])
def test_graph_sees_function_level_imports(module):
    # both import lower modules at module level; the graph must list them (a sanity check of the reader)
    assert import_graph()[module]
