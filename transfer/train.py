"""Prepare, launch and finish a fine-tuning or evaluation run with Detectron2.

:func:`run` (and its keyword forms :func:`run_training` and :func:`run_evaluation`) is the
Python API behind ``m2t-transfer train`` / ``eval``, taking one
:class:`~transfer.request.RunRequest`. It checks the input first in the calling process
(config, datasets, weights: see :func:`prepare`), then starts the work through Detectron2's
``launch`` (one process per GPU, several machines with ``--num-machines/--machine-rank/
--dist-url``) on :class:`transfer.trainer.Trainer`, Detectron2's ``DefaultTrainer``: its
hooks give LR schedule, PreciseBN, periodic checkpoints, evaluation after the last
iteration, and the writers (progress line with losses and ETA, ``metrics.json``,
TensorBoard). The main process then writes ``results.json`` and ``report.md`` into the
output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase, default_setup, launch
from detectron2.utils import comm

from .config import config_label, load_config, num_classes_key, resolve_config, set_key
from .datasets import DatasetSpec, register_dataset, resolve_dataset
from .detectron2_build import describe, run_build
from .errors import TransferError, first_line
from .evaluate import read_details
from .report import write_run_results
from .request import RunRequest
from .scoring import EVALUATORS
from .trainer import Trainer, evaluation_folder
from .weights import SafeCheckpointer, check_weights, require_heads

logger = logging.getLogger(__name__)


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



def prepare(request: RunRequest) -> Job:
    """Check all input of a train/eval run and build its final, frozen config.

    ``request.device``: the run's ``MODEL.DEVICE`` when it runs on other machines (a SLURM
    job): set before the SyncBN choice, and not checked against this machine's devices.

    Raises :class:`TransferError` (one line, naming the offending path) on bad input:
    unknown config, bad override, missing dataset root/JSON/images, a JSON not in COCO
    format, weights that do not fit the backbone.
    """
    task, config = request.task, request.config
    config_file = resolve_config(config)
    overrides: Sequence[str] = request.overrides
    if request.device:
        overrides = [*overrides, "MODEL.DEVICE", request.device]
    cfg = load_config(config, overrides, world_size=request.world_size,
                      unsafe_load=request.unsafe_load)
    if request.train_dataset:
        cfg.DATASETS.TRAIN = (request.train_dataset,)
    if request.test_dataset:
        cfg.DATASETS.TEST = (request.test_dataset,)
    if not cfg.DATASETS.TEST:
        raise TransferError(config_file, "DATASETS.TEST is empty: nothing to evaluate on")
    if (not request.device and cfg.MODEL.DEVICE.startswith("cuda")
            and not torch.cuda.is_available()):
        raise TransferError(config_file, "MODEL.DEVICE is cuda but no CUDA device is "
                                         "available; set MODEL.DEVICE cpu")
    if request.evaluator:
        cfg.TRANSFER.EVALUATOR = request.evaluator
    if cfg.TRANSFER.EVALUATOR not in EVALUATORS:
        raise TransferError(config_file, f"TRANSFER.EVALUATOR is {cfg.TRANSFER.EVALUATOR!r}; "
                                         f"choose one of: {', '.join(EVALUATORS)}")

    datasets: dict[str, DatasetSpec] = {}
    train_specs = []
    if task == "train":
        if not cfg.DATASETS.TRAIN:
            raise TransferError(config_file, "DATASETS.TRAIN is empty: nothing to train on")
        train_specs = [resolve_dataset(s, request.dataset_root, request.train_images)
                       for s in cfg.DATASETS.TRAIN]
    test_specs = [resolve_dataset(s, request.dataset_root, request.test_images)
                  for s in cfg.DATASETS.TEST]
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
    for spec in train_specs:
        if spec.num_annotations == 0:  # (else: "no masks, use a box-only config")
            raise TransferError(spec.json_file, "holds no annotations: there is nothing to "
                                                "fine-tune on in it")
    if cfg.MODEL.MASK_ON:
        for spec in train_specs:
            if not spec.has_masks:
                raise TransferError(spec.json_file, "annotations without segmentation masks, but "
                                                    f"{config_file.stem} trains a mask head; use a "
                                                    "box-only config such as fcos_R_50_FPN_1x")
    set_key(cfg, num_classes_key(cfg), reference.num_classes)

    if request.weights is None:
        raise TransferError("--weights", "required (or --methods NAME=WEIGHTS ...)")
    weights_path = Path(request.weights).expanduser()
    if not weights_path.is_file():
        raise TransferError(weights_path, "weights file not found")
    cfg.MODEL.WEIGHTS = str(weights_path.resolve())
    cfg.TRANSFER.METHOD = request.method or cfg.TRANSFER.METHOD or _method_of(weights_path)
    label = cfg.TRANSFER.CONFIG or config_label(config)
    cfg.TRANSFER.CONFIG = label
    seed_part = f"seed{cfg.SEED}" if cfg.SEED >= 0 else ""
    cfg.OUTPUT_DIR = str(Path(request.output_dir) if request.output_dir else
                         Path("output", "transfer", label, cfg.TRANSFER.METHOD, seed_part))
    for spec in datasets.values():  # models may read dataset metadata (federated loss)
        register_dataset(spec)
    check_output_dir(Path(cfg.OUTPUT_DIR), task, request.resume)
    report = check_weights(cfg, cfg.MODEL.WEIGHTS, label, unsafe_load=request.unsafe_load)
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
        "world_size": request.world_size,
        "evaluator": ("pascal_voc" if test_specs[0].kind == "voc"
                      else cfg.TRANSFER.EVALUATOR),
        "output_dir": str(Path(cfg.OUTPUT_DIR).resolve()),
        # which Detectron2 code ran (transfer/detectron2_build.py), also in the run's log
        "detectron2": run_build(),
    }
    return Job(task=task, cfg=cfg, datasets=list(datasets.values()),
               config_file=str(config_file), info=info, resume=request.resume,
               unsafe_load=request.unsafe_load)


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
    logging.getLogger("detectron2.transfer").info("running on %s",
                                                  describe(job.info["detectron2"]))
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


def run(request: RunRequest) -> dict[str, Any]:
    """Prepare the run, start its processes (Detectron2's ``launch``), return its results.

    Returns:
        the content of ``results.json`` (``{"bbox": {"AP": ...}, "segm": {...}, "method":
        ..., ...}``); empty on machines other than rank 0.
    """
    job = prepare(request)
    if request.num_gpus * request.num_machines <= 1 and request.task == "train":
        _train_here(job)  # one process: this one
    elif request.num_gpus * request.num_machines <= 1:
        run_job(job)  # an evaluation in this process
    else:
        _launched(job, request)
    results = Path(job.cfg.OUTPUT_DIR) / "results.json"
    if request.machine_rank != 0 or not results.is_file():
        return {}
    return json.loads(results.read_text())


def _train_here(job: Job) -> None:
    """:func:`run_job` in this process, with SIGTERM (``kill``, a container's stop) ending the
    training at the next iteration's end with a checkpoint saved, as a SLURM job's
    preemption signal does (before the first iteration ends it stops as Ctrl-C does)."""
    import signal

    from jobs.stop import StopRequest, Terminated

    from .stopping import StopHook, TrainingStopped

    stop = StopRequest(signal.SIGTERM).install()
    try:
        run_job(job, hooks=[StopHook(stop)])
    except TrainingStopped as stopped:
        raise Terminated(_stopped_message(job, stopped.args[0])) from None
    finally:
        stop.uninstall()


def _stopped_message(job: Job, iteration: int | str) -> str:
    out = Path(job.cfg.OUTPUT_DIR)
    last = (out / "last_checkpoint").read_text().strip()
    return (f"terminated (SIGTERM): stopped after iteration {iteration} of "
            f"{job.cfg.SOLVER.MAX_ITER}, {out / last} saved; --resume continues")


def _stoppable_worker(job: Job) -> None:
    """:func:`run_job` in a worker of Detectron2's ``launch``: SIGTERM (passed on by the
    launching process) stops every rank after the same iteration, with it saved (the ranks
    agree after each iteration, as a SLURM job's do); before the first iteration ends it
    stops the worker as Ctrl-C does."""
    import signal

    from jobs.stop import StopRequest, terminate_as_interrupt

    from .stopping import StopHook, TrainingStopped

    terminate_as_interrupt()  # what StopRequest calls outside the training loop
    term = StopRequest(signal.SIGTERM).install()
    term.attach(comm.get_world_size())
    try:
        run_job(job, hooks=[StopHook(term)])
    except TrainingStopped as stopped:
        if comm.is_main_process():  # for the launching process's message
            from jobs.atomic import write_text

            write_text(Path(job.cfg.OUTPUT_DIR) / _STOPPED, str(stopped.args[0]))
    finally:
        term.uninstall()


#: What rank 0 of a launched training leaves in the output folder when SIGTERM stopped it:
#: the last iteration trained. Read and removed by the launching process.
_STOPPED = ".stopped_by_sigterm"


def _launched(job: Job, request: RunRequest) -> None:
    """Train (or evaluate) in the worker processes Detectron2's ``launch`` starts, SIGTERM to
    this process passed on to them: a training stops at an iteration's end with it saved, as
    :func:`_train_here` does in one process (``Terminated`` with its message; exit 143);
    outside the training loop, and in an evaluation, the workers stop as on Ctrl-C."""
    import signal

    from jobs.stop import ForwardToWorkers, Terminated

    # rank 0 writes the marker, so machine 0's launcher reads it (the other machines', on a
    # shared output folder, leave it alone and stop on the signal they got, if any)
    marker = Path(job.cfg.OUTPUT_DIR) / _STOPPED if request.machine_rank == 0 else None
    if marker is not None:
        marker.unlink(missing_ok=True)
    forward = ForwardToWorkers(signal.SIGTERM).install()
    try:
        launch(_stoppable_worker if job.task == "train" else run_job, request.num_gpus,
               num_machines=request.num_machines, machine_rank=request.machine_rank,
               dist_url=request.dist_url, args=(job,))
    except Exception:  # a worker died of the signal (outside the training loop)
        if forward.got:
            raise Terminated() from None
        raise
    finally:
        forward.uninstall()
    if marker is not None and marker.is_file():
        iteration = marker.read_text().strip()
        marker.unlink()
        raise Terminated(_stopped_message(job, iteration))
    if forward.got:  # torch's spawn ends a worker stopped as on Ctrl-C with status 0
        raise Terminated()


def run_training(config: str, weights: str, **options: Any) -> dict[str, Any]:
    """Fine-tune ``config`` from ``weights``, evaluate, and return the run's results.

    ``options``: the other fields of :class:`~transfer.request.RunRequest` by keyword
    (``output_dir``, ``overrides``, ``train_dataset``, ``num_gpus``, ``resume``, ...).
    Returns what :func:`run` returns.
    """
    return run(RunRequest("train", config, weights, **options))


def run_evaluation(config: str, weights: str, **options: Any) -> dict[str, Any]:
    """Evaluate trained ``weights`` (e.g. ``model_final.pth``) with ``config``'s test set.

    Same as :func:`run_training`, without the training options.
    """
    return run(RunRequest("eval", config, weights, **options))
