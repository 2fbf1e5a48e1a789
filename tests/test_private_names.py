"""Issue 17: every use of another library's private (underscore) name sits in its package's
``_private.py``, which says why; the rest of the code uses public API only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Underscore names that are public API: namedtuple's methods.
PUBLIC = {"_replace", "_asdict", "_fields", "_make"}


def private_uses(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``/``super()``, and ``from m import _name``
    of another package, in ``path``: ``line: code`` for each."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__") and node.attr not in PUBLIC:
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and getattr(base.func, "id", None) == "super":
                continue
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


@pytest.mark.parametrize("package", ["pretrain", "convert", "transfer"])
def test_private_names_of_libraries_are_used_in_private_py_only(package: str) -> None:
    own = {p.stem for p in (REPO / package).rglob("*.py")}
    offending = {}
    for path in sorted((REPO / package).rglob("*.py")):
        if path.name == "_private.py":
            continue
        uses = [u for u in private_uses(path)
                # the package's own private helpers (module._helper) are not a library's
                if u.split(": ", 1)[1].split(".")[0] not in own]
        if uses:
            offending[path.name] = uses
    assert offending == {}


def test_the_check_finds_a_private_name(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nfrom lvis.eval import _x\n"
                      "def f(t, self):\n    return t._version, self._ok, torch._foreach_add\n")
    assert [u.split(": ")[1] for u in private_uses(sample)] == [
        "from lvis.eval import _x", "t._version", "torch._foreach_add"]
