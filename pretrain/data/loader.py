"""The resumable order of a pretraining epoch: which samples each rank sees, in which batches.

Every data path visits the samples in the order of :class:`ResumableDistributedSampler`, so a
run resumed part-way through an epoch (``start_batch``) sees the batches an uninterrupted one
would: from files through :func:`build_loader`, from a resident copy through
:func:`epoch_batches`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .folder import collate_views


class Loader(DataLoader):
    """``DataLoader`` that leaves the worker count to the config: the Trainer says once, in its
    own words, when ``data.workers`` exceeds the CPUs (torch would warn at every epoch)."""

    def check_worker_number_rationality(self) -> None:
        pass


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as torch's DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def build_loader(dataset: Dataset, batch_size: int, workers: int, rank: int,
                 world_size: int, epoch: int, start_batch: int, seed: int,
                 pin_memory: bool = False, collate_fn: Callable = collate_views) -> DataLoader:
    """Loader for one epoch, resuming after ``start_batch`` batches of it."""
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    sampler.start_index = start_batch * batch_size
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                  collate_fn=collate_fn, drop_last=True, pin_memory=pin_memory,
                  persistent_workers=False)


def epoch_batches(num_images: int, batch_size: int, rank: int, world_size: int, epoch: int,
                  start_batch: int, seed: int) -> list[list[int]]:
    """The batches of positions :func:`build_loader`'s sampler gives this rank in ``epoch``,
    after ``start_batch`` batches: the same order for a resident dataset as for files."""
    sampler = ResumableDistributedSampler(range(num_images), num_replicas=world_size,
                                          rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    sampler.start_index = start_batch * batch_size
    order = list(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    per_rank = num_images // world_size  # DistributedSampler with drop_last
    return per_rank // batch_size


def total_steps_for(cfg_epochs: int, cfg_steps: int, per_epoch: int) -> tuple[int, int]:
    """(total steps K, epochs) for a run: ``steps`` wins over ``epochs`` when set."""
    if cfg_steps > 0:
        return cfg_steps, math.ceil(cfg_steps / per_epoch)
    return cfg_epochs * per_epoch, cfg_epochs
