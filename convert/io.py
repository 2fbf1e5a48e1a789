"""Reading checkpoints (through iopath: local paths and URLs alike) and writing outputs atomically.

Reading uses ``torch.load(weights_only=True)``: a checkpoint is data, and loading it must not
run code from the file. The few plain-data types common self-supervised checkpoints pickle
besides tensors are allowed explicitly (``SAFE_GLOBALS``); a file that pickles anything else
is refused with the type named; ``unsafe=True`` (``--unsafe-load``) falls back to a full
unpickle for files the user trusts, with a warning.

Writing goes to a temporary file in the output's directory, then ``os.replace``: a reader
never sees half a file, and a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from iopath.common.file_io import HTTPURLHandler, PathManager

from .errors import ConversionError, ConversionWarning

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save before 1.6: pickle protocol 2 + magic number
_UNSUPPORTED_GLOBAL = re.compile(
    r"(?:Unsupported global: GLOBAL |unsupported GLOBAL |but got <class ')([\w.]+)")

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
        local = Path(path)
        if not local.exists():
            raise ConversionError(path, "no such file")
        if local.is_dir():
            raise ConversionError(path, "is a directory, not a checkpoint file")
    try:
        with PATHS.open(path, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head != _ZIP_MAGIC and head != _LEGACY_MAGIC:
                raise ConversionError(path, _not_a_checkpoint(head))
            return _torch_load(f, path, unsafe)
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(path, f"cannot read: {e.strerror or e}") from None
    except Exception as e:  # iopath handlers raise their own types for URLs they cannot fetch
        raise ConversionError(path, f"cannot read: {e}") from None


def _not_a_checkpoint(head: bytes) -> str:
    if head[:1] == b"\x80":
        return ("not a PyTorch checkpoint: a plain Python pickle (a Detectron2 .pkl is an "
                "output of m2t-convert, not an input)")
    return "not a PyTorch checkpoint (expected a file written by torch.save)"


def _torch_load(f: IO[bytes], path: str, unsafe: bool) -> Any:
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError... here
        message = str(e)
        unsupported = _UNSUPPORTED_GLOBAL.search(message)
        if unsupported is None:
            first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
            raise ConversionError(path, f"not a readable PyTorch checkpoint ({first})") from None
        if not unsafe:
            raise ConversionError(
                path, f"the checkpoint pickles a {unsupported.group(1)} object, which safe "
                      f"(weights-only) loading refuses; if you trust the file, pass "
                      f"--unsafe-load") from None
    warnings.warn(f"{path}: loading with weights_only=False (--unsafe-load): this runs any code "
                  f"the file's pickle contains", ConversionWarning, stacklevel=3)
    f.seek(0)
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(path, f"not a readable PyTorch checkpoint ({first})") from None


def check_writable(path: Path, force: bool) -> None:
    """Refuse an output that exists (without ``force``) or cannot be written, before any work."""
    if path.is_dir():
        raise ConversionError(path, "is a directory; give a file name ending in .pkl or .pth")
    if path.exists() and not force:
        raise ConversionError(path, "exists; pass --force to overwrite it")
    parent = path.parent
    if not parent.is_dir():
        raise ConversionError(path, f"cannot write: {parent} is not a directory")


def write_atomic(path: Path, write: Callable[[IO[bytes]], None],
                 check: Callable[[Path], None] | None = None) -> None:
    """Let ``write`` fill a temporary file next to ``path``, then rename it to ``path``.

    ``check``, if given, runs on the complete temporary file (which keeps the output's suffix,
    so readers that dispatch on it work) before it takes the final name; if it raises, no
    output appears.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                   suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise ConversionError(path, f"cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ConversionError(path, f"cannot write: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
