"""The package's shape, as the run issue fixed it: no import circle (type-only and function-local
imports included), no module over 450 lines, one owner for the run directory's file names and one
for the process topology."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cnnkit"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the cnnkit modules it imports anywhere in its body (``from a.b import c`` names
    ``a.b.c`` when that is a module, else ``a.b``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if start not in colour:
            found = visit(start)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_450_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def _code_spelling(pattern: str) -> set[str]:
    """Modules whose code (docstrings and comments aside) contains ``pattern``."""
    found = set()
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(pattern, node.value):
                if id(node) not in docstrings:
                    found.add(name)
            elif isinstance(node, ast.Name | ast.Attribute | ast.arg | ast.keyword):
                ident = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "arg", None)
                if ident and re.fullmatch(pattern, ident):
                    found.add(name)
    return found


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (of modules, classes, functions, attributes)."""
    found: set[int] = set()
    for owner in ast.walk(tree):
        if isinstance(owner, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = owner.body
            for index, statement in enumerate(body):
                first_or_after_assignment = index == 0 or isinstance(body[index - 1], ast.AnnAssign | ast.Assign)
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) and first_or_after_assignment:
                    found.add(id(statement.value))
    return found


def test_config_json_is_spelled_in_one_module() -> None:
    assert _code_spelling(r"config\.json") == {"cnnkit.rundir"}


def test_world_size_is_the_strategy_s_and_the_config_s() -> None:
    assert _code_spelling(r"world_size") <= {"cnnkit.training.strategy", "cnnkit.config"}
