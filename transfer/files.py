"""Writing a file so that a reader never sees half of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def replace_file(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` with what ``write`` puts in a file: a reader sees the old file or the
    new, never half.

    ``write`` fills ``.NAME.tmp-PID`` in the same folder, which is flushed to disk and renamed
    over ``path``; on any failure the temporary is removed and the error raised.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
