"""The benchmark modules import each other without a cycle, lazy imports inside functions included.

NOTE: import-linter's ``acyclic_siblings`` contract could say this, but only with ``benchmarks`` among
pyproject's ``root_packages``, and tests/unit/test_import_layers.py runs ``lint-imports`` on a copy of
the tree without ``benchmarks/`` (grimp then fails on the missing package). So the graph is read here
with ``ast``: every ``import`` / ``from ... import`` of a ``benchmarks`` module, at any depth in a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests import REPO_ROOT

PACKAGE = "benchmarks"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``module`` imports, relative imports resolved; ``from a import b`` gives ``a.b``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports.

    Each imported name maps to the longest module it starts with: ``from benchmarks.common import table``
    and ``from benchmarks import common`` both give ``benchmarks.common``.
    """
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        targets = set()
        for name in names:
            parts = name.split(".")
            known = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in files), None)
            if known is not None and known != module:
                targets.add(known)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None when ``graph`` is acyclic (depth-first search, three colours)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_benchmark_modules_import_no_cycle() -> None:
    graph = import_graph(REPO_ROOT)
    assert "benchmarks.compression_common" in graph["benchmarks.compression_gpu"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "benchmark import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_on_synthetic_graphs() -> None:
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_a_lazy_or_relative_import_cycle_is_caught(tmp_path: Path) -> None:
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "cpu.py").write_text("def main():\n    from benchmarks.sub.gpu import run\n    run()\n")
    (package / "sub" / "gpu.py").write_text("from .. import cpu\nfrom . import helpers\n")
    (package / "sub" / "helpers.py").write_text("import os\n")
    graph = import_graph(tmp_path)
    assert graph["benchmarks.sub.gpu"] == {"benchmarks.cpu", "benchmarks.sub.helpers"}
    assert find_cycle(graph) == ["benchmarks.cpu", "benchmarks.sub.gpu", "benchmarks.cpu"]
