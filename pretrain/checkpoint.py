"""Checkpoints: atomic saves (temporary file + rename) and validated loads."""

from __future__ import annotations

import io
import os  # noqa: F401  (tests patch pretrain.checkpoint.os.fsync: the fsync of replace_file)
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
from iopath.common.file_io import PathManager

from .errors import UserError, first_line, refused_global, refused_pickle
from .rundir import replace_file

FORMAT = "momentum2-pretrain"
VERSION = 1
PATHS = PathManager()


def save_atomic(obj: Any, path: str | Path) -> None:
    """Serialise ``obj`` to ``path`` so that a reader sees the old file or the new, never half.

    Local files are written to a temporary name in the same folder (``.NAME.tmp-PID``, which
    no reader takes for a checkpoint), flushed to disk and renamed over the target; other
    iopath URIs are written through ``PathManager``. A failed write (disk full, file-size
    limit, I/O error) removes the temporary file and raises a one-line ``UserError``.
    """
    path = str(path)
    if "://" in path:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with PATHS.open(path, "wb") as f:
            f.write(buffer.getvalue())
        return
    writer: _WriteErrors | None = None

    def write(f: IO[bytes]) -> None:
        nonlocal writer
        writer = _WriteErrors(f)
        torch.save(obj, writer)  # type: ignore[arg-type]

    try:
        replace_file(path, write)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a failed write as RuntimeError ("unexpected pos ..."): name the
        # OSError behind it instead
        cause = writer.error if writer is not None and writer.error is not None else exc
        reason = getattr(cause, "strerror", None) or first_line(cause, 200)
        raise UserError(f"{path}: could not save checkpoint ({reason}); "
                        f"the previous checkpoint is untouched") from None


class _WriteErrors:
    """A file wrapper that remembers the ``OSError`` a write raised (torch.save hides it)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.f.flush()


#: The temporary name of :func:`~pretrain.rundir.replace_file`: checkpoints, config.yaml, the
#: metrics file trimmed on resume.
TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")


def remove_partial_saves(folder: str | Path) -> list[Path]:
    """Delete temporary files that writes killed mid-way left in ``folder``; return them.

    Only the main process of a run writes into its folder, and it finishes or removes each
    temporary before going on, so when a run (re)starts, every ``.NAME.tmp-PID`` there is
    the remains of a dead process (a checkpoint save, or config.yaml written as it started).
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if TEMPORARY.match(entry.name) and entry.is_file():
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


#: What to give instead of a file of another kind.
_WANTED = "give an m2t-pretrain run directory or its last.pth / epoch_NNNN.pth"

#: The pickled magic number that opens torch's legacy (non-zip) files.
_TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


def _plain_pickle(path: str) -> bool:
    """Whether ``path`` is a pickle but not a torch file (Detectron2's ``.pkl`` weights)."""
    try:
        with PATHS.open(path, "rb") as f:
            head = f.read(len(_TORCH_LEGACY_MAGIC))
    except OSError:
        return False
    return head[:1] == b"\x80" and head != _TORCH_LEGACY_MAGIC


def _bare_weights(obj: Any) -> bool:
    """A state dict of tensors, possibly under ``state_dict``/``model`` (not our checkpoint)."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


#: The entries of one of our checkpoints and the type each must have.
_ENTRIES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "student": dict, "teacher": dict, "optimizer": dict, "scaler": dict,
    "step": int, "total_steps": int, "rng": dict,
}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our pretraining checkpoints (``weights_only``), or fail with one line.

    A file that pickles anything but tensors and plain containers is refused without running
    its code: our checkpoints never hold such objects, so it was not written by m2t-pretrain
    (or was altered since).
    """
    path = str(path)
    if not PATHS.exists(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        with PATHS.open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": said below
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError,
            AttributeError, TypeError, KeyError, IndexError, OSError) as exc:
        if _plain_pickle(path):
            raise UserError(f"{path}: a plain pickle (such as Detectron2 .pkl weights), not an "
                            f"m2t-pretrain checkpoint, and not loaded; {_WANTED}") from None
        refused = refused_global(exc)
        if refused is not None:
            raise UserError(f"{path}: " + refused_pickle(
                refused, "checkpoints of m2t-pretrain hold only tensors and plain data, so it "
                         "was not written by m2t-pretrain (or was altered) and is not "
                         "loaded")) from None
        raise UserError(f"{path}: not a readable checkpoint (corrupt, truncated or not a torch "
                        f"file): {first_line(exc, 200)}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        if _bare_weights(obj):
            raise UserError(f"{path}: not a momentum2 pretraining checkpoint but bare weights "
                            f"(a state dict such as a torchvision .pth; keys {found}); "
                            f"{_WANTED}")
        raise UserError(f"{path}: not a momentum2 pretraining checkpoint (expected format "
                        f"{FORMAT!r}; found keys {found}); use m2t-convert for foreign checkpoints")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path}: damaged checkpoint: 'version' is {version!r}, not a number")
    if version > VERSION:
        raise UserError(f"{path}: checkpoint version {version} is newer than this "
                        f"toolkit understands ({VERSION})")
    for key, kind in _ENTRIES.items():
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            found = "missing" if key not in obj else f"a {type(value).__name__}"
            raise UserError(f"{path}: damaged checkpoint: '{key}' is {found}, expected a "
                            f"{getattr(kind, '__name__', kind)}")
    return obj
