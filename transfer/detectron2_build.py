"""Which Detectron2 code runs: the installer's record, and the training-sampler seeding it has.

``tools/install_detectron2.py`` installs the pure-Python package of the ``sal-detectron2==0.7.2``
wheel and writes :data:`RECORD` into it: the upstream commit the wheel carries, its local
differences from that commit, and a digest of the installed ``.py`` files. :func:`installed_build`
reads it back (and notices files changed since); a Detectron2 installed otherwise (a source
build on a GPU cluster) has no record and is described by its ``__version__`` as an
``unknown build``. Every ``m2t-transfer train`` / ``eval`` writes the result into its
``results.json`` (``"detectron2"``) and its ``log.txt``.

:func:`sampler_seeding` tells the two behaviours of ``TrainingSampler`` apart by running
Detectron2's own loader: the wheel (upstream ``a59f0563``) seeds it from the random state that
``default_setup`` seeded with ``SEED`` + rank (``"rng"``); upstream ``main`` since ``b1c43ffb``
(2024-12-19) from ``SEED`` itself (``"SEED"``). Both give a fixed order for a fixed ``SEED``
(so runs and resumed runs are reproducible on either build), but not the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

#: The record's file name, inside the installed ``detectron2`` package folder.
RECORD = "m2t_build.json"


def package_dir() -> Path:
    """The folder of the importable ``detectron2`` package."""
    import detectron2

    return Path(detectron2.__file__).resolve().parent


def tree_digest(folder: Path) -> str:
    """SHA-256 over the relative paths and contents of every ``.py`` file under ``folder``
    (the installer's fingerprint of what it installed)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def installed_build(check_files: bool = True) -> dict[str, Any]:
    """What the importable Detectron2 is: ``{"version", "source", "upstream_commit",
    "local_changes", "modified_since_install"}`` from the installer's record, or
    ``{"version": detectron2.__version__, "source": "unknown build"}`` without one.

    ``check_files``: compare the installed files with the record's digest (a few ms).
    """
    import detectron2

    folder = package_dir()
    record_file = folder / RECORD
    try:
        record = json.loads(record_file.read_text())
    except (OSError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or record.get("version") != detectron2.__version__:
        return {"version": detectron2.__version__, "source": "unknown build",
                "path": str(folder)}
    out = {k: record[k] for k in ("version", "source", "upstream_commit", "upstream_date",
                                  "local_changes", "sampler_seeding") if k in record}
    out["path"] = str(folder)
    if check_files and "files_sha256" in record:
        out["modified_since_install"] = tree_digest(folder) != record["files_sha256"]
    return out


def describe(build: dict[str, Any]) -> str:
    """One line for a log: ``detectron2 0.7.2 (sal-detectron2==0.7.2 wheel: upstream a59f0563
    2024-04-17 + 3 local changes), TrainingSampler seeded from rng``."""
    text = f"detectron2 {build.get('version', '?')} ({build.get('source', 'unknown build')}"
    if build.get("upstream_commit"):
        text += f": upstream {build['upstream_commit']} {build.get('upstream_date', '')}".rstrip()
        if build.get("local_changes"):
            text += f" + {len(build['local_changes'])} local changes"
    if build.get("modified_since_install"):
        text += "; files changed since it was installed"
    text += ")"
    if build.get("sampler_seeding"):
        text += f", TrainingSampler seeded from {build['sampler_seeding']}"
    return text


def sampler_seeding() -> str:
    """``"SEED"`` if Detectron2's default training loader orders images by ``cfg.SEED``
    alone, ``"rng"`` if by the process's random state (which ``default_setup`` seeds with
    ``SEED`` + rank).

    Builds the config-driven loader twice over a registered 16-image list with the same
    ``SEED`` and different numpy states, and compares the orders. Call it in one process
    before any run starts: Detectron2's ``shared_random_seed`` draws from numpy's state and the
    DataLoader from torch's; both are saved and put back here.
    """
    import numpy as np
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, build_detection_train_loader

    name = "_m2t_sampler_probe"
    size = 16
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"image_id": i, "file_name": str(i),
                                                "height": 1, "width": 1}
                                               for i in range(size)])
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = False
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.SEED = 7
    state, torch_state = np.random.get_state(), torch.get_rng_state()
    quiet = logging.root.manager.disable
    logging.disable(logging.INFO)  # the probe's loader lines belong in no run's log
    try:
        orders = []
        for numpy_seed in (1, 2):
            np.random.seed(numpy_seed)
            loader = iter(build_detection_train_loader(cfg, mapper=lambda d: d))
            orders.append([next(loader)[0]["image_id"] for _ in range(size)])
    finally:
        np.random.set_state(state)
        torch.set_rng_state(torch_state)  # the DataLoader draws its base seed from torch's
        logging.disable(quiet)
    return "SEED" if orders[0] == orders[1] else "rng"


def run_build() -> dict[str, Any]:
    """:func:`installed_build` plus the seeding measured by :func:`sampler_seeding` (what a
    run records)."""
    build = installed_build()
    build["sampler_seeding"] = sampler_seeding()
    return build
