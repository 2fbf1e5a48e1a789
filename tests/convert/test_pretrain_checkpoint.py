"""End to end with the real producer: a checkpoint written by ``m2t-pretrain`` (two steps on a
slice of the real CIFAR-10 data) converts and verifies."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

from convert.__main__ import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # one real (two-step) pretraining run, in a subprocess


@pytest.fixture(scope="module")
def pretrain_run(cifar10_mini: Path, module_tmp: Callable[[str], Path]) -> Path:
    """Two m2t steps of a resnet18 on 16 real images (2 classes x 8, linked from the slice)."""
    root = module_tmp("pretrain")
    data = root / "images"
    for name in sorted(p.name for p in (cifar10_mini / "train").iterdir())[:2]:
        (data / name).mkdir(parents=True)
        for image in sorted((cifar10_mini / "train" / name).iterdir())[:8]:
            (data / name / image.name).symlink_to(image)
    run = root / "run"
    result = subprocess.run(
        [sys.executable, "-m", "pretrain", "train",
         "--config", str(REPO / "configs" / "pretrain" / "resnet18_cifar.yaml"),
         "--data", str(data), "--out", str(run), "train.steps=2", "data.batch_size=8",
         "data.image_size=32", "data.workers=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})  # two small steps: one thread is faster
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def test_checkpoint_written_by_m2t_pretrain_converts_and_verifies(
        pretrain_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    last = pretrain_run / "last.pth"
    teacher_pkl, student_pkl = tmp_path / "teacher.pkl", tmp_path / "student.pkl"
    assert main([str(last), str(teacher_pkl), "--verify"]) == 0
    text = capsys.readouterr().out
    for expected in ("m2t-pretrain checkpoint (method m2t, step 2", "branch:   teacher",
                     "resnet18", "100 tensors", "momentum-BN step/total_steps (40)",
                     "loaded 120/120", "verification passed"):
        assert expected in text, expected
    assert main([str(last), str(student_pkl), "--branch", "student", "--verify"]) == 0
    capsys.readouterr()

    ckpt = torch.load(last, weights_only=True)
    with open(teacher_pkl, "rb") as f:
        teacher = pickle.load(f)["model"]
    with open(student_pkl, "rb") as f:
        student = pickle.load(f)["model"]
    # Checked by hand against the checkpoint: the teacher's momentum-BN history is exported.
    assert torch.equal(torch.as_tensor(teacher["res3.0.shortcut.norm.running_var"]),
                       ckpt["teacher"]["backbone.layer2.0.downsample.1.running_var"])
    assert torch.equal(torch.as_tensor(student["stem.conv1.norm.running_mean"]),
                       ckpt["student"]["backbone.bn1.running_mean"])
    assert not torch.equal(torch.as_tensor(teacher["stem.conv1.norm.running_mean"]),
                           torch.as_tensor(student["stem.conv1.norm.running_mean"]))


def test_epoch_checkpoint_converts_for_torchvision(pretrain_run: Path, tmp_path: Path) -> None:
    epochs = sorted(pretrain_run.glob("epoch_*.pth"))
    assert epochs, "m2t-pretrain wrote no epoch checkpoint"
    out = tmp_path / "backbone.pth"
    assert main([str(epochs[-1]), str(out)]) == 0
    result = torchvision.models.resnet18().load_state_dict(
        torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
