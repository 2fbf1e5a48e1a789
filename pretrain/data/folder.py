"""Pretraining images from any ImageFolder-style directory, readable or not.

:class:`TwoViewDataset` yields the two views of each image (the PIL path, SPEC §1.1) with its
augmentation randomness a pure function of (seed, epoch, index): each sample seeds the RNGs it
uses, so the views of a sample do not depend on the worker count or on where a run was
resumed. :func:`image_folder` lists labelled images for the kNN and linear evaluations.
Undecodable images are skipped and counted by path (:class:`Unreadable`), never fatal on
their own.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch.utils.data import Dataset, default_collate

from jobs.images import open_rgb

from ..errors import UserError, first_line
from .samples import Samples


class Unreadable(NamedTuple):
    """What a dataset yields for an image it cannot decode: the file and why."""

    path: str
    reason: str

    @classmethod
    def of(cls, path: str, exc: Exception) -> Unreadable:
        first = first_line(exc)
        reason = first.replace(repr(path), "").replace(path, "").strip(" :'\"")
        return cls(path, (reason or type(exc).__name__)[:100])

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})"


def describe_unreadable(bad: list[Unreadable], most: int = 3) -> str:
    """``a.jpg (reason), b.png (reason) and 4 more``."""
    named = ", ".join(map(str, bad[:most]))
    return named + (f" and {len(bad) - most} more" if len(bad) > most else "")


class LabelledImages(torchvision.datasets.ImageFolder):
    """``ImageFolder`` whose unreadable images come back as :class:`Unreadable`.

    ``samples`` (and its alias ``imgs``) is a :class:`~.samples.Samples` buffer, ``targets``
    its label array: the file list torchvision scans, held without a Python object per
    image, so DataLoader workers do not copy it page by page (``pretrain.data.samples``).

    Folders reached twice through symbolic links (a link to the class folder inside itself
    loops until the path is too long, listing every image again at each level) are listed
    once: ``repeated`` counts the images dropped, ``repeated_at`` names a folder they were in.
    """

    def __init__(self, root: str, transform: Callable | None = None) -> None:
        # open_rgb: torchvision's PIL loader, but a 16-bit grayscale PNG is scaled to 8 bits
        # (as the tensor path's decoder does), not clipped to white by PIL's convert
        super().__init__(root, transform=transform, loader=open_rgb)
        kept, self.repeated, self.repeated_at = drop_repeated_folders(self.samples)
        self.samples = self.imgs = Samples(kept)
        self.targets = self.samples.targets

    def __getitem__(self, index: int) -> tuple[Any, int] | Unreadable:
        try:
            with quiet_decoding():
                return super().__getitem__(index)
        except Exception as exc:  # noqa: BLE001 - any decoding failure counts as a bad image
            return Unreadable.of(self.samples[index][0], exc)


@contextlib.contextmanager
def quiet_decoding() -> Iterator[None]:
    """Silence PIL's remarks on files it reads all the same (palette transparency, odd EXIF,
    very large images): on a real dataset they would flood the terminal from every worker."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def drop_repeated_folders(samples: list[tuple[str, int]]
                          ) -> tuple[list[tuple[str, int]], int, str | None]:
    """``samples`` without those reached again through another path to the same real folder.

    Returns the samples kept, how many were dropped and one folder they were listed in.
    Only folders are resolved (a few thousand ``realpath`` calls for ImageNet, not a million).
    """
    real: dict[str, str] = {}
    owner: dict[tuple[str, int], str] = {}
    kept, repeated_at = [], None
    for path, target in samples:
        folder = os.path.dirname(path)
        if folder not in real:
            real[folder] = os.path.realpath(folder)
        if owner.setdefault((real[folder], target), folder) == folder:
            kept.append((path, target))
        elif repeated_at is None:
            repeated_at = folder
    return kept, len(samples) - len(kept), repeated_at


def collate_labelled(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[Unreadable]]:
    """Stack the readable ``(image, label)`` samples of a batch; list the unreadable ones."""
    bad = [b for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, labels = default_collate(good)
    return images, labels, bad


def image_folder(root: str | Path, transform: Callable | None = None,
                 option: str = "data folder") -> LabelledImages:
    """``torchvision.datasets.ImageFolder`` with a one-line error for a missing or empty folder.

    Unreadable images yield :class:`Unreadable`; load batches with ``collate_labelled``.
    Images listed again through symbolic links are dropped with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise UserError(f"{root}: {option} {what}")
    try:
        folder = LabelledImages(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{root}: no images found in ImageFolder layout (<root>/<class>/<image>): "
                        f"{str(exc).splitlines()[0]}") from None
    except OSError as exc:  # a symbolic link loop too deep to list, a folder gone meanwhile
        raise UserError(f"{root}: cannot list the images ({exc.strerror or exc})") from None
    if folder.repeated:
        print(f"warning: {root}: {folder.repeated} image(s) reached a second time through "
              f"symbolic links (a link loop or a second link to a folder, e.g. at "
              f"{folder.repeated_at}) are used once", file=sys.stderr, flush=True)
    return folder


def check_same_classes(train: list[str], val: list[str], train_dir: str | Path,
                       val_dir: str | Path) -> None:
    """The labels of a kNN or linear evaluation are class-folder indices: both sides must agree."""
    if train != val:
        def some(names: set[str]) -> str:
            return ", ".join(sorted(names)[:3]) + (" ..." if len(names) > 3 else "")

        extra, missing = set(val) - set(train), set(train) - set(val)
        says = [f"not in the other: {some(extra)}"] if extra else []
        says += [f"missing: {some(missing)}"] if missing else []
        raise UserError(f"{val_dir}: class folders differ from those of {train_dir} "
                        f"({'; '.join(says)}); the labels would not match")


def with_transform(folder: LabelledImages, transform: Callable) -> LabelledImages:
    """The same images (no second scan of the folder) with another transform."""
    other = copy.copy(folder)
    other.transform = transform
    other.transforms = torchvision.datasets.vision.StandardTransform(transform, None)
    return other


class TwoViewDataset(Dataset):
    """Yields ``(view1, view2)`` of an image, or :class:`Unreadable` when it cannot be read."""

    def __init__(self, root: str | Path, transform: Callable, seed: int = 0) -> None:
        self.folder = image_folder(root)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.folder.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | Unreadable:
        path, _ = self.folder.samples[index]
        try:
            with quiet_decoding():
                img = self.folder.loader(path)
        except Exception as exc:  # noqa: BLE001 - any decoding failure counts as a bad image
            return Unreadable.of(path, exc)
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        random.seed(sample_seed)
        torch.manual_seed(sample_seed % (2**63))
        return self.transform(img)


def collate_views(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[Unreadable]]:
    """Stack the good samples; list the unreadable ones."""
    bad = [b for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    if not good:
        return torch.empty(0), torch.empty(0), bad
    v1 = torch.stack([g[0] for g in good])
    v2 = torch.stack([g[1] for g in good])
    return v1, v2, bad
