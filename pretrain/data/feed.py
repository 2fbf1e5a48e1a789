"""What feeds a training step: ``(view1, view2, unreadable)`` batches for an epoch (SPEC §1.7).

``data.pipeline`` chooses how the two views are made:

- ``pil``: PIL decoding and torchvision transforms in DataLoader workers
  (:class:`pretrain.data.folder.TwoViewDataset`);
- ``tensor``: the batched uint8 path of :mod:`pretrain.data.tensor_pipeline`. On a GPU the
  workers only read bytes (and draw each view's parameters from the file headers); decoding
  (nvjpeg) and augmentation run on the device. On the CPU the workers do both;
- ``auto``: ``tensor``, on CUDA and on the CPU (where it makes 2.2× the images/s of ``pil``
  per core at 224 px and 6.5× on CIFAR-size images: ``benchmarks/data_pipeline.py``).

``data.cache=device`` decodes the whole (small) dataset once into a uint8 tensor on the
device (:class:`pretrain.data.resident.ResidentImages`) and augments batches of it there: a
step then reads no files. It implies the tensor path.

Every path draws a sample's views from (seed, epoch, dataset index) alone, and every path
visits the samples in the order of the same resumable sampler, so a resumed run sees the
views an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..config import Config
from ..errors import UserError
from .folder import TwoViewDataset, Unreadable
from .loader import build_loader, epoch_batches

#: ``data.cache=device`` is for CIFAR-size data: refuse a folder whose copy would not fit.
MAX_RESIDENT_IMAGES = 2_000_000


class Feed:
    """The batches of one training process, whichever ``data.pipeline`` makes them."""

    def __init__(self, cfg: Config, dataset: TwoViewDataset, device: torch.device,
                 main: bool = True) -> None:
        self.cfg, self.dataset, self.device = cfg, dataset, device
        pipeline = cfg.data.pipeline
        if pipeline == "auto":
            pipeline = "tensor"
        if cfg.data.cache == "device" and pipeline == "pil":
            raise UserError("data.cache=device keeps decoded images on the device for the "
                            "tensor path; set data.pipeline=tensor (or auto)")
        self.pipeline = pipeline
        self.resident = None
        self.unreadable_at_start: list[Unreadable] = []
        if pipeline == "tensor":
            from .tensor_views import TwoViewAugment

            self.augment = TwoViewAugment(cfg.data.image_size, cfg.data.min_scale,
                                          blur=(cfg.data.view1_blur, cfg.data.view2_blur))
        if cfg.data.cache == "device":
            self.resident = self._build_resident(main)

    @property
    def num_images(self) -> int:
        """Images an epoch draws from (a resident copy leaves out the unreadable ones)."""
        return len(self.resident) if self.resident is not None else len(self.dataset)

    def _build_resident(self, main: bool):
        from .resident import ResidentImages, check_fits

        samples = self.dataset.folder.samples
        if len(samples) > MAX_RESIDENT_IMAGES:
            raise UserError(f"{self.dataset.folder.root}: {len(samples)} images are too many "
                            f"for data.cache=device (at most {MAX_RESIDENT_IMAGES}); leave "
                            f"data.cache=none")
        check_fits(samples.paths, self.device, self.dataset.folder.root)
        # the decoding DataLoader draws its base seed from torch's generator: keep that
        # generator where it was, so the model initialises as with any other pipeline
        with torch.random.fork_rng(devices=[]):
            resident = ResidentImages(samples, self.device, workers=self.cfg.data.workers,
                                      progress=main)
        self.unreadable_at_start = list(resident.unreadable)
        return resident

    def batches(self, rank: int, world_size: int, epoch: int,
                start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Unreadable]]]:
        """This rank's batches of ``epoch``, after ``start_batch`` of them."""
        cfg = self.cfg
        seed, batch_size = cfg.train.seed, cfg.data.batch_size
        if self.resident is not None:
            from .tensor_pipeline import views_from_resident

            for positions in epoch_batches(len(self.resident), batch_size, rank, world_size,
                                           epoch, start_batch, seed):
                views = views_from_resident(self.resident, positions, self.augment, seed, epoch)
                yield views.view1, views.view2, views.bad
            return
        common = dict(batch_size=batch_size, workers=cfg.data.workers, rank=rank,
                      world_size=world_size, epoch=epoch, start_batch=start_batch, seed=seed,
                      pin_memory=self.device.type == "cuda")
        if self.pipeline == "pil":
            yield from build_loader(self.dataset, **common)
            return
        from .decode import EncodedImages
        from .tensor_pipeline import AugmentInWorker, SampleInWorker, views_from_encoded

        files = EncodedImages(self.dataset.folder.samples.paths)
        if self.device.type == "cpu":
            for views in build_loader(files, collate_fn=AugmentInWorker(self.augment, seed,
                                                                        epoch), **common):
                yield views.view1, views.view2, views.bad
            return
        for encoded in build_loader(files, collate_fn=SampleInWorker(self.augment, seed, epoch),
                                    **common):
            views = views_from_encoded(encoded, self.augment, self.device, seed, epoch)
            yield views.view1, views.view2, views.bad
