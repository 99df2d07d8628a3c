"""The package's layers, read from the source: every import counts, including those under
TYPE_CHECKING and inside functions.

- no import cycles between modules of app/;
- nothing under app/api imports torch (the HTTP side never touches tensors);
- app/engine and app/modeling import nothing from app/api; app/config imports nothing from
  app/api;
- app/modeling imports nothing from app/engine (the forward knows no scheduling).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "app"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in APP.rglob("*.py")}


def imported_names(path: Path, name: str) -> Iterator[str]:
    """Every module name an import statement anywhere in the file names (absolute form)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def app_imports() -> dict[str, set[str]]:
    """module -> the app modules it imports (a package import counts as its __init__)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        graph[name] = {n for n in imported_names(path, name) if n in known and n != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
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


def test_no_import_cycles() -> None:
    assert cycles(app_imports()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_api_never_imports_torch() -> None:
    offenders = {
        name
        for name, path in modules().items()
        if under(name, "app.api")
        for imported in imported_names(path, name)
        if under(imported, "torch")
    }
    assert offenders == set()


def test_lower_layers_never_import_the_api() -> None:
    graph = app_imports()
    lower = ("app.engine", "app.modeling", "app.config", "app.options", "app.prompts")
    offenders = {
        (name, imported)
        for name, imports in graph.items()
        if any(under(name, layer) for layer in lower)
        for imported in imports
        if under(imported, "app.api")
    }
    assert offenders == set()


def test_modeling_never_imports_the_engine() -> None:
    graph = app_imports()
    offenders = {
        (name, imported)
        for name, imports in graph.items()
        if under(name, "app.modeling")
        for imported in imports
        if under(imported, "app.engine")
    }
    assert offenders == set()
