"""The values a numeric option may take, and the one check that says so.

>>> check_range("--nodes", 2, Range(low=1))
>>> check_range("--nodes", 0, Range(low=1))
Traceback (most recent call last):
...
jobs.errors.JobError: --nodes must be >= 1, got 0
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any

from .errors import JobError

INT64 = 2**63  # numbers torch keeps in 64 bits (seeds, sizes, step counts) stay below this

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: finite, between ``low`` and ``high``.

    A bound is left out with ``None``; ``low_open``/``high_open`` exclude the bound itself.
    ``why`` is said when a value falls outside. Integers always fit in 64 bits.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and not -INT64 <= value < INT64:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{low}, {high}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "a finite number"


def _number(bound: float | None) -> str:
    return "2**63" if bound == INT64 else f"{bound:g}" if isinstance(bound, float) else str(bound)


def short_repr(value: Any) -> str:
    """``repr`` cut to a few dozen characters (a YAML alias can expand a value enormously)."""
    return _SHORT.repr(value)


def check_range(what: str, value: Any, allowed: Range | None) -> None:
    """Refuse ``value`` outside ``allowed`` (None: not given, allowed): ``JobError`` with
    ``str()`` ``WHAT must be >= 1, got 0 (why)``."""
    if allowed is None or value is None or value in allowed:
        return
    why = f" ({allowed.why})" if allowed.why else ""
    finite = "finite and " if isinstance(value, float) and not math.isfinite(value) else ""
    detail = f"must be {finite}{allowed}, got {short_repr(value)}{why}"
    raise JobError(what, detail, text=f"{what} {detail}")
