"""Settings shared by the pretraining tests (fixtures ``tiny_train``/``tiny_val``: tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: A ResNet-18 at width 16 (checkpoints of 9 MB, not 130; see tests/reliability/conftest.py)
TINY = ["model.arch=resnet18", "model.width=16", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.log_every=1",
        "optim.base_lr=1.0", "optim.warmup_epochs=0"]


def run_ddp_check(train: Path, run: Path, *overrides: str) -> tuple[str, list[str]]:
    """Train TINY under torchrun with two gloo processes (ddp_check.py); its stdout and rank lines."""
    stdout, lines = run_ddp_checks(train, {run: list(overrides)})
    return stdout, lines[run.name]


def run_ddp_checks(train: Path, runs: dict[Path, list[str]]) -> tuple[str, dict[str, list[str]]]:
    """Several TINY runs in one torchrun start-up (ddp_check.py ``--next``); the rank lines of
    each run, by the run directory's name."""
    args = []
    for run, overrides in runs.items():
        args += [*(["--next"] if args else []), str(run), *TINY, *overrides, "train.device=cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(HERE / "ddp_check.py"), str(train), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines: dict[str, list[str]] = {run.name: [] for run in runs}
    for line in proc.stdout.splitlines():
        if line.startswith("rank "):
            lines[line.rsplit(" run=", 1)[1]].append(line)
    return proc.stdout, lines
