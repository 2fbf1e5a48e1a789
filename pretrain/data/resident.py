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

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .decode import decode_cpu, read_bytes
from .folder import Unreadable, image_folder, quiet_decoding
from .samples import Samples

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


def estimate_bytes(paths: Sequence[str], most: int = 64) -> tuple[int, tuple[int, int]] | None:
    """What the decoded copy of ``paths`` would take, from the headers of at most ``most``
    files spread over the list (PIL reads only the header: nothing is decoded): the bytes
    (3 × H × W per image, on average) and a typical (H, W). None when no header is read."""
    n = len(paths)
    picks = sorted({round(k * (n - 1) / max(most - 1, 1)) for k in range(min(n, most))})
    sizes = []
    for k in picks:
        try:
            with quiet_decoding(), Image.open(paths[k]) as image:
                sizes.append(image.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sizes:
        return None
    per_image = sum(3 * w * h for w, h in sizes) / len(sizes)
    median_w, median_h = sorted(sizes)[len(sizes) // 2]
    return round(per_image * n), (median_h, median_w)


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the GPU's (``torch.cuda.mem_get_info``), else the host's
    available RAM (``MemAvailable`` of ``/proc/meminfo``, else the free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()


def host_available_bytes() -> int:
    """The host's available RAM in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(nbytes: float) -> str:
    """``671.2 GiB``; below a GiB in MiB."""
    if nbytes < 2**30:
        return f"{nbytes / 2**20:,.1f} MiB"
    return f"{nbytes / 2**30:,.1f} GiB"


def check_fits(paths: Sequence[str], device: torch.device, root: str | Path) -> None:
    """Refuse, before anything is decoded, a resident copy that would not fit: on the device
    (the copy) or in host RAM while it is built (the decoded images and their stacked copy,
    twice the images' size). One ``UserError`` line with the sizes."""
    estimate = estimate_bytes(paths)
    if estimate is None:
        return  # nothing readable sampled: the build lists the unreadable files
    need, (h, w) = estimate
    what = f"{len(paths):,} images of about {w}×{h} px"
    if device.type == "cuda" and need > (have := available_bytes(device)):
        raise UserError(f"{root}: data.cache=device needs {_gib(need)} for this folder "
                        f"({what}); the device has {_gib(have)} free; leave data.cache=none")
    if 2 * need > (have := host_available_bytes()):
        raise UserError(f"{root}: data.cache=device needs {_gib(2 * need)} of RAM to build "
                        f"the copy of this folder ({what}: {_gib(need)}, held twice while it "
                        f"is stacked); this machine has {_gib(have)} available; leave "
                        f"data.cache=none")


def as_samples(paths: Sequence[str | Path] | Sequence[tuple[str, int]]) -> Samples:
    """``(path, label)`` pairs as :class:`Samples`; bare paths get the label -1."""
    if isinstance(paths, Samples):
        return paths
    return Samples(p if isinstance(p, tuple) else (str(p), -1) for p in paths)


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
        samples = as_samples(paths)
        files = samples.paths
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
        self.targets = torch.from_numpy(samples.targets[kept]).long()
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
