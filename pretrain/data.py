"""Pretraining data: any ImageFolder-style directory, two views per image, resumable order.

Augmentation randomness is a pure function of (seed, epoch, index): each sample seeds the
RNGs it uses, so the views of a sample do not depend on the worker count or on where a run
was resumed. Undecodable images are skipped and counted, never fatal on their own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .errors import UserError


class LabelledImages(torchvision.datasets.ImageFolder):
    """``ImageFolder`` whose unreadable images come back as ``None`` (see ``collate_labelled``)."""

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        try:
            return super().__getitem__(index)
        except Exception:  # noqa: BLE001 - any decoding failure counts as a bad image
            return None


def collate_labelled(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the readable ``(image, label)`` samples of a batch; drop the unreadable ones."""
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(good)


def image_folder(root: str | Path, transform: Callable | None = None) -> LabelledImages:
    """``torchvision.datasets.ImageFolder`` with a one-line error for a missing or empty folder.

    Unreadable images yield ``None``; load batches with ``collate_fn=collate_labelled``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: data folder not found")
    try:
        return LabelledImages(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{root}: no images found in ImageFolder layout (<root>/<class>/<image>): "
                        f"{str(exc).splitlines()[0]}") from None


class TwoViewDataset(Dataset):
    """Yields ``(view1, view2)`` of an image, or ``None`` when the image cannot be read."""

    def __init__(self, root: str | Path, transform: Callable, seed: int = 0) -> None:
        self.folder = image_folder(root)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.folder.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        path, _ = self.folder.samples[index]
        try:
            img = self.folder.loader(path)
        except Exception:  # noqa: BLE001 - any decoding failure counts as a bad image
            return None
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        random.seed(sample_seed)
        torch.manual_seed(sample_seed % (2**63))
        return self.transform(img)


def collate_views(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the good samples; report how many were dropped."""
    good = [b for b in batch if b is not None]
    bad = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0), bad
    v1 = torch.stack([g[0] for g in good])
    v2 = torch.stack([g[1] for g in good])
    return v1, v2, bad


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch (``start_index`` samples in)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def build_loader(dataset: TwoViewDataset, batch_size: int, workers: int, rank: int,
                 world_size: int, epoch: int, start_batch: int, seed: int,
                 pin_memory: bool = False) -> DataLoader:
    """Loader for one epoch, resuming after ``start_batch`` batches of it."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    sampler.start_index = start_batch * batch_size
    dataset.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_views, drop_last=True, pin_memory=pin_memory,
                      persistent_workers=False)


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    per_rank = num_images // world_size  # DistributedSampler with drop_last
    return per_rank // batch_size


def total_steps_for(cfg_epochs: int, cfg_steps: int, per_epoch: int) -> tuple[int, int]:
    """(total steps K, epochs) for a run: ``steps`` wins over ``epochs`` when set."""
    if cfg_steps > 0:
        return cfg_steps, math.ceil(cfg_steps / per_epoch)
    return cfg_epochs * per_epoch, cfg_epochs
