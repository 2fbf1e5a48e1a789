"""DDP on CPU with gloo: two processes stay in lock-step (SPEC §1.6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_ddp_check


@pytest.mark.slow
def test_two_gloo_processes_keep_identical_student_and_teacher(tiny_train: Path,
                                                               tmp_path: Path) -> None:
    stdout, lines = run_ddp_check(tiny_train, tmp_path / "run", "train.steps=4")
    assert len(lines) == 6, stdout
    for name in ("student", "teacher"):
        assert sum(f" {name} " in line and "identical_across_ranks=True" in line
                   for line in lines) == 2
    # per-process momentum-BN statistics: each rank normalises with its own batches
    assert sum("teacher_bn_mean" in line and "identical_across_ranks=False" in line
               for line in lines) == 2
    # the run directory is written once (rank 0) with the global batch of 2 × 8
    assert (tmp_path / "run" / "last.pth").exists()
    assert "batch 8×2" in stdout
