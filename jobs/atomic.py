"""The one way the toolkit writes a file: a reader sees the old file or the new, never half.

Each file is written to a temporary beside it (same folder, so same file system), flushed to
disk, and renamed over its name (``os.replace``); on any failure the temporary is removed
and the error raised, and the old file is as it was. The temporary is ``.NAME.tmp-PID``,
which no reader takes for a result or a checkpoint (``TEMPORARY``); with ``keep_suffix`` it
is ``.STEM.PID.tmp.SUFFIX``, for a check that reads it by its suffix before it is renamed.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "results.json"
>>> write_json(out, {"AP": 1.0})
>>> out.read_text()
'{\\n  "AP": 1.0\\n}\\n'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

#: Something that fills an open binary file.
Writer = Callable[[IO[bytes]], Any]
#: The name of a temporary of :func:`replace_file`.
TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")


def temporary_of(path: Path, keep_suffix: bool = False) -> Path:
    """Where ``path`` is written before it takes its name."""
    if keep_suffix:
        return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_file(path: str | Path, write: Writer) -> None:
    """Replace ``path`` with what ``write`` puts in a file (see the module)."""
    replace_files([(Path(path), write)])


def replace_files(files: Sequence[tuple[Path, Writer]],
                  check: Callable[[Path], Any] | None = None, keep_suffix: bool = False) -> None:
    """:func:`replace_file` for files that belong together (a .pkl and its .yaml): each is
    written and fsynced as a temporary, ``check`` runs on the first one's, and only then are
    all renamed; on any failure every temporary is removed and no file changes.

    An ``OSError`` names the file being replaced (not its temporary) as its ``filename``.
    """
    staged: list[tuple[Path, Path]] = []
    current = Path(files[0][0])
    try:
        for path, write in files:
            current = Path(path)
            tmp = temporary_of(current, keep_suffix)
            staged.append((current, tmp))
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        if check is not None:
            current = staged[0][0]
            check(staged[0][1])
        for current, tmp in staged:
            os.replace(tmp, current)
    except BaseException as exc:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            exc.filename, exc.filename2 = str(current), None
        raise
    for folder in {path.parent for path, _ in staged}:
        _fsync_folder(folder)


def write_bytes(path: str | Path, data: bytes, *, if_changed: bool = False) -> None:
    """Replace ``path`` with ``data``; ``if_changed``: a file that already holds ``data`` is
    left as it is (its time stamp included)."""
    path = Path(path)
    if if_changed:
        try:
            if path.is_file() and path.read_bytes() == data:
                return
        except OSError:
            pass
    replace_file(path, lambda f: f.write(data))


def write_text(path: str | Path, text: str, *, if_changed: bool = False) -> None:
    """Replace ``path`` with ``text`` (UTF-8)."""
    write_bytes(path, text.encode("utf-8"), if_changed=if_changed)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    """Replace ``path`` with ``obj`` as JSON (``indent`` as ``json.dumps``) and a newline."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def _fsync_folder(folder: Path) -> None:
    """Make the renames durable (best effort: not every file system can fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
