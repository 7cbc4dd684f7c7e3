"""Imports point one way: no circles between the package's modules, models and evaluation
never reach into the pruning code. Read from the source (every import statement, also those
inside functions or under ``TYPE_CHECKING``), so a lazy import cannot hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import gqa_prune

ROOT = Path(gqa_prune.__file__).parent
# the pruning procedure: what a model or an evaluation must not depend on
PRUNING = (
    "gqa_prune.allocation",
    "gqa_prune.analysis",
    "gqa_prune.compensation",
    "gqa_prune.importance",
    "gqa_prune.pipeline",
    "gqa_prune.planning",
    "gqa_prune.runner",
    "gqa_prune.search",
    "gqa_prune.slicing",
    "gqa_prune.streaming",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("gqa_prune", *parts))


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from P import m`` counts as ``P.m``
    when ``P.m`` is a module)."""
    sources = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in sources)
            elif isinstance(node, ast.ImportFrom) and node.module in sources:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                found = subs & sources.keys()
                deps.update(found)
                if len(found) < len(subs):
                    deps.add(node.module)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def _reaches_into_pruning(graph: dict[str, set[str]], prefix: str) -> dict[str, list[str]]:
    return {
        m: sorted(d for d in deps if d.startswith(PRUNING))
        for m, deps in graph.items()
        if m.startswith(prefix) and any(d.startswith(PRUNING) for d in deps)
    }


def test_the_package_has_no_import_circles() -> None:
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_models_never_import_pruning_code() -> None:
    assert _reaches_into_pruning(import_graph(), "gqa_prune.models") == {}


def test_evaluation_judges_any_model() -> None:
    """Evaluation (the sub-command module included) needs no pruning step."""
    assert _reaches_into_pruning(import_graph(), "gqa_prune.evaluation") == {}


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    # gqa_prune.models.loading imports load_pruned; the sub-commands are found by name only
    assert "gqa_prune.models.checkpoint" in graph["gqa_prune.models.loading"]
    assert "gqa_prune.streaming" in graph["gqa_prune.pipeline"]
    assert "gqa_prune.importance.taylor" in graph["gqa_prune.importance.compute"]
