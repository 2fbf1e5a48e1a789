"""The one exception type the transfer stage raises for bad input.

Everything a user can get wrong (a config name, a dataset path, a weights file) is checked
at the boundary and reported as ``error: <path>: <what is wrong>``; the CLI prints that line
and exits with status 2 (as ``m2t-pretrain`` and ``m2t-convert`` do) instead of showing a
traceback from inside Detectron2.
"""

from __future__ import annotations

import re
from pathlib import Path


class TransferError(Exception):
    """Bad input for the transfer stage: ``str(err)`` is ``"<path>: <what is wrong>"``."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


# ----- the same in pretrain/, convert/ and transfer/ (the packages import nothing of each
# other): one wording for every error line and every refused pickle -------------------------

#: How torch's weights-only unpickler names a global it refuses (its wordings in torch 2.x).
_REFUSED_GLOBAL = re.compile(
    r"(?:Unsupported global: GLOBAL |unsupported GLOBAL |but got <class ')([\w.]+)")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``str(exc)`` (the type's name if that is empty), at most ``limit``
    characters: what an ``error:`` line quotes of a library's exception.

    >>> first_line(ValueError("bad header\\n  at byte 12"))
    'bad header'
    """
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def refused_global(exc: BaseException) -> str | None:
    """The dotted name of the global that weights-only unpickling refused in ``exc``, if any."""
    found = _REFUSED_GLOBAL.search(str(exc))
    return found.group(1) if found else None


def refused_pickle(name: str, advice: str) -> str:
    """What is wrong with a file that pickles ``name``, which safe loading never runs."""
    return (f"the file pickles a {name} object, which safe loading refuses (it could run "
            f"code); {advice}")
