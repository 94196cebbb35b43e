"""The package layering of docs/architecture.md, checked on the source: no import cycle between fmforge's
packages (function-level imports count: a lazy import that dodges a cycle is still a cycle), ``models/`` a
leaf, and fmforge-internal imports at the top of modules unless they guard an optional dependency."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import fmforge

ROOT = Path(fmforge.__file__).parent
LAZY = re.compile(r"^fmforge(\.\w+)+:\w+$")  # a fmforge.lazy target: imported when used, an import all the same


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, parts, ast.parse(path.read_text(), str(path))


def _internal_imports(parts: list[str], tree: ast.Module):
    """(node, imported fmforge module path as a list) for every import of fmforge in the module."""
    package = parts if tree and parts and (ROOT.parent / Path(*parts) / "__init__.py").is_file() else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "fmforge":
                target = node.module.split(".")
            else:
                continue
            yield node, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fmforge":
                    yield node, alias.name.split(".")


def _lazy_targets(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and LAZY.match(node.value):
            yield node.value.partition(":")[0].split(".")


def _unit(parts: list[str]) -> str | None:
    """fmforge.a.b -> "a" (a package or a top-level module)."""
    return parts[1] if len(parts) > 1 else None


def _package_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for _, parts, tree in _modules():
        src = _unit(parts)
        targets = [target for _, target in _internal_imports(parts, tree)] + list(_lazy_targets(tree))
        for target in targets:
            dst = _unit(target)
            if src and dst and src != dst:
                edges[src].add(dst)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_fmforge_packages():
    assert _cycles(_package_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lazy_targets_count_as_imports_and_name_real_modules():
    tree = ast.parse('T = {"clm": "fmforge.objectives.clm:CausalLMTask", "note": "see fmforge.lazy"}')
    assert list(_lazy_targets(tree)) == [["fmforge", "objectives", "clm"]]
    for _, _, module_tree in _modules():
        for target in _lazy_targets(module_tree):
            assert (ROOT.parent / Path(*target)).with_suffix(".py").is_file(), ".".join(target)


def test_models_is_a_leaf():
    assert _package_graph()["models"] <= {"errors"}


def test_fmforge_imports_sit_at_the_top_of_modules():
    nested = []
    for path, parts, tree in _modules():
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested += [f"{path.relative_to(ROOT)}:{node.lineno}" for node, _ in _internal_imports(parts, func)
                           if id(node) not in guarded]
    assert nested == []
