"""``docs/spec-changes.md`` says what the code does where an issue changed SPEC: the recipe
values it states are read from the code here, so that the page cannot drift from it."""

from __future__ import annotations

import re
from pathlib import Path

from pretrain.checkpoint import EVALUATED_BRANCH
from pretrain.methods import METHODS

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "spec-changes.md").read_text()


def _row(section: str) -> str:
    rows = [line for line in PAGE.splitlines() if line.startswith(f"| {section} ")]
    assert len(rows) == 1, section
    return rows[0]


def test_the_momentum_row_states_each_methods_own_m0() -> None:
    row = _row("§1 (teacher EMA), §1.2")
    byol = METHODS["byol"]
    assert (byol.authors_momentum(300), byol.authors_momentum(301)) == (0.99, 0.996)
    assert "BYOL 0.99 up to 300 epochs and 0.996 beyond" in row
    for method, name in (("eman", "EMAN"), ("m2t", "m2t"), ("projector_only", "projector_only")):
        m0 = METHODS[method].authors_momentum(100)
        assert METHODS[method].authors_momentum(800) == m0
        assert re.search(rf"\b{name} {m0}\b", row), (method, m0)


def test_the_weight_decay_row_names_the_methods_that_exclude_bn_and_biases() -> None:
    row = _row("§1.1 (recipe)")
    excluded = sorted(m for m, cls in METHODS.items() if not cls.decays_bn_and_bias)
    assert excluded == ["byol", "eman"]
    assert "BYOL and EMAN exclude BN parameters and biases from weight decay" in row


def test_the_export_row_states_each_methods_branch() -> None:
    row = _row("§1.1, last point")
    assert EVALUATED_BRANCH == {"m2t": "teacher", "byol": "student", "eman": "student",
                                "projector_only": "student"}
    assert ("the teacher for m2t, the student (online network) for byol, eman and "
            "projector_only") in row
