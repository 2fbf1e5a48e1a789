"""The packages' imports: no import cycles, and the stages import each other one way only.

A cycle is found from the source (``ast``), not by importing: the imports of every file of
the packages, relative imports resolved, never those under ``if TYPE_CHECKING:``. Two graphs:
the module-level imports (class bodies and module-level blocks included), which run at import
time, and those plus the imports inside functions, which run later but are dependencies all
the same (an import moved into a function to dodge a cycle leaves the cycle). ``from P import name`` is an edge to the submodule ``P.name``
when there is one, else to ``P``; importing ``a.b.c`` also runs ``a.b``'s ``__init__``, so it
is an edge to each package on the way that is not one of the importer's own packages (a
module's own packages are already being imported when it runs).

The stage rule (STYLE.md: "Nothing in ``pretrain/`` imports ``transfer/``; ``convert/``
depends on neither"; the job plumbing is a leaf) is checked on every import, in functions
too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = tuple(name for name in ("pretrain", "convert", "transfer", "jobs")
                 if (REPO / name / "__init__.py").is_file())
#: The packages each package must never import, at any level.
FORBIDDEN = {"pretrain": {"transfer"}, "convert": {"pretrain", "transfer"},
             "jobs": {"pretrain", "convert", "transfer"}}


def modules_of(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of ``packages`` under ``root``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(body: list[ast.stmt], deferred: bool = False
                 ) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run when the module whose ``body`` this is runs (class
    bodies and module-level blocks included); with ``deferred``, those in functions too.
    Never those under ``if TYPE_CHECKING:``, which do not run."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from import_nodes(node.orelse, deferred)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not deferred:
            continue
        else:
            yield from import_nodes([c for c in ast.iter_child_nodes(node) if isinstance(
                c, (ast.stmt, ast.excepthandler, ast.match_case))], deferred)


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool
                   ) -> list[tuple[str, list[str]]]:
    """``(imported module, names taken from it)`` pairs of one import statement, absolute."""
    if isinstance(node, ast.Import):
        return [(alias.name, []) for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [(target, [alias.name for alias in node.names])]


def import_graph(root: Path, packages: tuple[str, ...], deferred: bool = False
                 ) -> dict[str, set[str]]:
    """Module → the modules of ``packages`` its import runs (``deferred``: or any of its
    functions imports)."""
    modules = modules_of(root, packages)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        own = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            own.add(name)
        for node in import_nodes(tree.body, deferred):
            for target, names in imported_names(node, name, path.name == "__init__.py"):
                parts = target.split(".")
                wanted = {".".join(parts[:k]) for k in range(1, len(parts))} - own
                subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
                if len(subs) < len(names) or not names:
                    wanted.add(target)
                graph[name] |= {m for m in wanted | subs if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected component of two or
    more modules (Tarjan's algorithm, then a walk inside the component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:
        start = min(component)
        path, seen = [start], {start: 0}
        while True:  # every module of the component reaches start, so this ends
            nxt = min(w for w in graph[path[-1]] if w in component)
            if nxt in seen:
                found.append(path[seen[nxt]:] + [nxt])
                break
            seen[nxt] = len(path)
            path.append(nxt)
    return sorted(found)


def stage_violations(root: Path, packages: tuple[str, ...]) -> list[str]:
    """``file:line: package imports other`` for every import, at any depth, that
    ``FORBIDDEN`` rules out."""
    out = []
    for name, path in modules_of(root, packages).items():
        package = name.split(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in FORBIDDEN.get(package, set()):
                    out.append(f"{path.relative_to(root)}:{node.lineno}: {package} imports "
                               f"{target}")
    return out


def _named(found: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_import_cycles_at_import_time() -> None:
    """A cycle of module-level imports breaks (a name not yet defined) depending on which
    module a user imports first."""
    found = cycles(import_graph(REPO, PACKAGES))
    assert not found, f"import cycles: {_named(found)}"


def test_no_import_cycles_through_deferred_imports() -> None:
    """An import moved into a function to dodge a cycle leaves the cycle in the design: the
    two modules still need each other."""
    found = cycles(import_graph(REPO, PACKAGES, deferred=True))
    assert not found, f"import cycles (counting imports inside functions): {_named(found)}"


def test_the_stages_import_each_other_one_way_only() -> None:
    assert stage_violations(REPO, PACKAGES) == []


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_finds_cycles_and_tells_deferred_ones(tmp_path: Path) -> None:
    _package(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from .c import g\n",  # a -> c inside a function only
        "pkg/c.py": "from .a import f\n",
        "pkg/b.py": "import os\nfrom pkg.sub.d import h\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from ..c import x\ntry:\n    from .. import b\nexcept ImportError:\n"
                        "    pass\n",
    })
    assert cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.b", "pkg.sub.d", "pkg.b"]]
    assert cycles(import_graph(tmp_path, ("pkg",), deferred=True)) == [
        ["pkg.a", "pkg.c", "pkg.a"], ["pkg.b", "pkg.sub.d", "pkg.b"]]


def test_the_check_follows_package_inits(tmp_path: Path) -> None:
    """Importing ``pkg.sub.e`` runs ``pkg/sub/__init__.py``, which imports the importer."""
    _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub.e import x\n",
        "pkg/sub/__init__.py": "from ..a import y\n",
        "pkg/sub/e.py": "x = 1\n",
    })
    assert cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.sub", "pkg.a"]]


@pytest.mark.parametrize("source", ["import transfer.train\n",
                                    "def f():\n    from transfer.train import x\n"])
def test_the_check_finds_a_stage_import(tmp_path: Path, source: str) -> None:
    _package(tmp_path, {"pretrain/__init__.py": "", "pretrain/m.py": source})
    assert stage_violations(tmp_path, ("pretrain",)) == [
        f"pretrain/m.py:{source.count(chr(10))}: pretrain imports transfer.train"]
