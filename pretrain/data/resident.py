"""A small dataset decoded once and held as uint8 on the training device (SPEC §1.7).

For a CIFAR-size dataset (``../shared/data/cifar10/train``: 50,000 images of 32×32, 150 MB
as uint8) reading and decoding files at every step costs more than the step itself on a
GPU. :class:`ResidentImages` decodes every image once, at the start, into one uint8 tensor
(N, 3, H, W) on the device (in RAM on a CPU run); a step then only indexes it
(:meth:`ResidentImages.batch`) and augments the batch where it lies
(:class:`pretrain.data.tensor_views.TwoViewAugment`). No file is read after the build.

Images that cannot be read are left out at build time and listed (``unreadable``), as the
PIL path skips and counts them; ``indices`` maps each resident image back to its index in the
dataset, from which its augmentation seed is derived (``tensor_params.sample_seed``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .decode import decode_cpu, read_bytes
from .folder import Unreadable, image_folder

Progress = Callable[[int, int], None]


def print_progress(every: float = 0.1, out: Any = None) -> Progress:
    """A ``progress(done, total)`` that prints a line at every ``every`` of the way."""
    start = time.perf_counter()
    shown = [-1]

    def progress(done: int, total: int) -> None:
        step = int(done / max(total, 1) / every)
        if step > shown[0] or done == total:
            shown[0] = step
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"resident data: {done:,}/{total:,} images decoded ({rate:,.0f}/s)",
                  file=out or sys.stderr, flush=True)

    return progress


class _Decoding(Dataset):
    """Each file decoded to uint8 RGB on the CPU, or :class:`Unreadable`."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor] | Unreadable:
        path = self.paths[index]
        try:
            return index, decode_cpu(read_bytes(path))
        except (OSError, RuntimeError) as exc:
            return Unreadable.of(path, exc)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


class ResidentImages:
    """Every readable image of a dataset, decoded once, as uint8 on ``device``.

    ``images``: one (N, 3, H, W) tensor when all images share a size, else a list of
    (3, H_i, W_i) tensors; ``indices`` (N,): each image's index in ``paths``; ``targets``
    (N,): its label when ``paths`` are ``(path, label)`` pairs (``ImageFolder.samples``);
    ``unreadable``: the files left out, with reasons. ``workers`` processes decode the files
    (0: this process); ``progress`` is called as ``progress(done, total)`` (``True``: print
    a line every 10% to stderr).
    """

    def __init__(self, paths: Sequence[str | Path] | Sequence[tuple[str, int]],
                 device: torch.device | str = "cpu", workers: int = 0,
                 progress: Progress | bool = True, chunk: int = 1024) -> None:
        pairs = [p if isinstance(p, tuple) else (str(p), -1) for p in paths]
        files = [str(path) for path, _ in pairs]
        report = print_progress() if progress is True else progress or None
        self.device = torch.device(device)
        self.unreadable: list[Unreadable] = []
        decoded: list[torch.Tensor] = []
        kept: list[int] = []
        loader = DataLoader(_Decoding(files), batch_size=chunk, num_workers=workers,
                            collate_fn=_as_list)
        done = 0
        for batch in loader:
            for item in batch:
                if isinstance(item, Unreadable):
                    self.unreadable.append(item)
                else:
                    kept.append(item[0])
                    decoded.append(item[1])
            done += len(batch)
            if report:
                report(done, len(files))
        self.indices = torch.tensor(kept, dtype=torch.long)
        self.targets = torch.tensor([pairs[k][1] for k in kept], dtype=torch.long)
        if decoded and len({tuple(d.shape) for d in decoded}) == 1:
            self.images: torch.Tensor | list[torch.Tensor] = torch.stack(decoded).to(self.device)
        else:
            self.images = [d.to(self.device) for d in decoded]

    @classmethod
    def from_folder(cls, root: str | Path, device: torch.device | str = "cpu",
                    **kwargs: Any) -> ResidentImages:
        """The images of an ImageFolder-layout folder (listed as ``pretrain.data.folder`` lists
        them)."""
        return cls(image_folder(root).samples, device, **kwargs)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def nbytes(self) -> int:
        if isinstance(self.images, torch.Tensor):
            return self.images.numel() * self.images.element_size()
        return sum(i.numel() * i.element_size() for i in self.images)

    def batch(self, positions: torch.Tensor | Sequence[int]
              ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
        """The images at ``positions`` (0 ≤ position < len(self)) and their dataset indices."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        if isinstance(self.images, torch.Tensor):
            images = self.images.index_select(0, positions.to(self.device, non_blocking=True))
        else:
            images = [self.images[p] for p in positions.tolist()]
        return images, self.indices[positions]
