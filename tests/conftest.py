"""Shared fixtures: where the real data slices live, and skips when they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOMENTUM2_DATA", REPO.parent / "shared" / "data"))


def _data_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data slice {path} is absent (set MOMENTUM2_DATA to the folder "
                    f"holding {name}/)")
    return path


@pytest.fixture(scope="session")
def cifar10_mini() -> Path:
    return _data_dir("cifar10_mini")


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return _data_dir("coco_mini")


@pytest.fixture(scope="session")
def lvis_mini() -> Path:
    return _data_dir("lvis_mini")
