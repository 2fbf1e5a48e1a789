"""Fine-tune and evaluate detectors from a converted checkpoint with Detectron2.

:func:`run_training` and :func:`run_evaluation` are the Python API behind
``m2t-transfer train`` / ``eval``. Both check their input first in the calling process
(config, datasets, weights: see :func:`prepare`), then start the work through Detectron2's
``launch`` (one process per GPU, several machines with ``--num-machines/--machine-rank/
--dist-url``) on its ``DefaultTrainer``: its hooks give LR schedule, PreciseBN, periodic
checkpoints, evaluation after the last iteration, and the writers (progress line with
losses and ETA, ``metrics.json``, TensorBoard). The main process then writes
``results.json`` and ``report.md`` into the output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase, default_setup, launch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from . import (
    compat,  # noqa: F401  (np.float for the lvis package, also in spawned workers)
    modeling,  # noqa: F401  (registers FCOS and Res5ROIHeadsExtraNorm)
)
from ._private import cpu_ddp
from .config import config_label, load_config, num_classes_key, resolve_config, set_key
from .datasets import DatasetSpec, register_dataset, resolve_dataset
from .errors import TransferError, first_line
from .evaluate import DetectionEvaluator, read_details
from .report import write_run_results
from .scoring import EVALUATORS
from .weights import SafeCheckpointer, check_weights, require_heads

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` evaluating COCO or LVIS per dataset with ``TRANSFER.EVALUATOR``
    (``fast``: faster-coco-eval, ``official``: pycocotools / lvis; the same numbers).

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

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Detectron2's loader, with a mapper that skips images that fail to decode."""
        return build_detection_train_loader(cfg, mapper=SkippingMapper(cfg, is_train=True))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str,
                        output_folder: str | None = None) -> DatasetEvaluator:
        folder = output_folder or evaluation_folder(cfg, dataset_name)
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


@dataclass
class Job:
    """Everything a worker process needs (picklable for ``launch``'s spawned processes)."""

    task: str  # "train" or "eval"
    cfg: CfgNode
    datasets: list[DatasetSpec]
    config_file: str
    info: dict[str, Any]
    resume: bool = False
    unsafe_load: bool = False


def prepare(
    task: str,
    config: str,
    weights: str,
    *,
    overrides: Sequence[str] = (),
    train_dataset: str | None = None,
    test_dataset: str | None = None,
    dataset_root: str | None = None,
    train_images: str | None = None,
    test_images: str | None = None,
    output_dir: str | None = None,
    method: str | None = None,
    world_size: int = 1,
    resume: bool = False,
    unsafe_load: bool = False,
    evaluator: str | None = None,
    device: str | None = None,
) -> Job:
    """Check all input of a train/eval run and build its final, frozen config.

    ``device``: the run's ``MODEL.DEVICE`` when it runs on other machines (a SLURM job):
    set before the SyncBN choice, and not checked against this machine's devices.

    Raises :class:`TransferError` (one line, naming the offending path) on bad input:
    unknown config, bad override, missing dataset root/JSON/images, a JSON not in COCO
    format, weights that do not fit the backbone.
    """
    config_file = resolve_config(config)
    if device:
        overrides = [*overrides, "MODEL.DEVICE", device]
    cfg = load_config(config, overrides, world_size=world_size, unsafe_load=unsafe_load)
    if train_dataset:
        cfg.DATASETS.TRAIN = (train_dataset,)
    if test_dataset:
        cfg.DATASETS.TEST = (test_dataset,)
    if not cfg.DATASETS.TEST:
        raise TransferError(config_file, "DATASETS.TEST is empty: nothing to evaluate on")
    if not device and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise TransferError(config_file, "MODEL.DEVICE is cuda but no CUDA device is "
                                         "available; set MODEL.DEVICE cpu")
    if evaluator:
        cfg.TRANSFER.EVALUATOR = evaluator
    if cfg.TRANSFER.EVALUATOR not in EVALUATORS:
        raise TransferError(config_file, f"TRANSFER.EVALUATOR is {cfg.TRANSFER.EVALUATOR!r}; "
                                         f"choose one of: {', '.join(EVALUATORS)}")

    datasets: dict[str, DatasetSpec] = {}
    train_specs = []
    if task == "train":
        if not cfg.DATASETS.TRAIN:
            raise TransferError(config_file, "DATASETS.TRAIN is empty: nothing to train on")
        train_specs = [resolve_dataset(s, dataset_root, train_images) for s in cfg.DATASETS.TRAIN]
    test_specs = [resolve_dataset(s, dataset_root, test_images) for s in cfg.DATASETS.TEST]
    for spec in train_specs + test_specs:
        datasets[spec.name] = spec
    cfg.DATASETS.TRAIN = tuple(s.name for s in train_specs) or cfg.DATASETS.TRAIN
    cfg.DATASETS.TEST = tuple(s.name for s in test_specs)
    if task == "eval" and cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS:
        # The federated-loss head reads class frequencies of DATASETS.TRAIN when it is
        # built; evaluation needs no training set, so let it read the test set's.
        cfg.DATASETS.TRAIN = cfg.DATASETS.TEST

    reference = (train_specs or test_specs)[0]
    for spec in train_specs + test_specs:
        if spec.thing_classes != reference.thing_classes:
            raise TransferError(spec.json_file, f"its {spec.num_classes} categories differ from "
                                                f"the {reference.num_classes} of "
                                                f"{reference.json_file}")
    for spec in test_specs:
        if spec.skipped_images:
            raise TransferError(spec.skipped_images[0], f"cannot be read (the first of "
                                f"{len(spec.skipped_images)} unreadable images of "
                                f"{spec.json_file}); evaluation needs every image")
    for spec in train_specs:
        if spec.skipped_images:
            print(f"warning: {spec.json_file}: skipping {len(spec.skipped_images)} unreadable "
                  f"image(s), e.g. {spec.skipped_images[0]}", file=sys.stderr, flush=True)
    if cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "polygon" and any(
            spec.has_rle_masks for spec in train_specs):
        cfg.INPUT.MASK_FORMAT = "bitmask"  # Detectron2 reads RLE masks only as bitmasks
        logger.info("RLE masks in the training set: INPUT.MASK_FORMAT set to bitmask")
    if cfg.MODEL.MASK_ON:
        for spec in train_specs:
            if not spec.has_masks:
                raise TransferError(spec.json_file, "annotations without segmentation masks, but "
                                                    f"{config_file.stem} trains a mask head; use a "
                                                    "box-only config such as fcos_R_50_FPN_1x")
    set_key(cfg, num_classes_key(cfg), reference.num_classes)

    weights_path = Path(weights).expanduser()
    if not weights_path.is_file():
        raise TransferError(weights_path, "weights file not found")
    cfg.MODEL.WEIGHTS = str(weights_path.resolve())
    cfg.TRANSFER.METHOD = method or cfg.TRANSFER.METHOD or _method_of(weights_path)
    label = cfg.TRANSFER.CONFIG or config_label(config)
    cfg.TRANSFER.CONFIG = label
    seed_part = f"seed{cfg.SEED}" if cfg.SEED >= 0 else ""
    cfg.OUTPUT_DIR = str(Path(output_dir) if output_dir else
                         Path("output", "transfer", label, cfg.TRANSFER.METHOD, seed_part))
    for spec in datasets.values():  # models may read dataset metadata (federated loss)
        register_dataset(spec)
    check_output_dir(Path(cfg.OUTPUT_DIR), task, resume)
    report = check_weights(cfg, cfg.MODEL.WEIGHTS, label, unsafe_load=unsafe_load)
    if task == "eval":
        require_heads(report)
    cfg.freeze()

    info = {
        "method": cfg.TRANSFER.METHOD,
        "config": label,
        "config_file": str(config_file),
        "weights": cfg.MODEL.WEIGHTS,
        "seed": cfg.SEED,
        "train_datasets": list(cfg.DATASETS.TRAIN) if task == "train" else [],
        "test_dataset": cfg.DATASETS.TEST[0],
        "iterations": cfg.SOLVER.MAX_ITER if task == "train" else 0,
        "total_batch": cfg.SOLVER.IMS_PER_BATCH,
        "base_lr": cfg.SOLVER.BASE_LR,
        "world_size": world_size,
        "evaluator": cfg.TRANSFER.EVALUATOR,
        "output_dir": str(Path(cfg.OUTPUT_DIR).resolve()),
    }
    return Job(task=task, cfg=cfg, datasets=list(datasets.values()),
               config_file=str(config_file), info=info, resume=resume,
               unsafe_load=unsafe_load)


#: Files a transfer run writes; one of them in --output-dir means a run is there already.
RUN_FILES = ("last_checkpoint", "model_final.pth", "results.json", "metrics.json")


def check_output_dir(out: Path, task: str, resume: bool) -> None:
    """Refuse an output directory whose run would be replaced or mixed with this one;
    with ``--resume``, check that the checkpoint to resume from is there and readable."""
    if out.exists() and not out.is_dir():
        raise TransferError(out, "--output-dir is a file, not a run directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if task == "eval":
        if "results.json" in found:
            raise TransferError(out, "already holds results.json of another run; evaluating "
                                     "into it would replace it: choose another --output-dir")
        return
    if not resume:
        if found:
            raise TransferError(out, f"already holds a fine-tuning run ({found[0]}); pass "
                                     f"--resume to continue it or choose another --output-dir")
        return
    pointer = out / "last_checkpoint"
    if not pointer.is_file():
        return  # --resume without a checkpoint starts from the weights, as Detectron2 does
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise TransferError(pointer, f"cannot read it ({err})") from None
    checkpoint = out / name
    if not name or not checkpoint.is_file():
        raise TransferError(pointer, f"names the checkpoint {name or '(nothing)'!r}, which is "
                                     f"not in {out}; delete last_checkpoint to start again "
                                     f"from the weights")
    try:
        torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure: the file cannot be resumed from
        raise TransferError(checkpoint, f"damaged checkpoint, cannot resume from it "
                                        f"({first_line(err, 160)}); "
                                        f"point last_checkpoint at an earlier one or delete "
                                        f"it") from None


def _method_of(weights: Path) -> str:
    """The method label of a weights file: its run's label if it lies in a run directory."""
    previous = weights.parent / "results.json"
    if previous.is_file():
        try:
            return str(json.loads(previous.read_text())["method"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return weights.stem


def run_job(job: Job, hooks: Sequence[HookBase] = ()) -> None:
    """The body of every worker process: train (then test) or only test, then write results.

    ``hooks`` go after the trainer's own (a SLURM job's stop-at-a-boundary hook)."""
    for spec in job.datasets:
        register_dataset(spec)
    cfg = job.cfg
    default_setup(cfg, argparse.Namespace(config_file=job.config_file, task=job.task,
                                          weights=cfg.MODEL.WEIGHTS, resume=job.resume))
    if job.task == "train":
        trainer = Trainer(cfg)
        # reads weights and resumed checkpoints without unpickling code (saving is unchanged)
        trainer.checkpointer = SafeCheckpointer.replacing(trainer.checkpointer, job.unsafe_load)
        trainer.register_hooks(list(hooks))
        trainer.resume_or_load(resume=job.resume)
        trainer.train()
        raw = getattr(trainer, "_last_eval_results", None)
        if raw is None:  # no evaluation happened (e.g. resumed after the last iteration)
            raw = Trainer.test(cfg, trainer.model)
    else:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR,
                         unsafe_load=job.unsafe_load).load(cfg.MODEL.WEIGHTS)
        raw = Trainer.test(cfg, model)
    if comm.is_main_process():
        per_dataset = _per_dataset(cfg, raw)
        info = dict(job.info)
        if len(per_dataset) > 1:
            info["per_dataset"] = per_dataset
        details = read_details(evaluation_folder(cfg, cfg.DATASETS.TEST[0]))
        write_run_results(cfg.OUTPUT_DIR, per_dataset[cfg.DATASETS.TEST[0]], info, details)


def _per_dataset(cfg: CfgNode, raw: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``DefaultTrainer.test`` un-nests a single dataset's results; nest them back."""
    if len(cfg.DATASETS.TEST) == 1:
        return {cfg.DATASETS.TEST[0]: raw}
    return {name: raw[name] for name in cfg.DATASETS.TEST}


def _launch(job: Job, num_gpus: int, num_machines: int, machine_rank: int,
            dist_url: str) -> dict[str, Any]:
    launch(run_job, num_gpus, num_machines=num_machines, machine_rank=machine_rank,
           dist_url=dist_url, args=(job,))
    results = Path(job.cfg.OUTPUT_DIR) / "results.json"
    if machine_rank != 0 or not results.is_file():
        return {}
    return json.loads(results.read_text())


def run_training(
    config: str,
    weights: str,
    *,
    output_dir: str | None = None,
    overrides: Sequence[str] = (),
    train_dataset: str | None = None,
    test_dataset: str | None = None,
    dataset_root: str | None = None,
    train_images: str | None = None,
    test_images: str | None = None,
    method: str | None = None,
    num_gpus: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    resume: bool = False,
    unsafe_load: bool = False,
    evaluator: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``config`` from ``weights``, evaluate, and return the run's results.

    Args:
        config: a shipped config name (``mask_rcnn_R_50_FPN_1x``) or a YAML path.
        weights: a Detectron2 ``.pkl`` from ``m2t-convert`` (or any Detectron2 checkpoint).
        output_dir: the run directory (default ``output/transfer/<config>/<method>[/seedN]``).
        overrides: ``KEY VALUE`` pairs for the config, e.g. ``["SOLVER.MAX_ITER", "100"]``.
        train_dataset / test_dataset: replace ``DATASETS.TRAIN`` / ``DATASETS.TEST`` by one
            builtin name or annotation-JSON path each.
        dataset_root: where builtin datasets live (default ``$DETECTRON2_DATASETS``).
        train_images / test_images: image folders of datasets given by JSON path.
        method: the label of the pretraining method in reports (default: weights file stem).
        num_gpus: processes per machine; num_machines, machine_rank, dist_url: multi-node.
        resume: continue from the last checkpoint in ``output_dir``.
        unsafe_load: let a weights file that safe loading refuses be unpickled fully (it
            can run code: only for files you trust; warns).
        evaluator: ``"fast"`` (faster-coco-eval) or ``"official"`` (pycocotools / lvis);
            default: the config's ``TRANSFER.EVALUATOR`` (``fast``). The numbers are the same.

    Returns:
        the content of ``results.json`` (``{"bbox": {"AP": ...}, "segm": {...}, "method":
        ..., ...}``); empty on machines other than rank 0.
    """
    job = prepare("train", config, weights, overrides=overrides, train_dataset=train_dataset,
                  test_dataset=test_dataset, dataset_root=dataset_root,
                  train_images=train_images, test_images=test_images, output_dir=output_dir,
                  method=method, world_size=num_gpus * num_machines, resume=resume,
                  unsafe_load=unsafe_load, evaluator=evaluator)
    return _launch(job, num_gpus, num_machines, machine_rank, dist_url)


def run_evaluation(
    config: str,
    weights: str,
    *,
    output_dir: str | None = None,
    overrides: Sequence[str] = (),
    test_dataset: str | None = None,
    dataset_root: str | None = None,
    test_images: str | None = None,
    method: str | None = None,
    num_gpus: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    unsafe_load: bool = False,
    evaluator: str | None = None,
) -> dict[str, Any]:
    """Evaluate trained ``weights`` (e.g. ``model_final.pth``) with ``config``'s test set.

    Same arguments and return value as :func:`run_training`, without the training ones.
    """
    job = prepare("eval", config, weights, overrides=overrides, test_dataset=test_dataset,
                  dataset_root=dataset_root, test_images=test_images, output_dir=output_dir,
                  method=method, world_size=num_gpus * num_machines,
                  unsafe_load=unsafe_load, evaluator=evaluator)
    return _launch(job, num_gpus, num_machines, machine_rank, dist_url)
