"""Both views of SPEC §1.1 for a batch of uint8 images, on the images' device (SPEC §1.7):
the parameters drawn (:mod:`pretrain.data.tensor_params`), then applied to the pixels
(:mod:`pretrain.data.tensor_ops`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tensor_ops import Images, after_crop, device_of, image_sizes, resized_crop
from .tensor_params import ViewParams, sample_views, two_view_recipes
from .views import IMAGENET_MEAN, IMAGENET_STD


class TwoViewAugment:
    """Both views of SPEC §1.1 for a batch of uint8 images, on the images' device.

    >>> aug = TwoViewAugment(224)
    >>> seeds = [sample_seed(cfg_seed, epoch, i) for i in indices]   # doctest: +SKIP
    >>> view1, view2 = aug(images, seeds)                            # doctest: +SKIP

    Same seeds, same views (bit for bit on one device). Resuming: with seeds from
    :func:`sample_seed` there is nothing to save beyond (seed, epoch, position in the epoch);
    with seeds drawn by :func:`seeds_from` from a generator, save ``generator.get_state()``
    with the checkpoint and ``generator.set_state(state)`` on resume. ``sample`` and
    ``apply`` split the work, so that the parameters can be drawn elsewhere (in DataLoader
    workers, from the sizes in file headers) and applied on the GPU. Views are float32
    (``dtype`` to change), computed in float32 even inside an autocast region.
    """

    def __init__(self, image_size: int, min_scale: float = 0.08,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 dtype: torch.dtype = torch.float32, chunk_pixels: int = 1 << 18,
                 blur: tuple[float, float] = (1.0, 0.1)) -> None:
        self.recipes = two_view_recipes(image_size, min_scale, blur)
        self.mean, self.std, self.dtype = tuple(mean), tuple(std), dtype
        self.chunk_pixels = chunk_pixels

    def sample(self, sizes: Sequence[tuple[int, int]], seeds: Sequence[int]
               ) -> tuple[ViewParams, ViewParams]:
        view1, view2 = sample_views(sizes, seeds, self.recipes)
        return view1, view2

    def apply(self, images: Images, params: tuple[ViewParams, ViewParams]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views. The 2N crops go through the rest of the recipe together (the two
        recipes differ only in probabilities, already drawn) on a GPU; on the CPU a few at a
        time, about ``chunk_pixels`` pixels, from crop to normalisation (faster in cache)."""
        recipe = self.recipes[0]
        n, size = len(params[0]), recipe.size
        if n == 0:
            empty = torch.empty((0, 3, size, size), dtype=self.dtype)
            return empty, empty.clone()
        both = ViewParams.cat(params)
        device = device_of(images)
        step = 2 * n if device.type != "cpu" else max(1, self.chunk_pixels // (size * size))
        views = torch.empty((2 * n, 3, size, size), dtype=self.dtype, device=device)
        with torch.autocast(device.type, enabled=False):
            self._fill(views, images, both, step)
        return views[:n], views[n:]

    def _fill(self, views: torch.Tensor, images: Images, both: ViewParams, step: int) -> None:
        recipe, n = self.recipes[0], len(both) // 2
        size = recipe.size
        for k in range(0, 2 * n, step):
            rows = list(range(k, min(k + step, 2 * n)))
            sources = [r % n for r in rows]
            if isinstance(images, torch.Tensor):
                chunk = images if sources == list(range(n)) else images[sources]
            else:
                chunk = [images[i] for i in sources]
            part = both.subset(rows)
            x = resized_crop(chunk, part.boxes, size)
            views[k:k + len(rows)] = after_crop(x, part, recipe, self.mean, self.std)

    def __call__(self, images: Images, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) == 0:
            return self.apply(images, self.sample([], []))
        return self.apply(images, self.sample(image_sizes(images), seeds))
