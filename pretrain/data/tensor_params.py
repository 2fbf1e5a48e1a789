"""The draws of SPEC §1.1's two views for a batch (SPEC §1.7): parameters, no pixels.

The parameters of every view of every sample are drawn on the CPU with the very calls
torchvision's transforms make, in their order, from one ``torch.Generator`` per sample seeded
with :func:`sample_seed` (seed, epoch, index). That is how
``pretrain.data.folder.TwoViewDataset`` seeds the PIL path, so both paths draw the same
parameters for a sample, a view is a pure function of (seed, epoch, index), and a resumed run
needs no saved random state (:func:`seeds_from` derives the seeds from one generator instead,
for callers that keep a generator; they save ``generator.get_state()``).

A :class:`ViewRecipe` says what a view's parameters are drawn from; :func:`sample_views` draws
them, one :class:`ViewParams` per view, and :func:`pretrain.data.tensor_ops.augment` applies
them to the pixels (as a Detectron2 ``Augmentation`` draws the ``Transform`` that is then
applied). Drawing needs only the images' sizes, so DataLoader workers can do it from the sizes
in file headers.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache

import torch
import torchvision.transforms as T


def blur_kernel_size(image_size: int) -> int:
    """The blur kernel of :func:`pretrain.data.views.view_transform`: about 10% of the side, odd."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of a sample's generator: the one ``pretrain.data.folder.TwoViewDataset`` gives
    torch."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63)


def seeds_from(generator: torch.Generator, n: int) -> list[int]:
    """``n`` sample seeds drawn from one generator (save ``generator.get_state()`` to resume)."""
    return torch.randint(0, 2**63 - 1, (n,), generator=generator).tolist()


@dataclass(frozen=True)
class ViewRecipe:
    """One view of SPEC §1.1: the distributions its parameters are drawn from."""

    size: int
    blur_p: float
    solarize_p: float
    min_scale: float = 0.08
    max_scale: float = 1.0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    gray_p: float = 0.2
    sigma: tuple[float, float] = (0.1, 2.0)

    @property
    def kernel(self) -> int:
        return blur_kernel_size(self.size)

    @cached_property
    def jitter_ranges(self) -> tuple[tuple[float, float] | None, ...]:
        """(brightness, contrast, saturation, hue) ranges as ``ColorJitter`` resolves them;
        None for an adjustment it leaves out (and then draws nothing for)."""
        cj = T.ColorJitter(*self.jitter)
        return cj.brightness, cj.contrast, cj.saturation, cj.hue


def two_view_recipes(image_size: int, min_scale: float = 0.08,
                     blur: tuple[float, float] = (1.0, 0.1)) -> tuple[ViewRecipe, ViewRecipe]:
    """View 1: blur p 1.0, solarize p 0; view 2: blur p 0.1, solarize p 0.2 (``blur``: the
    two blur probabilities)."""
    return (ViewRecipe(image_size, blur_p=blur[0], solarize_p=0.0, min_scale=min_scale),
            ViewRecipe(image_size, blur_p=blur[1], solarize_p=0.2, min_scale=min_scale))



class Draws:
    """The random calls torchvision's transforms make, drawn from one generator.

    ``torch.rand(1)``, ``torch.empty(1).uniform_(a, b)``, ``torch.randint(0, n, (1,))`` and
    ``torch.randperm(4)`` with ``generator=``: the same numbers as those calls on a generator
    in the same state (written into two reused one-element tensors, which is quicker).
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator if generator is not None else torch.Generator()
        self._float = torch.empty(1)
        self._long = torch.empty(1, dtype=torch.long)

    def uniform(self, low: float, high: float) -> float:
        return self._float.uniform_(low, high, generator=self.generator).item()

    def log_uniform(self, low: float, high: float) -> float:
        """``torch.exp(torch.empty(1).uniform_(low, high)).item()`` (exp in float32)."""
        return self._float.uniform_(low, high, generator=self.generator).exp_().item()

    def rand(self) -> float:
        return self.uniform(0.0, 1.0)

    def randint(self, high: int) -> int:
        return self._long.random_(0, high, generator=self.generator).item()

    def randperm4(self) -> list[int]:
        return torch.randperm(4, generator=self.generator).tolist()

    def applies(self, p: float) -> bool:
        """``RandomApply``'s draw: applied unless ``p < torch.rand(1)`` (compared in float32)."""
        return not _float32(p) < self.rand()

    def happens(self, p: float) -> bool:
        """``RandomHorizontalFlip``'s and ``RandomGrayscale``'s draw: ``torch.rand(1) < p``."""
        return self.rand() < _float32(p)


def _float32(x: float) -> float:
    """``x`` rounded to float32, as torch compares a float32 tensor with a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def crop_box(draws: Draws, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` drawing from ``draws``: (top, left, height, width).

    Ten tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio, then the
    centre crop of the ratio-clamped whole image; the same calls, so the same numbers.
    """
    area = height * width
    log_ratio = _log_ratio(tuple(ratio))
    for _ in range(10):
        target_area = area * draws.uniform(scale[0], scale[1])
        aspect_ratio = draws.log_uniform(*log_ratio)
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = draws.randint(height - h + 1)
            j = draws.randint(width - w + 1)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@lru_cache(maxsize=16)
def _log_ratio(ratio: tuple[float, float]) -> tuple[float, float]:
    """``torch.log(torch.tensor(ratio))`` (float32), as ``get_params`` computes it."""
    low, high = torch.log(torch.tensor(ratio)).tolist()
    return low, high


@dataclass
class ViewParams:
    """One view's parameters for a batch of N samples (CPU tensors, one row per sample).

    ``boxes`` (N, 4) top, left, height, width of the crop; ``order`` (N, 4) the jitter order
    (0 brightness, 1 contrast, 2 saturation, 3 hue); ``factors`` (N, 4) the four factors in
    that numbering (1, 1, 1, 0 where no jitter); ``sigma`` (N,) the blur σ (0 where no blur).
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, rows: torch.Tensor | Sequence[int]) -> ViewParams:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return ViewParams(*(getattr(self, f.name)[rows] for f in fields(self)))

    @staticmethod
    def cat(parts: Sequence[ViewParams]) -> ViewParams:
        return ViewParams(*(torch.cat([getattr(p, f.name) for p in parts])
                            for f in fields(ViewParams)))


def sample_view(draws: Draws, height: int, width: int, recipe: ViewRecipe) -> tuple:
    """One sample's view parameters, drawn in the order of ``view_transform``'s ``Compose``:
    crop, flip, jitter (apply?, order, factors), grayscale, blur (apply?, σ), solarize
    (apply?). A row of :class:`ViewParams`."""
    box = crop_box(draws, height, width, (recipe.min_scale, recipe.max_scale), recipe.ratio)
    flip = draws.happens(recipe.flip_p)
    jitter = draws.applies(recipe.jitter_p)
    order, factors = [0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0]
    if jitter:  # ColorJitter.get_params
        order = draws.randperm4()
        for k, bounds in enumerate(recipe.jitter_ranges):
            if bounds is not None:
                factors[k] = draws.uniform(*bounds)
    gray = draws.happens(recipe.gray_p)
    blur = draws.applies(recipe.blur_p)
    sigma = draws.uniform(*recipe.sigma) if blur else 0.0
    solarize = draws.applies(recipe.solarize_p)
    return box, flip, jitter, order, factors, gray, blur, sigma, solarize


def _stack(rows: list[tuple]) -> ViewParams:
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 9
    box, flip, jitter, order, factors, gray, blur, sigma, solarize = cols
    return ViewParams(
        boxes=torch.tensor(box, dtype=torch.long).reshape(-1, 4),
        flip=torch.tensor(flip, dtype=torch.bool), jitter=torch.tensor(jitter, dtype=torch.bool),
        order=torch.tensor(order, dtype=torch.long).reshape(-1, 4),
        factors=torch.tensor(factors, dtype=torch.float32).reshape(-1, 4),
        gray=torch.tensor(gray, dtype=torch.bool), blur=torch.tensor(blur, dtype=torch.bool),
        sigma=torch.tensor(sigma, dtype=torch.float32),
        solarize=torch.tensor(solarize, dtype=torch.bool))


def sample_views(sizes: Sequence[tuple[int, int]], seeds: Sequence[int],
                 recipes: Sequence[ViewRecipe]) -> list[ViewParams]:
    """The parameters of every view (one :class:`ViewParams` per recipe) of every sample.

    ``sizes`` are the images' (height, width); sample k draws all its views, in recipe order,
    from a generator seeded with ``seeds[k]`` (as ``TwoViewDataset`` calls view 1 then view 2
    after seeding torch). Costs 0.1–0.2 ms of CPU per sample on this project's 2-core
    machine, and needs only the sizes: DataLoader workers can do it from file headers
    (``pretrain.data.tensor_pipeline.SampleInWorker``).
    """
    rows: list[list[tuple]] = [[] for _ in recipes]
    draws = Draws()
    for (height, width), seed in zip(sizes, seeds, strict=True):
        draws.generator.manual_seed(int(seed))
        for r, recipe in enumerate(recipes):
            rows[r].append(sample_view(draws, int(height), int(width), recipe))
    return [_stack(r) for r in rows]
