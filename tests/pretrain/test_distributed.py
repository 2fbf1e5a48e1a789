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


def test_the_cli_leaves_the_process_group_it_trained_in(tiny_train: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    """``python -m pretrain train`` under torchrun destroys its process group before exit, as
    the SLURM path does (a one-process gloo group here, joined as torchrun's workers join)."""
    import socket

    import torch.distributed as dist

    from pretrain.__main__ import main

    from .conftest import TINY

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo")
    try:
        assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / "run"), *TINY,
                     "train.steps=1", "train.device=cpu"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
