"""DDP on CPU with gloo: two processes stay in lock-step (SPEC §1.6)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import TINY

HERE = Path(__file__).resolve().parent


def test_two_gloo_processes_keep_identical_student_and_teacher(tiny_train: Path,
                                                               tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(HERE / "ddp_check.py"), str(tiny_train),
           str(tmp_path / "run"), *TINY, "train.steps=4", "train.device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 6, proc.stdout
    for name in ("student", "teacher"):
        assert sum(f" {name} " in line and "identical_across_ranks=True" in line
                   for line in lines) == 2
    # per-process momentum-BN statistics: each rank normalises with its own batches
    assert sum("teacher_bn_mean" in line and "identical_across_ranks=False" in line
               for line in lines) == 2
    # the run directory is written once (rank 0) with the global batch of 2 × 8
    assert (tmp_path / "run" / "last.pth").exists()
    assert "batch 8×2" in proc.stdout
