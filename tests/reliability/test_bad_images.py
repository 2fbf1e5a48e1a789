"""Corrupt and unreadable images: skipped and counted; too many of them abort the run."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pretrain.__main__ import main
from pretrain.checkpoint import load_checkpoint

from .conftest import TINY, error_line

pytestmark = pytest.mark.slow

#: Kinds of broken image file, each written by ``_write_bad``.
BAD_KINDS = ("random_bytes", "truncated_jpeg", "truncated_png", "empty", "text_as_jpeg",
             "broken_symlink", "zeros", "png_header_only")


def _write_bad(path: Path, kind: str, good: Path, rng: random.Random) -> Path:
    """A file named like an image that no decoder can read, of the given kind."""
    if kind == "random_bytes":
        path.write_bytes(rng.randbytes(rng.randint(1, 4096)))
    elif kind == "truncated_jpeg":
        data = good.read_bytes()
        path.write_bytes(data[: rng.randint(len(data) // 4, len(data) // 2)])
    elif kind == "truncated_png":
        buffer = io.BytesIO()
        Image.open(good).convert("RGB").save(buffer, format="PNG")
        data = buffer.getvalue()
        path = path.with_suffix(".png")
        path.write_bytes(data[: rng.randint(60, len(data) // 2)])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text_as_jpeg":
        path.write_text("<html>404 Not Found</html>\n")
    elif kind == "broken_symlink":
        os.symlink(path.parent / "does-not-exist.jpg", path)
    elif kind == "zeros":
        path.write_bytes(bytes(rng.randint(100, 3000)))
    elif kind == "png_header_only":
        path = path.with_suffix(".png")
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def _dataset_with_bad_images(src: Path, dst: Path, per_class: int, seed: int) -> list[Path]:
    """Copy the ImageFolder ``src`` to ``dst`` and add ``per_class`` broken files per class."""
    shutil.copytree(src, dst, symlinks=True)
    rng = random.Random(seed)
    bad = []
    for i, folder in enumerate(sorted(p for p in dst.iterdir() if p.is_dir())):
        good = sorted(folder.iterdir())[0].resolve()
        for j in range(per_class):
            kind = BAD_KINDS[(i * per_class + j) % len(BAD_KINDS)]
            bad.append(_write_bad(folder / f"zz_bad_{j}.jpg", kind, good, rng))
    return bad


def test_unreadable_images_are_skipped_and_counted_in_training_and_the_knn_monitor(
        tiny_train: Path, tiny_val: Path, tmp_path: Path, capsys, ledger) -> None:
    data = tmp_path / "train"
    val = tmp_path / "val"
    bad = _dataset_with_bad_images(tiny_train, data, per_class=4, seed=1)
    bad_val = _dataset_with_bad_images(tiny_val, val, per_class=1, seed=2)
    ledger.bad_input("pretrain: image files", len(bad) + len(bad_val))
    run = tmp_path / "run"
    # 64 good + 16 bad images, batch 8, drop_last: one epoch of 10 steps sees every file once
    code = main(["train", "--data", str(data), "--val", str(val), "--out", str(run), *TINY,
                 "train.steps=10", "data.max_bad_fraction=0.25", "train.knn_every_epochs=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["step"] == 10 and steps[-1]["bad_images"] == len(bad) == 16
    warned = [line for line in captured.out.splitlines() if "unreadable image(s)" in line]
    assert sum(int(line.split("skipped ")[1].split()[0]) for line in warned) == 16
    knn = [r for r in records if "knn_top1_teacher" in r]
    assert knn and 0.0 <= knn[-1]["knn_top1_teacher"] <= 100.0  # the monitor ran past them


def test_more_bad_images_than_the_allowed_fraction_abort_with_one_line(
        tiny_train: Path, tmp_path: Path, capsys, ledger) -> None:
    data = tmp_path / "train"
    bad = _dataset_with_bad_images(tiny_train, data, per_class=4, seed=3)  # 20% of 80 files
    ledger.bad_input("pretrain: image files", len(bad))
    run = tmp_path / "run"
    # the fraction is checked once 100 images were seen: at step 13 of epoch 2 (workers on)
    code = main(["train", "--data", str(data), "--out", str(run), *TINY, "train.steps=20",
                 "data.max_bad_fraction=0.1", "data.workers=1", "train.save_every_steps=5"])
    assert code == 2
    line = error_line(capsys.readouterr().err, data)
    assert "could not be read" in line and "data.max_bad_fraction=0.1" in line
    bad_count, seen = (int(line.split(": ")[2].split()[0]), int(line.split(" of ")[1].split()[0]))
    assert seen >= 100 and bad_count / seen > 0.1
    assert load_checkpoint(run / "last.pth")["step"] == 10  # the last save before the abort
