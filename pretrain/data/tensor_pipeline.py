"""The tensor path end to end (SPEC §1.7): files or a resident copy in, two views out.

Three ways to feed a step, each a pure function of (seed, epoch, dataset index) per sample,
so that a resumed run sees the same views (only the usual sampler position is needed):

- **GPU, files**: DataLoader workers read bytes and draw the views' parameters from the
  sizes in the files' headers (``collate_fn=SampleInWorker(augment, seed, epoch)``); the
  main process decodes the batch on the GPU and applies the views there
  (:func:`views_from_encoded`).
- **CPU, files**: workers do everything and hand over finished views, like the PIL path's
  ``collate_views`` (``collate_fn=AugmentInWorker(augment, seed, epoch)``).
- **resident**: no workers; :func:`views_from_resident` indexes a
  :class:`pretrain.data.resident.ResidentImages` and augments on its device.

Every function returns a :class:`ViewBatch`: the views, the dataset indices of the samples
they show, and the images that could not be read (skipped and counted, as on the PIL path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .decode import EncodedBatch, collate_encoded, decode_batch
from .folder import Unreadable
from .resident import ResidentImages
from .tensor_ops import image_sizes
from .tensor_params import ViewParams, sample_seed
from .tensor_views import TwoViewAugment


class ViewBatch(NamedTuple):
    """A batch's two views, the dataset indices of the samples they show, and the images of
    the batch that could not be read."""

    view1: torch.Tensor
    view2: torch.Tensor
    indices: torch.Tensor
    bad: list[Unreadable]


def seeds_for(indices: torch.Tensor | Sequence[int], seed: int, epoch: int) -> list[int]:
    """Each sample's augmentation seed, from its dataset index (``sample_seed``)."""
    return [sample_seed(seed, epoch, int(i)) for i in indices]


class SampleInWorker:
    """``collate_fn`` for the GPU path: the bytes, plus both views' parameters, drawn in the
    worker from the sizes the headers give (about 0.1 ms of CPU per image the main process
    does not spend). Leaves ``params`` None when a header says nothing (a BMP, say): the
    main process then draws them after decoding."""

    def __init__(self, augment: TwoViewAugment, seed: int, epoch: int) -> None:
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __call__(self, batch: list) -> EncodedBatch:
        encoded = collate_encoded(batch)
        if encoded.sizes and all(s is not None for s in encoded.sizes):
            params = self.augment.sample(encoded.sizes,
                                         seeds_for(encoded.indices, self.seed, self.epoch))
            encoded = encoded._replace(params=params)
        return encoded


def views_from_encoded(batch: EncodedBatch, augment: TwoViewAugment,
                       device: torch.device | str, seed: int, epoch: int) -> ViewBatch:
    """Decode a batch of bytes on ``device`` (nvjpeg on a GPU) and make both views there,
    with the parameters the worker drew when they fit the decoded sizes."""
    decoded = decode_batch(batch, device)
    if not decoded.images:
        empty = torch.empty(0, 3, augment.recipes[0].size, augment.recipes[0].size)
        return ViewBatch(empty, empty.clone(), decoded.indices, decoded.bad)
    sizes = image_sizes(decoded.images)
    params: tuple[ViewParams, ViewParams] | None = None
    if batch.params is not None and [batch.sizes[k] for k in decoded.kept] == sizes:
        params = (batch.params[0].subset(decoded.kept), batch.params[1].subset(decoded.kept))
    if params is None:
        params = augment.sample(sizes, seeds_for(decoded.indices, seed, epoch))
    view1, view2 = augment.apply(decoded.images, params)
    return ViewBatch(view1, view2, decoded.indices, decoded.bad)


class AugmentInWorker:
    """``collate_fn`` for the CPU path: workers decode and augment, and hand over views."""

    def __init__(self, augment: TwoViewAugment, seed: int, epoch: int) -> None:
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __call__(self, batch: list) -> ViewBatch:
        return views_from_encoded(collate_encoded(batch), self.augment, "cpu", self.seed,
                                  self.epoch)


def views_from_resident(resident: ResidentImages, positions: torch.Tensor | Sequence[int],
                        augment: TwoViewAugment, seed: int, epoch: int) -> ViewBatch:
    """Both views of the resident images at ``positions``, on the resident device."""
    images, indices = resident.batch(positions)
    view1, view2 = augment(images, seeds_for(indices, seed, epoch))
    return ViewBatch(view1, view2, indices, [])
