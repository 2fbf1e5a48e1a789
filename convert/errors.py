"""The one exception conversion raises for problems a user can fix.

``ConversionError(path, message)`` renders as ``<path>: <message>``; the command line prints
it as ``error: <path>: <message>`` with no traceback. Raise it at the boundary (reading the
input, recognising its layout, writing the output); inside, trust the types.
"""

from __future__ import annotations

from os import PathLike
from typing import Union

PathArg = Union[str, "PathLike[str]"]


class ConversionError(Exception):
    """A checkpoint that cannot be converted, or an output that cannot be written."""

    def __init__(self, path: PathArg, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message


class ConversionWarning(UserWarning):
    """Something the user should know that does not stop the conversion (``--unsafe-load``)."""
