"""The one exception conversion raises for problems a user can fix.

``ConversionError(path, message)`` renders as ``<path>: <message>``; the command line prints
it as ``error: <path>: <message>`` with no traceback and exit status 2 (as ``m2t-pretrain``
and ``m2t-transfer`` do). Raise it at the boundary (reading the input, recognising its
layout, writing the output); inside, trust the types.

Paths and messages quote names taken from the file (keys, prefixes), so a hostile file could
put a line break in the error; ``one_line`` escapes every character that would break it.
"""

from __future__ import annotations

import re
import unicodedata
from os import PathLike
from typing import Union

PathArg = Union[str, "PathLike[str]"]

#: Unicode categories that end a line for ``str.splitlines`` or a terminal (controls,
#: line and paragraph separators).
_LINE_BREAKING = ("Cc", "Zl", "Zp")


def one_line(text: str) -> str:
    """``text`` with control characters and line separators escaped (``\\n``, ``\\x1b``)."""
    if all(unicodedata.category(c) not in _LINE_BREAKING for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(c) in _LINE_BREAKING else c for c in text)


class ConversionError(Exception):
    """A checkpoint that cannot be converted, or an output that cannot be written."""

    def __init__(self, path: PathArg, message: str) -> None:
        self.path = one_line(str(path))
        self.message = one_line(message)
        super().__init__(f"{self.path}: {self.message}")


class ConversionWarning(UserWarning):
    """Something the user should know that does not stop the conversion (``--unsafe-load``)."""


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
