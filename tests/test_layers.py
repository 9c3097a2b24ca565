"""The package's layers import downward only: no import circles (function-level imports included), and
the model stays plain (no Ray, no torch.distributed, no rich, none of the package's I/O or training code)."""

from __future__ import annotations

import ast
from pathlib import Path

import mtnlg_ray

PACKAGE = Path(mtnlg_ray.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path) -> set[str]:
    """Every module `path` imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            # A package's __init__ importing its own submodules is how packages work, not a circle.
            if len(component) > 1 and not _package_and_children(component):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package_and_children(component: list[str]) -> bool:
    shortest = min(component, key=len)
    return all(m == shortest or m.startswith(shortest + ".") for m in component)


def test_the_walk_sees_function_level_imports_and_finds_a_planted_circle():
    graph = _graph()
    assert "mtnlg_ray.jobs" in graph["mtnlg_ray.cli.cluster"]  # imported inside the `submit` command
    assert _cycles({**graph, "mtnlg_ray.errors": {"mtnlg_ray.jobs"}})  # errors → jobs → errors


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_model_imports_no_ray_no_distributed_no_rich_and_nothing_above_it():
    allowed = ("mtnlg_ray.errors", "mtnlg_ray.model")
    banned = ("ray", "torch.distributed", "rich")
    offenders = []
    for name, path in _modules().items():
        if not (name == "mtnlg_ray.model" or name.startswith("mtnlg_ray.model.")):
            continue
        for imported in _imports(path):
            top = imported.split(".")
            if any(imported == b or imported.startswith(b + ".") for b in banned) or (
                top[0] == "mtnlg_ray" and not any(imported == a or imported.startswith(a + ".") for a in allowed)
            ):
                offenders.append(f"{name} imports {imported}")
    assert offenders == []
