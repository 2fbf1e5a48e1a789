"""The file list as one buffer (``pretrain.data.samples``): the same entries as torchvision's
list of tuples, in the same order; and ``data.cache=device`` refused up front when the copy
would not fit, in one line with the size it needs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import pretrain.data.resident as resident
from pretrain.__main__ import main
from pretrain.data.folder import image_folder
from pretrain.data.samples import Paths, Samples
from pretrain.errors import UserError

from .conftest import TINY

IMAGENET = 1_281_167


def test_the_buffer_holds_torchvisions_samples_in_order(cifar10_mini: Path) -> None:
    root = cifar10_mini / "train"
    want = torchvision.datasets.ImageFolder(str(root)).samples
    folder = image_folder(root)
    assert isinstance(folder.samples, Samples) and folder.imgs is folder.samples
    assert len(folder.samples) == len(want)
    assert list(folder.samples) == want and folder.samples == want
    assert folder.targets.tolist() == [t for _, t in want]
    got = folder.samples[len(want) // 2]
    assert got == want[len(want) // 2] and type(got[0]) is str and type(got[1]) is int
    assert folder.samples[-1] == want[-1]
    assert list(folder.samples.paths) == [p for p, _ in want]


def test_the_buffer_is_a_few_arrays_not_an_object_per_sample() -> None:
    pairs = [(f"/data/train/n{k % 1000:08d}/n{k % 1000:08d}_{k}.JPEG", k % 1000)
             for k in range(10_000)]
    samples = Samples(pairs)
    assert samples.nbytes == sum(len(p) for p, _ in pairs) + 8 * len(pairs) * 2
    assert pickle.loads(pickle.dumps(samples)) == pairs
    assert samples[::1000] == pairs[::1000] and isinstance(samples[::1000], Samples)
    assert samples[-3:] == pairs[-3:]
    with pytest.raises(IndexError):
        samples[len(pairs)]
    assert list(Samples([])) == [] and len(Paths([])) == 0


def test_file_names_that_are_not_utf8_come_back_unchanged() -> None:
    odd = os.fsdecode(b"/data/caf\xe9/\xff\xfe.jpg")  # latin-1 bytes: surrogate escapes
    assert Paths([odd, "/data/ok.jpg", "/données/é.jpg"])[0] == odd
    assert list(Paths([odd, "/données/é.jpg"])) == [odd, "/données/é.jpg"]


def _jpeg(path: Path, w: int, h: int) -> Path:
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path, "JPEG")
    return path


def test_a_device_copy_too_large_is_refused_with_its_size(tmp_path: Path, monkeypatch) -> None:
    # ImageNet's listing, every entry one of four 500×375 JPEGs (its typical size): the copy
    # would take 1,281,167 × 3 × 500 × 375 bytes = 671.2 GiB
    files = [str(_jpeg(tmp_path / f"{k}.jpg", 500, 375)) for k in range(4)]
    paths = Paths(files[k % 4] for k in range(IMAGENET))
    monkeypatch.setattr(resident, "available_bytes", lambda device: 80 << 30)
    with pytest.raises(UserError) as err:
        resident.check_fits(paths, torch.device("cuda"), "/data/imagenet/train")
    assert str(err.value) == (
        "/data/imagenet/train: data.cache=device needs 671.2 GiB for this folder (1,281,167 "
        "images of about 500×375 px); the device has 80.0 GiB free; leave data.cache=none")
    # on the host the build holds the decoded images and their stacked copy
    monkeypatch.setattr(resident, "host_available_bytes", lambda: 1000 << 30)
    with pytest.raises(UserError, match=r"needs 1,342\.3 GiB of RAM .* has 1,000\.0 GiB"):
        resident.check_fits(paths, torch.device("cpu"), "/data/imagenet/train")
    monkeypatch.setattr(resident, "host_available_bytes", lambda: 2000 << 30)
    resident.check_fits(paths, torch.device("cpu"), "/data/imagenet/train")  # fits: no error


def test_the_trainer_refuses_it_before_decoding_an_image(tiny_train: Path, tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    def decode(*args):
        raise AssertionError("an image was decoded before the refusal")

    monkeypatch.setattr(resident, "decode_cpu", decode)
    monkeypatch.setattr(resident, "host_available_bytes", lambda: 100 << 10)  # 100 KiB
    assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / "run"), *TINY,
                 "train.steps=2", "train.device=cpu", "data.cache=device"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # 64 CIFAR images of 32×32: 192 KiB, twice while stacked
    assert err == [f"error: {tiny_train}: data.cache=device needs 0.4 MiB of RAM to build the "
                   f"copy of this folder (64 images of about 32×32 px: 0.2 MiB, held twice "
                   f"while it is stacked); this machine has 0.1 MiB available; leave "
                   f"data.cache=none"], err
    assert not (tmp_path / "run" / "last.pth").exists()
