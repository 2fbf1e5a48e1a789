"""The one exception type the transfer stage raises for bad input.

Everything a user can get wrong (a config name, a dataset path, a weights file) is checked
at the boundary and reported as ``error: <path>: <what is wrong>``; the CLI prints that line
and exits non-zero instead of showing a traceback from inside Detectron2.
"""

from __future__ import annotations

from pathlib import Path


class TransferError(Exception):
    """Bad input for the transfer stage: ``str(err)`` is ``"<path>: <what is wrong>"``."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.message = message
