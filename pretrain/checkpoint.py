"""Checkpoints: atomic saves (temporary file + rename) and validated loads."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from iopath.common.file_io import PathManager

from .errors import UserError

FORMAT = "momentum2-pretrain"
VERSION = 1
PATHS = PathManager()


def save_atomic(obj: Any, path: str | Path) -> None:
    """Serialise ``obj`` to ``path`` so that a reader sees the old file or the new, never half.

    Local files are written to a temporary name in the same folder, flushed to disk and renamed
    over the target; other iopath URIs are written through ``PathManager``.
    """
    path = str(path)
    if "://" in path:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with PATHS.open(path, "wb") as f:
            f.write(buffer.getvalue())
        return
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise UserError(f"{path}: could not save checkpoint ({exc.strerror or exc}); "
                        f"the previous checkpoint is untouched") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our pretraining checkpoints (``weights_only``), or fail with one line."""
    path = str(path)
    if not PATHS.exists(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        with PATHS.open(path, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            AttributeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: not a readable checkpoint (corrupt, truncated or not a torch "
                        f"file): {first[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: not a momentum2 pretraining checkpoint (expected format "
                        f"{FORMAT!r}; found keys {found}); use m2t-convert for foreign checkpoints")
    if obj.get("version", 0) > VERSION:
        raise UserError(f"{path}: checkpoint version {obj.get('version')} is newer than this "
                        f"toolkit understands ({VERSION})")
    return obj
