"""The one exception conversion raises for problems a user can fix.

``ConversionError(path, message)`` renders as ``<path>: <message>``; the command line prints
it as ``error: <path>: <message>`` with no traceback. Raise it at the boundary (reading the
input, recognising its layout, writing the output); inside, trust the types.

Paths and messages quote names taken from the file (keys, prefixes), so a hostile file could
put a line break in the error; ``one_line`` escapes every character that would break it.
"""

from __future__ import annotations

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
