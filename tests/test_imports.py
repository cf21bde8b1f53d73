"""No import cycle among the project's modules (pipeline/, search_spaces/).

The graph is read from the source with ``ast``, not by importing. What counts as an edge:

- every ``import`` statement of a module, wherever it stands: at module level, and also
  inside functions, ``try`` blocks and conditionals. A function-level import only
  defers a cycle to run time (the one issue 16 removed, stage 1 importing the search
  stage's budgets back, went through one), so it is a cycle of the design all the same;
- ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to
  ``pkg``; relative imports are resolved against the importing module's package;
- importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so those are edges
  too, except the importer's own enclosing packages (already being imported when it runs).

Imports by name at run time (``importlib.import_module`` in ``pipeline/run.py``) are not
seen; nothing they name imports ``pipeline.run`` back.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "search_spaces")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, directly or through a package's __init__."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if _is_package(path):
        own.add(name)
    edges = set()
    for target in found:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the target and every package above it
            mod = ".".join(parts[:i])
            if mod in modules and mod not in own:
                edges.add(mod)
    edges.discard(name)
    return edges


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle_among_project_modules():
    graph = _graph()
    assert len(graph) > 20 and "pipeline.search.stage" in graph  # the walk found the tree
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_search_spaces_does_not_import_pipeline():
    graph = _graph()
    wrong = {m: sorted(d for d in deps if d.split(".")[0] == "pipeline")
             for m, deps in graph.items() if m.split(".")[0] == "search_spaces"}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_the_walk_sees_function_level_relative_and_package_imports(tmp_path):
    graph = _graph()
    assert "pipeline.export" in graph["pipeline.retrain"]  # imported inside a function
    assert "pipeline.train_supernet" in graph["pipeline.search.stage"]  # from ..train_supernet
    # A module importing the search package's indicators also runs pipeline/search/__init__.py,
    # which imports every search module, and they import the budgets: had the budgets taken
    # check_table from the indicators, that would have been a cycle.
    fake = tmp_path / "budgets.py"
    fake.write_text("def f():\n    from .search.indicators import Indicator\n")
    edges = _imports("pipeline.budgets", fake, _modules())
    assert edges == {"pipeline.search", "pipeline.search.indicators"}
    graph["pipeline.budgets"] = graph["pipeline.budgets"] | edges
    cycle = _cycle(graph)
    assert cycle is not None and {"pipeline.budgets", "pipeline.search"} <= set(cycle)
