"""Checkpoints: atomic saves (temporary file + rename), validated loads, and what a
pretraining checkpoint holds: ``capture`` takes it from a ``Trainer``, ``restore`` puts it
back, and ``load_resume`` reads a run's last.pth (once) to continue it.
"""

from __future__ import annotations

import io
import os  # noqa: F401  (tests patch pretrain.checkpoint.os.fsync: the fsync of replace_file)
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from iopath.common.file_io import PathManager

from jobs.atomic import TEMPORARY, replace_file

from .config import Config, apply_overrides, config_from_dict
from .errors import UserError, first_line, refused_global, refused_pickle

if TYPE_CHECKING:
    from .train import Trainer

FORMAT = "momentum2-pretrain"
VERSION = 1
PATHS = PathManager()


#: The branch each method's authors evaluate and transfer (SPEC §3): what ``train.export_branch:
#: auto`` means, for ``m2t-convert`` and for ``m2t-pretrain linear --protocol standard``
#: (``convert/layouts.py::OUR_METHODS`` holds the same, with the reasons; a test keeps the two
#: equal, since convert reads checkpoints without importing pretrain).
EVALUATED_BRANCH = {"m2t": "teacher", "byol": "student", "eman": "student",
                    "projector_only": "student"}


def evaluated_branch(config: dict[str, Any]) -> str:
    """The branch a run's own evaluation takes: its ``train.export_branch`` when it names one,
    else (``auto``) its method's, the teacher for a method not in the table."""
    explicit = config.get("train", {}).get("export_branch", "auto")
    if explicit in ("teacher", "student"):
        return explicit
    return EVALUATED_BRANCH.get(config.get("model", {}).get("method", ""), "teacher")


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


# ----- a run's checkpoint: taken from a Trainer, put back into one -------------------------
def load_resume(out: str | Path, overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    """The checkpoint ``out/last.pth``, read once, and the config saved in it with the
    command-line ``overrides`` on top: what ``Trainer(cfg, ..., resume=ckpt)`` continues."""
    last = Path(out) / "last.pth"
    if not last.exists():
        raise UserError(f"{last}: nothing to resume (no last.pth in the run directory)")
    ckpt = load_checkpoint(last)
    return apply_overrides(config_from_dict(ckpt["config"], str(last)), overrides), ckpt


def check_resumable(ckpt: dict[str, Any], cfg: Config, path: Path) -> None:
    """Refuse to continue the checkpoint at ``path`` with other model settings."""
    if config_from_dict(ckpt["config"], str(path)).model != cfg.model:
        raise UserError(f"{path}: the model settings differ from the checkpoint's; "
                        f"resume with the saved config (see {path.parent / 'config.yaml'})")


def capture(trainer: Trainer) -> dict[str, Any] | None:
    """``trainer``'s checkpoint as it is now, on the main process (None on the others).

    A collective: every rank takes part, as each rank's teacher buffers are gathered.
    """
    per_rank = _teacher_buffers_by_rank(trainer)
    if not trainer.dist.main:
        return None
    cfg, step, per_epoch = trainer.cfg, trainer.step, trainer.per_epoch
    state = {
        "format": FORMAT, "version": VERSION,
        "method": cfg.model.method, "arch": cfg.model.arch,
        "export_branch": cfg.train.export_branch,
        "config": cfg.to_dict(),
        "student": trainer.model.student.state_dict(),
        "teacher": trainer.model.teacher.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "step": step, "epoch": step // per_epoch,
        "total_steps": trainer.total_steps, "world_size": trainer.dist.world_size,
        "sampler": {"epoch": step // per_epoch, "start_batch": step % per_epoch,
                    "seed": cfg.train.seed},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    if per_rank is not None:
        state["teacher_buffers_by_rank"] = per_rank
    return state


def _teacher_buffers_by_rank(trainer: Trainer) -> list[dict[str, torch.Tensor]] | None:
    """Every rank's teacher buffers, gathered on each rank (None on one process).

    Without SyncBN each process's teacher normalises with its own batches, so its BN
    statistics (m2t's momentum BN above all) differ from rank to rank; the checkpoint's
    ``teacher`` holds rank 0's, and an exact resume needs each rank's own.
    """
    if trainer.dist.world_size == 1:
        return None
    mine = {k: v.detach().cpu() for k, v in trainer.model.teacher.named_buffers()}
    gathered: list[Any] = [None] * trainer.dist.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def restore(trainer: Trainer, ckpt: dict[str, Any], path: Path) -> int:
    """Put ``ckpt`` (read from ``path``) back into ``trainer``'s model, optimiser, loss
    scaler and random-number generators; returns the step it holds."""
    t = trainer
    if ckpt.get("total_steps") != t.total_steps:
        raise UserError(f"{path}: checkpoint was made for {ckpt.get('total_steps')} total "
                        f"steps, this run has {t.total_steps}; the schedules would not "
                        f"match (check data, batch size, epochs and world size)")
    try:
        t.model.student.load_state_dict(ckpt["student"])
        t.model.teacher.load_state_dict(ckpt["teacher"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
        first = first_line(exc, 200)
        raise UserError(f"{path}: checkpoint does not fit this model: {first}") from None
    try:
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(_as_random_state(ckpt["rng"]["python"]))
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        first = first_line(exc, 200)
        raise UserError(f"{path}: damaged checkpoint: its random-number state cannot be "
                        f"restored ({first})") from None
    per_rank = ckpt.get("teacher_buffers_by_rank")
    if isinstance(per_rank, list) and len(per_rank) == t.dist.world_size > 1:
        own = per_rank[t.dist.rank]
        try:
            with torch.no_grad():
                for name, buf in t.model.teacher.named_buffers():
                    buf.copy_(own[name])
        except (KeyError, RuntimeError, TypeError) as exc:
            first = first_line(exc, 200)
            raise UserError(f"{path}: damaged checkpoint: rank {t.dist.rank}'s teacher "
                            f"statistics do not fit ({first})") from None
    step = int(ckpt["step"])
    if not 0 <= step <= t.total_steps:
        raise UserError(f"{path}: damaged checkpoint: step {step} is outside "
                        f"0..{t.total_steps}")
    return step


def _as_random_state(state: Any) -> tuple:
    """``random.getstate()`` comes back from a checkpoint with lists where tuples were."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
