"""Shared fixtures: where the real data slices live (skipped when absent), and tiny cuts of them."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core (pytest-xdist): one torch thread each, here and in
    # the processes tests start, since OpenMP threads that outnumber the cores spin
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

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


def link_subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    """``dst/<class>/<image>`` symlinks to the first images of the first classes of ``src``."""
    for cls in sorted(p.name for p in src.iterdir())[:classes]:
        (dst / cls).mkdir(parents=True)
        for img in sorted((src / cls).iterdir())[:per_class]:
            os.symlink(img.resolve(), dst / cls / img.name)
    return dst


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``tmp_path_factory.mktemp`` for module-scoped fixtures, whose folders go when the module's
    tests are done and none failed: pytest keeps mktemp folders until the session ends, and the
    suite's checkpoints and Mask R-CNN runs would pile up to gigabytes of disk."""
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    failed = request.session.testsfailed  # a module's tests run on one worker, one after another
    yield mktemp
    if request.session.testsfailed == failed:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_train(cifar10_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 CIFAR-10 training images (4 classes × 16): 8 steps per epoch at batch 8."""
    return link_subset(cifar10_mini / "train", tmp_path_factory.mktemp("tiny") / "train", 4, 16)


@pytest.fixture(scope="session")
def tiny_val(cifar10_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 labelled images of the same 4 classes, for the kNN monitor."""
    return link_subset(cifar10_mini / "val", tmp_path_factory.mktemp("tinyval") / "val", 4, 8)


@pytest.fixture(autouse=True)
def drop_logging_handlers_added_by_the_test():
    """Remove logging handlers a test added (Detectron2's ``setup_logger`` in an in-process
    run attaches them to the stream pytest captured for that test; once the stream is closed,
    every later log line would print a logging error into another test's stderr)."""
    import logging

    def handlers() -> dict[str, list[logging.Handler]]:
        names = list(logging.root.manager.loggerDict)  # not the root: pytest's own are there
        return {n: list(logging.getLogger(n).handlers) for n in names
                if isinstance(logging.getLogger(n), logging.Logger)}

    before = handlers()
    yield
    for name, now in handlers().items():
        for handler in now:
            if handler not in before.get(name, []):
                logging.getLogger(name).removeHandler(handler)
                handler.close()


#: The longest test files (``--durations`` of a full run), started first, longest first: with
#: ``make test``'s workers taking a file at a time, a long file started late would keep one
#: worker busy while the others sit idle.
LONGEST_FIRST = ("test_eval_scale.py", "test_gpu_check.py", "test_demo.py", "test_knn_scale.py",
                 "test_distributed_resume.py",
                 "test_pretrain_faults.py", "test_pretrain_slurm.py",
                 "test_distributed_restart.py", "test_transfer_resume.py",
                 "test_transfer_slurm.py", "test_hostile_transfer.py", "test_method_matrix.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest files first, then the other files with slow tests, then the rest."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if item.path.name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(item.path.name)
        return (1 if item.path in slow_files else 2), 0

    items.sort(key=rank)  # stable: the order within a file stays
