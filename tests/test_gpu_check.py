"""The prepared GPU check (benchmarks/gpu_check.py) runs on the CPU, so it never rots (issue 12)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                           "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {row["check"]: row["status"] for row in report["checks"]}
    assert list(status) == ["momentum_bn", "device_move", "amp", "channels_last",
                            "train_resume_convert", "ddp", "throughput", "detectron2"]
    # only DDP may be skipped on one CPU process; everything else ran and passed
    assert {k: v for k, v in status.items() if v != "pass"} == {"ddp": "skip"}, status
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| momentum_bn | pass |" in md and "## Throughput" in md


def test_gpu_check_refuses_cuda_without_a_gpu_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --device cuda but no CUDA device is available (use --device cpu --quick)"]
    assert not list(tmp_path.iterdir())
