"""Reading checkpoints (through iopath: local paths and URLs alike) and writing outputs atomically.

Reading uses ``torch.load(weights_only=True)``: a checkpoint is data, and loading it must not
run code from the file (a ``.safetensors`` file is read by the safetensors package, which
holds no code at all). The few plain-data types common self-supervised checkpoints pickle
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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from iopath.common.file_io import HTTPURLHandler, PathManager

from jobs.atomic import replace_files

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
    """The object ``torch.save`` wrote to ``path`` (or the tensors of a ``.safetensors``
    file), with every tensor on the CPU."""
    return read_checkpoint(path, unsafe)[0]


def read_checkpoint(path: str, unsafe: bool = False) -> tuple[Any, str]:
    """``load_checkpoint``'s object and the kind of file it came from: "torch.save" or
    "safetensors" (read by the safetensors package, which runs no code)."""
    if not is_url(path):
        _check_input_file(Path(path))
    try:
        with PATHS.open(path, "rb") as f:
            head = f.read(sniff.HEAD_BYTES)
            f.seek(0)
            if sniff.is_safetensors(head):
                return _safetensors_load(path), "safetensors"
            if not sniff.is_checkpoint_head(head):
                if sniff.is_pickle(head):  # say what the pickle is, from more of its opcodes
                    head = f.read(sniff.PICKLE_SCAN_BYTES)
                raise ConversionError(path, sniff.non_checkpoint_kind(head))
            kind = sniff.zip_kind(f) if head.startswith(sniff.ZIP_MAGIC) else None
            if kind is not None:
                raise ConversionError(path, kind)
            return _torch_load(f, path, unsafe), "torch.save"
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(path, f"cannot read: {e.strerror or e}") from None
    except Exception as e:  # iopath handlers raise their own types for URLs they cannot fetch
        raise ConversionError(path, f"cannot read: {e}") from None


def _safetensors_load(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (timm, Hugging Face), through the safetensors
    package: a JSON header and raw bytes, never a pickle."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConversionError(path, "is a safetensors file; reading it needs the safetensors "
                                    "package (pip install safetensors)") from None
    try:
        return load_file(PATHS.get_local_path(path), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad file
        raise ConversionError(path, f"is a safetensors file that cannot be read "
                                    f"({first_line(e)})") from None


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


def write_all_atomic(files: Sequence[tuple[Path, Writer]],
                     check: Callable[[Path], None] | None = None) -> None:
    """Write files that belong together (a .pkl and its .yaml) through
    :func:`jobs.atomic.replace_files`: ``check`` runs on the first one's complete temporary
    (which keeps the output's suffix, so readers that dispatch on it work) before any takes
    its name; on any failure no output changes, and an ``OSError`` is one ``ConversionError``.
    """
    try:
        replace_files(files, check, keep_suffix=True)
    except OSError as e:
        raise ConversionError(e.filename, f"cannot write: {e.strerror or e}") from None
