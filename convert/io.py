"""Reading checkpoints (through iopath: local paths and URLs alike) and writing outputs atomically.

Reading uses ``torch.load(weights_only=True)``: a checkpoint is data, and loading it must not
run code from the file. The few plain-data types common self-supervised checkpoints pickle
besides tensors are allowed explicitly (``SAFE_GLOBALS``); a file that pickles anything else
is refused with the type named; ``unsafe=True`` (``--unsafe-load``) falls back to a full
unpickle for files the user trusts, with a warning. A file that is not a checkpoint at all is
named by kind (``sniff``); only regular files are read (a FIFO would block for ever).

Writing goes to a temporary file in the output's directory, then ``os.replace``: a reader
never sees half a file, and a failed conversion leaves nothing behind. An output is only ever
a new or a regular file, and never the input itself (``check_writable``).
"""

from __future__ import annotations

import argparse
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from iopath.common.file_io import HTTPURLHandler, PathManager

from . import sniff
from .errors import ConversionError, ConversionWarning, first_line, refused_global, refused_pickle

#: Types that weights-only loading may rebuild besides tensors and containers: plain data
#: found in common self-supervised checkpoints (DINO, iBOT and others save their
#: ``argparse.Namespace`` of arguments under ``args``). Nothing here runs code on load.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

#: Local paths, plus http(s)/ftp URLs (downloaded once into iopath's cache).
PATHS = PathManager()
PATHS.register_handler(HTTPURLHandler())


def is_url(path: str) -> bool:
    return "://" in path


def load_checkpoint(path: str, unsafe: bool = False) -> Any:
    """The object ``torch.save`` wrote to ``path``, with every tensor on the CPU."""
    if not is_url(path):
        _check_input_file(Path(path))
    try:
        with PATHS.open(path, "rb") as f:
            head = f.read(sniff.HEAD_BYTES)
            f.seek(0)
            if not sniff.is_checkpoint_head(head):
                raise ConversionError(path, sniff.non_checkpoint_kind(head))
            kind = sniff.zip_kind(f) if head.startswith(sniff.ZIP_MAGIC) else None
            if kind is not None:
                raise ConversionError(path, kind)
            return _torch_load(f, path, unsafe)
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(path, f"cannot read: {e.strerror or e}") from None
    except Exception as e:  # iopath handlers raise their own types for URLs they cannot fetch
        raise ConversionError(path, f"cannot read: {e}") from None


def _check_input_file(path: Path) -> None:
    """Refuse a local input that is missing or not a regular file (a FIFO would hang)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise ConversionError(path, "is a symbolic link to a missing file") from None
        raise ConversionError(path, "no such file") from None
    except OSError as e:
        raise ConversionError(path, f"cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise ConversionError(path, "is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        raise ConversionError(path, f"is {file_kind(mode)}, not a checkpoint file")


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device', ...: what a non-regular file is."""
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _torch_load(f: IO[bytes], path: str, unsafe: bool) -> Any:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError... here
        refused = refused_global(e)
        if refused is None:
            raise ConversionError(path, f"not a readable PyTorch checkpoint "
                                        f"({first_line(e)})") from None
        if not unsafe:
            raise ConversionError(path, refused_pickle(
                refused, "if you trust the file, pass --unsafe-load")) from None
    warnings.warn(f"{path}: loading with weights_only=False (--unsafe-load): this runs any code "
                  f"the file's pickle contains", ConversionWarning, stacklevel=3)
    f.seek(0)
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConversionError(path, f"not a readable PyTorch checkpoint "
                                    f"({first_line(e)})") from None


def check_writable(path: Path, force: bool, source: str | None = None) -> None:
    """Refuse, before any work, an output that exists (without ``force``), is not a regular
    file (a directory, a device such as /dev/null, a FIFO, or a link to one), is the input
    ``source`` itself (by any path or link), or cannot be written."""
    try:
        mode: int | None = path.stat().st_mode  # follows links: what a write would hit
    except FileNotFoundError:
        mode = None
        if path.is_symlink():
            raise ConversionError(path, "is a symbolic link to a missing file; remove the link "
                                        "or choose another output file") from None
    except OSError as e:
        raise ConversionError(path, f"cannot write: {e.strerror or e}") from None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise ConversionError(path, "is a directory; give a file name ending in .pkl or "
                                        ".pth")
        if not stat.S_ISREG(mode):
            raise ConversionError(path, f"is {file_kind(mode)}, not a regular file; "
                                        f"m2t-convert never writes over one: choose another "
                                        f"output file")
        if source is not None and not is_url(source) and _same_file(source, path):
            alias = "" if str(path) == source else f" ({source})"
            raise ConversionError(path, f"is the input checkpoint{alias} itself; writing there "
                                        f"would replace the checkpoint with its bare backbone: "
                                        f"choose another output file")
        if not force:
            raise ConversionError(path, "exists; pass --force to overwrite it")
    parent = path.parent
    if not parent.is_dir():
        raise ConversionError(path, f"cannot write: {parent} is not a directory")


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (through links, hard links or relative paths)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


Writer = Callable[[IO[bytes]], None]


def write_atomic(path: Path, write: Writer, check: Callable[[Path], None] | None = None) -> None:
    """Let ``write`` fill a temporary file next to ``path``, then rename it to ``path``.

    ``check``, if given, runs on the complete temporary file (which keeps the output's suffix,
    so readers that dispatch on it work) before it takes the final name; if it raises, no
    output appears.
    """
    write_all_atomic([(path, write)], check)


def write_all_atomic(files: Sequence[tuple[Path, Writer]],
                     check: Callable[[Path], None] | None = None) -> None:
    """``write_atomic`` for files that belong together (a .pkl and its .yaml): each is written
    and fsynced as a temporary file beside its name, ``check`` runs on the first, and only
    then are all renamed; on any failure every temporary is removed and no output changes."""
    staged: list[tuple[Path, str]] = []
    current = files[0][0]
    try:
        for current, write in files:
            staged.append((current, _write_temporary(current, write)))
        if check is not None:
            current = staged[0][0]
            check(Path(staged[0][1]))
        for current, tmp in staged:
            os.replace(tmp, current)
        for folder in {p.parent for p, _ in staged}:
            _fsync_folder(folder)
    except OSError as e:
        _remove(staged)
        raise ConversionError(current, f"cannot write: {e.strerror or e}") from None
    except BaseException:
        _remove(staged)
        raise


def _write_temporary(path: Path, write: Writer) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                               suffix=f".tmp{path.suffix}")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def _remove(staged: Sequence[tuple[Path, str]]) -> None:
    for _, tmp in staged:
        Path(tmp).unlink(missing_ok=True)


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
