"""The project's modules import one another in one direction: no circle, and training and serving meet only
through ``models`` and the decision-log reader.

Every module of ``serving/``, ``training/``, ``models/`` and the top-level modules (``retention.py``,
``retention_demo.py``) is parsed with :mod:`ast`, and *every* import counts: at module level, inside a
function, under ``if TYPE_CHECKING:``. A deferred or type-only import is still a dependency a reader must
follow, so a circle through one is still a circle.

The rules:

* no import circle among the project's modules (the failure names the circle, module by module);
* ``serving`` imports nothing from ``training``;
* ``models`` imports nothing from ``serving`` or ``training``;
* ``training`` imports from ``serving`` only the decision-log reader, ``serving.log_reader``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("serving", "training", "models")
TOP_LEVEL = ("retention", "retention_demo")
#: the one serving module training may import: reading the decision log is how training gets its data
LOG_READER = "serving.log_reader"


def project_modules() -> dict[str, Path]:
    """Return every project module's dotted name and file (a package's ``__init__`` under the package's name)."""
    modules = {name: ROOT / f"{name}.py" for name in TOP_LEVEL}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Return the project modules `name` imports anywhere in its file (``from pkg import mod`` counts as ``pkg.mod``,
    not as the package ``pkg``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def project(target: str) -> str | None:
        # the module itself, or the nearest project package that holds the imported name
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, one level up per extra dot
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            hit = project(target)
            if hit is not None and hit != name:
                found.add(hit)
    return found


def import_graph() -> dict[str, set[str]]:
    """Return each project module's set of imported project modules."""
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[frozenset[str], list[str]]]:
    """Return each strongly connected component of more than one module with a circle through it (``a, b, ..., a``)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [(frozenset(c), circle_in(graph, set(c))) for c in components]


def circle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """Return a shortest circle through the component's first module, as the path of imports that closes it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle in the component {sorted(component)}")


def layer_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Return the imports that cross a package boundary the rules forbid, as (importer, imported) pairs."""
    bad = set()
    for src, targets in graph.items():
        side = src.partition(".")[0]
        for dst in targets:
            other = dst.partition(".")[0]
            if (side == "serving" and other == "training") or (side == "models" and other in ("serving", "training")) or (side == "training" and other == "serving" and dst != LOG_READER):
                bad.add((src, dst))
    return bad


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert {"serving.app", "training.train", "models.catalog", "retention", "retention_demo"} <= set(graph)
    assert "models.catalog" in graph["serving.app"]  # at module level
    assert "training.train" in graph["retention_demo"]  # inside a function
    assert "serving.metrics" in graph["serving.notifications"]  # under TYPE_CHECKING
    assert "serving.database" in graph["serving.profiles_cli"]  # from serving import database
    assert "serving" not in graph["serving.profiles_cli"]


def test_no_import_circle_deferred_or_type_only_included() -> None:
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(
        " -> ".join(path) + (f"  (circles among {', '.join(sorted(c))})" if len(c) > len(path) - 1 else "")
        for c, path in found
    )


def test_training_and_serving_meet_only_through_models_and_the_log_reader() -> None:
    found = layer_violations(import_graph())
    assert not found, "imports across the layers (serving never imports training, models neither, training only " \
        f"{LOG_READER}):\n" + "\n".join(f"{a} imports {b}" for a, b in sorted(found))


def test_a_circle_is_reported_as_its_path() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [(frozenset("abc"), ["a", "b", "c", "a"])]
