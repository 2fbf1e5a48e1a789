"""The run directory: never replace another run's results; the metrics trimmed on resume.

A fresh run may start in a folder that does not exist yet, or in one that holds only what an
earlier attempt of the *same* run left before its first checkpoint (the same ``config.yaml``).
Anything else there (checkpoints, another config) is a result this run would overwrite.
When a run resumes, the metrics logged after its checkpoint are dropped, since the resumed
run logs those steps again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from jobs.atomic import replace_file

from .errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"


def check_out(out: Path, data: str | Path, val: str | Path | None) -> None:
    """``--out`` must be a folder (or not exist yet) outside the image folders."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out is a file, not a run directory")
    real = Path(os.path.realpath(out))
    for option, folder in (("--data", data), ("--val", val)):
        if folder is None:
            continue
        images = Path(os.path.realpath(folder))
        if real == images or images in real.parents:
            raise UserError(f"{out}: --out is inside the {option} images ({folder}); its files "
                            f"would be read as images by the next run: choose a folder outside")


def check_fresh(out: Path, config_text: str) -> None:
    """Refuse to start a new run where it would replace another run's files."""
    if not out.is_dir():
        return
    last = out / "last.pth"
    if last.is_symlink() and not last.exists():
        raise UserError(f"{last}: a symbolic link to {os.readlink(last)}, which is missing; "
                        f"restore the checkpoint it points to (then --resume) or remove the link")
    if os.path.lexists(last):
        raise UserError(f"{out}: run directory already holds last.pth; pass --resume to "
                        f"continue it or choose another --out")
    epochs = sorted(p.name for p in out.glob("epoch_*.pth"))
    if epochs:
        raise UserError(f"{out}: run directory already holds {epochs[-1]} (but no last.pth); "
                        f"to continue from it, copy it to last.pth and pass --resume; or "
                        f"choose another --out")
    config = out / CONFIG
    if os.path.lexists(config):
        try:
            same = config.read_bytes() == config_text.encode()
        except OSError:
            same = False
        if not same:
            raise UserError(f"{config}: the run directory already holds a config.yaml that is "
                            f"not this run's (another run's, or your own); choose another --out "
                            f"(keep your own configs outside run directories)")




def trim_metrics(path: Path, step: int) -> int:
    """Drop the records of ``path`` logged after ``step``; return how many were dropped.

    A run resumed from a checkpoint at ``step`` logs the later steps again; their earlier
    records (from before a Ctrl-C or a kill) would be there twice. A last line without its
    newline that is not a whole record was cut by a kill mid-write and is dropped too. Other
    lines that are not records are kept as they are. The file is rewritten atomically, and
    only when something changes. It is read line by line, twice (is there anything to drop?
    then the copy), never whole: a 500,000-step run's file is 100 MB or more.
    """
    if not path.is_file():
        return 0
    tally = [0, False]  # lines dropped, last line changed
    with open(path, "rb") as f:
        for _ in _kept(f, step, tally):
            pass
    dropped, changed = tally
    if dropped or changed:
        def write(out: IO[bytes]) -> None:
            with open(path, "rb") as f:
                out.writelines(_kept(f, step, [0, False]))

        replace_file(path, write)
    return dropped


def _kept(f: IO[bytes], step: int, tally: list) -> Iterator[bytes]:
    """The lines of ``f`` (split as ``bytes.splitlines`` splits) that :func:`trim_metrics`
    keeps; counts the dropped ones in ``tally[0]`` and sets ``tally[1]`` when the last kept
    line lacks its newline (then completed, or dropped when it is not a whole record)."""
    last = None
    for chunk in f:
        for line in chunk.splitlines(keepends=True):
            logged = _step(line)
            if logged is not None and logged > step:
                tally[0] += 1
                continue
            if last is not None:
                yield last
            last = line
    if last is not None:
        if last.endswith(b"\n"):
            yield last
        else:
            tally[1] = True
            if _step(last) is not None:
                yield last + b"\n"
            else:
                tally[0] += 1


def _step(line: bytes) -> float | None:
    """The ``step`` of a metrics record, or None for a line that is not one."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    logged = record.get("step") if isinstance(record, dict) else None
    ok = isinstance(logged, (int, float)) and not isinstance(logged, bool)
    return logged if ok else None
