"""The resume-exact fine-tuning loop: Detectron2's ``DefaultTrainer`` with our evaluator,
CPU multi-process support, a loader that skips undecodable images, and checkpoints that
also hold the random state so that a resumed run goes on as if it had not stopped.

Run preparation (checking the input, building the frozen config, launching the processes)
is in :mod:`transfer.train`.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm

from . import (
    compat,  # noqa: F401  (np.float for the lvis package, also in spawned workers)
    modeling,  # noqa: F401  (registers FCOS and Res5ROIHeadsExtraNorm)
)
from ._private import cpu_ddp, scale_wide_grayscale_images
from .errors import first_line
from .evaluator import DetectionEvaluator
from .weights import SafeCheckpointer

scale_wide_grayscale_images()  # 16-bit grayscale PNGs as pretraining reads them, not white


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` evaluating COCO or LVIS per dataset with ``TRANSFER.EVALUATOR``
    (``fast``: faster-coco-eval, ``official``: pycocotools / lvis; the same numbers), and
    Pascal VOC with Detectron2's ``PascalVOCDetectionEvaluator``.

    It also runs multi-process on CPUs (gloo): Detectron2 wraps the model in
    ``DistributedDataParallel(device_ids=[local rank])``, which PyTorch refuses for a CPU
    module, so on CPU the wrapper is created with ``device_ids=None``.

    A resumed run goes on as if it had not stopped: its checkpoints also hold the random
    state (torch, numpy, Python; the GPU's), and on resuming the training data stream is
    replayed up to the checkpoint's iteration (with a fixed ``SEED``: the stream restarts
    from its seed, then the batches already trained on are skipped) before that state is put
    back. On one process on the CPU, an interrupted and resumed run ends with the same
    weights, bit for bit, as an uninterrupted one; with several processes every rank
    continues its data stream, and rank 0 its random state.
    """

    _resumed_rng: dict[str, Any] | None = None

    def __init__(self, cfg: CfgNode) -> None:
        if comm.get_world_size() > 1 and not cfg.MODEL.DEVICE.startswith("cuda"):
            with cpu_ddp():
                super().__init__(cfg)
        else:
            super().__init__(cfg)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rng"] = rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._resumed_rng = state_dict.get("rng")

    def resume_or_load(self, resume: bool = True) -> None:
        """Detectron2's, then (when it resumed) the data stream continued where it stopped."""
        self._resumed_rng = None
        super().resume_or_load(resume=resume)
        if self.start_iter == 0 or self.start_iter >= self.max_iter:
            return
        skip = self.start_iter if self.cfg.SEED >= 0 else 0  # no seed: nothing to replay
        rng = self._resumed_rng if comm.get_rank() == 0 else None  # rank 0's state is saved
        if skip:
            logging.getLogger("detectron2.transfer").info(
                "resuming at iteration %d: replaying the data stream of SEED %d past the %d "
                "batches already trained on, so that the run goes on as if uninterrupted",
                self.start_iter, self.cfg.SEED, skip)
        self.data_loader = ContinuedStream(self.data_loader, skip, rng)

    def build_hooks(self) -> list[Any]:
        """Detectron2's hooks, whose periodic checkpointer saves through
        :class:`~transfer.weights.SafeCheckpointer` (atomic writes: a full disk leaves the
        previous checkpoint, not a truncated one, and is one error line)."""
        self.checkpointer = SafeCheckpointer.replacing(self.checkpointer)
        return super().build_hooks()

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Detectron2's loader, with a mapper that skips images that fail to decode."""
        return build_detection_train_loader(cfg, mapper=SkippingMapper(cfg, is_train=True))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str,
                        output_folder: str | None = None) -> DatasetEvaluator:
        folder = output_folder or evaluation_folder(cfg, dataset_name)
        if MetadataCatalog.get(dataset_name).evaluator_type == "pascal_voc":
            # AP50 by the VOC07 11-point metric (VOC2012: all-point), AP over IoU 0.50:0.95
            # and AP75, difficult objects ignored: the number MoCo and its successors report.
            return PascalVOCDetectionEvaluator(dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        # LVIS cuts each image's detections to the model's limit (300 in the LVIS configs),
        # as Detectron2's LVISEvaluator does; COCO counts 1/10/100 per image.
        lvis = MetadataCatalog.get(dataset_name).evaluator_type == "lvis"
        limit = cfg.TEST.DETECTIONS_PER_IMAGE if lvis else None
        return DetectionEvaluator(dataset_name, tasks, output_dir=folder,
                                  evaluator=cfg.TRANSFER.EVALUATOR, max_dets_per_image=limit)


def evaluation_folder(cfg: CfgNode, dataset_name: str) -> str:
    """Where a test set's results file and evaluation details go:
    ``OUTPUT_DIR/inference/<name>``."""
    return os.path.join(cfg.OUTPUT_DIR, "inference", Path(dataset_name).stem)


class SkippingMapper(DatasetMapper):
    """``DatasetMapper`` that skips an image it cannot decode (truncated, emptied, replaced by
    a folder after the start-up check) with a warning naming it and a running count: it
    returns None, and Detectron2's ``MapDataset`` then maps another image in its place."""

    skipped = 0  # per process (each DataLoader worker counts its own)

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as err:  # what PIL raises for unreadable image data
            type(self).skipped += 1
            first = first_line(err, 120)
            # under "detectron2" so that it reaches the run's log.txt with Detectron2's lines
            logging.getLogger("detectron2.transfer").warning(
                "skipped unreadable image %s (%s); %d skipped by this loader worker so far",
                dataset_dict.get("file_name"), first, type(self).skipped)
            return None


class ContinuedStream:
    """A training data loader that, when iterated, first draws and drops ``skip`` batches,
    then puts back the random state ``rng`` (see :func:`rng_state`), then yields the rest.

    The loader's iterator is created exactly where the uninterrupted run created its own (at
    the first step, from the same seeded state), so its sampler, its augmentations and its
    workers' seeds give the same batches in the same order.
    """

    def __init__(self, loader: Iterable[Any], skip: int, rng: dict[str, Any] | None) -> None:
        self.loader = loader
        self.skip = skip
        self.rng = rng

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        for _ in range(self.skip):
            next(batches)
        if self.rng is not None:
            set_rng_state(self.rng)
        yield from batches


def rng_state() -> dict[str, Any]:
    """This process's random state (torch, numpy, Python and the current GPU's), in types
    that ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put back a state of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

