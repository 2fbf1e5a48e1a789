"""Fixtures of the reliability suite: tiny data, tiny runs, and the ledger behind the report.

Every test that injects a fault or feeds a bad input records it in the session's
:class:`Ledger`; at the end of the session the totals are printed and written as JSON to
``reliability_counts.json`` in pytest's base temporary directory (or to the path in
``$M2T_RELIABILITY_COUNTS``). ``docs/reliability.md`` is filled from that file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

#: Environment of the subprocesses: one OpenMP thread, as in-process (``one_torch_thread``).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

#: A ResNet-18 at 32 px with a narrow projector and batch 8: a training step in ~0.1 s. A quarter
#: of torchvision's width (16 stage-1 channels): checkpoints of 9 MB, not 130, as the suite
#: writes hundreds of them.
TINY = ["model.arch=resnet18", "model.width=16", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.log_every=1",
        "optim.base_lr=1.0", "optim.warmup_epochs=0", "train.device=cpu"]


# ----- the ledger ------------------------------------------------------------------------
@dataclass
class Ledger:
    """Counts of what the suite tried and what came of it (see ``docs/reliability.md``)."""

    faults: Counter = field(default_factory=Counter)       # fault kind -> injections
    inputs: Counter = field(default_factory=Counter)       # reader -> bad inputs tried
    tracebacks: Counter = field(default_factory=Counter)   # where a traceback was seen
    lost: Counter = field(default_factory=Counter)         # where a checkpoint was lost

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def bad_input(self, reader: str, n: int = 1) -> None:
        self.inputs[reader] += n

    def traceback(self, where: str) -> None:
        self.tracebacks[where] += 1

    def checkpoint_lost(self, where: str) -> None:
        self.lost[where] += 1

    def totals(self) -> dict[str, object]:
        return {
            "faults_injected": sum(self.faults.values()),
            "bad_inputs_tried": sum(self.inputs.values()),
            "tracebacks_seen": sum(self.tracebacks.values()),
            "checkpoints_lost": sum(self.lost.values()),
            "faults": dict(sorted(self.faults.items())),
            "bad_inputs": dict(sorted(self.inputs.items())),
            "tracebacks": dict(self.tracebacks),
            "lost": dict(self.lost),
        }


_LEDGER = Ledger()


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return _LEDGER


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reader(name): the reader a fuzz test counts inputs for")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the ledger's totals and write them as JSON (only when this suite ran)."""
    if not (_LEDGER.faults or _LEDGER.inputs):
        return
    totals = _LEDGER.totals()
    target = os.environ.get("M2T_RELIABILITY_COUNTS")
    if target:
        path = Path(target)
    else:
        base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
        path = Path(base) / "reliability_counts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(totals, indent=2) + "\n")
    terminalreporter.write_sep("-", "reliability counts")
    for key in ("faults_injected", "bad_inputs_tried", "tracebacks_seen", "checkpoints_lost"):
        terminalreporter.write_line(f"{key}: {totals[key]}")
    terminalreporter.write_line(f"written to {path}")


# ----- helpers ---------------------------------------------------------------------------
def error_line(stderr: str, culprit: str | Path | None = None) -> str:
    """The one ``error:`` line a failing command must print (nothing else on stderr).

    Raises AssertionError, naming what was printed instead, otherwise.
    """
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    if culprit is not None:
        assert str(culprit) in lines[0], (culprit, lines[0])
    return lines[0]


def python(args: Sequence[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository root, capturing text output."""
    kwargs.setdefault("env", ENV)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, **kwargs)


def checkpoint_files(run: Path) -> list[Path]:
    """Every file in ``run`` a user or a reader would take for a checkpoint."""
    return sorted(p for p in run.glob("*.pth") if not p.name.startswith("."))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def started_run(tiny_train: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 8 steps stopped after 2 (last.pth at step 2): copy it, then resume the copy."""
    from pretrain.__main__ import main

    run = tmp_path_factory.mktemp("started") / "run"
    assert main(["train", "--data", str(tiny_train), "--out", str(run), *TINY,
                 "train.steps=8", "--stop-after", "2"]) == 0
    return run


def make_coco_dataset(folder: Path, num_images: int = 4, size: int = 128, seed: int = 0) -> Path:
    """Dark images with two bright squares each, as COCO JSON with polygon masks (2 classes).

    Layout: ``folder/images/*.png`` beside ``folder/annotations.json``; returns the JSON.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        img = Image.new("RGB", (size, size), (20, 20, 30))
        draw = ImageDraw.Draw(img)
        for k in range(2):
            s = int(rng.integers(24, 40))
            x = int(rng.integers(0, size // 2 - s)) + k * size // 2
            y = int(rng.integers(0, size - s))
            draw.rectangle([x, y, x + s, y + s], fill=(200, 60 + 120 * k, 60))
            poly = [x, y, x + s, y, x + s, y + s, x, y + s]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": k + 1, "bbox": [x, y, s, s], "area": s * s,
                                "iscrowd": 0, "segmentation": [poly]})
        img.save(folder / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "height": size, "width": size})
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "red"},
                                               {"id": 2, "name": "orange"}]}))
    return path


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread for in-process work (the test machine's cores are shared: two
    OpenMP threads spinning against other processes make a tiny step 3-4x slower)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
