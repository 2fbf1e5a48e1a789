"""Small ImageFolder fixtures cut from the real CIFAR-10 slice."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def link_subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    for cls in sorted(p.name for p in src.iterdir())[:classes]:
        (dst / cls).mkdir(parents=True)
        for img in sorted((src / cls).iterdir())[:per_class]:
            os.symlink(img.resolve(), dst / cls / img.name)
    return dst


@pytest.fixture(scope="session")
def tiny_train(cifar10_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 training images (4 classes × 16)."""
    return link_subset(cifar10_mini / "train", tmp_path_factory.mktemp("tiny") / "train", 4, 16)


@pytest.fixture(scope="session")
def tiny_val(cifar10_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return link_subset(cifar10_mini / "val", tmp_path_factory.mktemp("tinyval") / "val", 4, 8)


TINY = ["model.arch=resnet18", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.log_every=1",
        "optim.base_lr=1.0", "optim.warmup_epochs=0"]
