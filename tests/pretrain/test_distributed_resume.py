"""m2t under DDP resumes exactly: each rank gets back its own momentum-BN statistics.

Without SyncBN every process's teacher normalises with its own batches, so the teachers'
BN statistics differ between ranks (tests/pretrain/test_distributed.py). A checkpoint that
kept only rank 0's made a resumed (or requeued) multi-process m2t run drift from an
uninterrupted one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def torchrun(train: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "pretrain", "train", "--data", str(train), "--out", str(out), *extra,
           *TINY, "model.method=m2t", "train.steps=6", "train.device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_m2t_stopped_and_resumed_equals_an_uninterrupted_run(tiny_train: Path,
                                                                         tmp_path: Path) -> None:
    torchrun(tiny_train, tmp_path / "straight")
    torchrun(tiny_train, tmp_path / "resumed", "--stop-after", "3")
    torchrun(tiny_train, tmp_path / "resumed", "--resume")
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 6
    per_rank = a["teacher_buffers_by_rank"]
    assert len(per_rank) == 2
    # the ranks' statistics really differ, so restoring rank 0's everywhere would not do
    assert not torch.equal(per_rank[0]["backbone.layer1.0.bn1.running_mean"],
                           per_rank[1]["backbone.layer1.0.bn1.running_mean"])
    for part in ("student", "teacher"):
        for key, tensor in a[part].items():
            assert torch.equal(tensor, b[part][key]), f"{part}.{key}"
    for rank in range(2):
        for key, tensor in per_rank[rank].items():
            assert torch.equal(tensor, b["teacher_buffers_by_rank"][rank][key]), (rank, key)
