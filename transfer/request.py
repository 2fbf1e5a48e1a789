"""What a ``train`` or ``eval`` run was asked to do: one frozen :class:`RunRequest`.

The command line is read into a request once (:func:`request_from_args`, which also checks
the process-count options), and the request is what preparation
(:func:`transfer.train.prepare`), training and evaluation (:func:`transfer.train.run`), a
SLURM submission (:func:`transfer.slurm.submit_training`) and a sweep
(:func:`transfer.sweep.run_sweep`, one request per cell derived with
:func:`dataclasses.replace`) receive. A new run option is a new field here.

This module imports nothing heavy: the command line is read without torch or Detectron2.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import TransferError

#: A config override key (``SOLVER.MAX_ITER``, ``SEED``): where ``--seeds``/``--methods``
#: values end and the ``KEY VALUE`` overrides begin.
OVERRIDE_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")
TASKS = ("train", "eval")
#: Fields that only a training run has.
TRAIN_ONLY = ("train_dataset", "train_images", "resume", "seeds", "methods")


@dataclass(frozen=True)
class RunRequest:
    """One fine-tuning (``task="train"``, then evaluation) or evaluation (``"eval"``).

    Attributes:
        config: a shipped config name (``mask_rcnn_R_50_FPN_1x``) or a YAML path.
        weights: a Detectron2 ``.pkl`` from ``m2t-convert`` (or any Detectron2 checkpoint;
            ``model_final.pth`` of a run to evaluate). None only in a sweep's request
            with ``methods``, which name each cell's weights.
        overrides: ``KEY VALUE`` pairs for the config, e.g. ``("SOLVER.MAX_ITER", "100")``.
        output_dir: the run directory (default ``output/transfer/<config>/<method>[/seedN]``).
        train_dataset / test_dataset: replace ``DATASETS.TRAIN`` / ``DATASETS.TEST`` by one
            builtin name or annotation-JSON path each.
        train_images / test_images: image folders of datasets given by JSON path.
        dataset_root: where builtin datasets live (default ``$DETECTRON2_DATASETS``).
        method: the label of the pretraining method in reports (default: weights file stem).
        num_gpus: processes per machine; num_machines, machine_rank, dist_url: multi-node.
        resume: continue from the last checkpoint in ``output_dir``.
        unsafe_load: let a weights file (or config) that safe loading refuses be loaded
            fully (it can run code: only for files you trust; warns).
        evaluator: ``"fast"`` (faster-coco-eval) or ``"official"`` (pycocotools / lvis);
            default: the config's ``TRANSFER.EVALUATOR`` (``fast``). The numbers are the same.
        device: the run's ``MODEL.DEVICE`` when it runs on other machines (a SLURM job):
            set before the SyncBN choice, and not checked against this machine's devices.
        seeds / methods: a sweep (``--seeds N ...``, ``--methods NAME=WEIGHTS ...``), as
            given; checked by :func:`transfer.sweep.plan`. None: a single run.
    """

    task: str
    config: str
    weights: str | None = None
    overrides: tuple[str, ...] = ()
    output_dir: str | None = None
    train_dataset: str | None = None
    train_images: str | None = None
    test_dataset: str | None = None
    test_images: str | None = None
    dataset_root: str | None = None
    method: str | None = None
    num_gpus: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    resume: bool = False
    unsafe_load: bool = False
    evaluator: str | None = None
    device: str | None = None
    seeds: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "eval":
            given = [name for name in TRAIN_ONLY if getattr(self, name) not in (None, False)]
            if given:
                raise ValueError(f"an eval request takes no {', '.join(given)} (training only)")
        # sequences given as lists (the Python API, argparse) are kept as tuples: frozen
        for name in ("overrides", "seeds", "methods"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def world_size(self) -> int:
        """All processes of the run."""
        return self.num_gpus * self.num_machines

    @property
    def is_sweep(self) -> bool:
        """``--seeds`` or ``--methods``: several runs, see :mod:`transfer.sweep`."""
        return self.seeds is not None or self.methods is not None

    def for_job(self, nodes: int, tasks_per_node: int, device: str) -> RunRequest:
        """This run as a job runs it on other machines: their processes and device."""
        return replace(self, num_machines=nodes, num_gpus=tasks_per_node, device=device)


def split_overrides(values: Sequence[str] | None) -> tuple[tuple[str, ...] | None,
                                                          tuple[str, ...]]:
    """``--seeds 0 1 SOLVER.MAX_ITER 10``: argparse gives ``--seeds`` everything; the values
    from the first config key on are overrides. Returns (the option's values, overrides)."""
    if values is None:
        return None, ()
    for i, value in enumerate(values):
        if OVERRIDE_KEY.match(value):
            return tuple(values[:i]), tuple(values[i:])
    return tuple(values), ()


def check_launch(num_gpus: int, num_machines: int, machine_rank: int) -> None:
    """The process-count options, before anything starts."""
    if num_gpus < 1:
        raise TransferError("--num-gpus", f"must be >= 1 (processes per machine), got "
                                          f"{num_gpus}")
    if num_machines < 1:
        raise TransferError("--num-machines", f"must be >= 1, got {num_machines}")
    if not 0 <= machine_rank < num_machines:
        raise TransferError("--machine-rank", f"must be between 0 and --num-machines - 1 = "
                                              f"{num_machines - 1}, got {machine_rank}")


def request_from_args(args: argparse.Namespace) -> RunRequest:
    """The request of parsed ``train``/``eval`` arguments, checked (TransferError, one line).

    The job options of ``--slurm`` are not part of it (:func:`transfer.slurm.check_job_options`
    reads them; a job's request is :meth:`RunRequest.for_job`)."""
    train = args.command == "train"
    sweep: dict[str, tuple[str, ...] | None] = {}
    overrides = tuple(args.opts)
    if train:
        for name in ("methods", "seeds"):  # each puts its overrides in front
            sweep[name], extra = split_overrides(getattr(args, name))
            overrides = (*extra, *overrides)
    request = RunRequest(
        task=args.command, config=args.config, weights=args.weights, overrides=overrides,
        output_dir=args.output_dir, test_dataset=args.test_dataset,
        test_images=args.test_images, dataset_root=args.dataset_root, method=args.method,
        num_gpus=args.num_gpus, num_machines=args.num_machines,
        machine_rank=args.machine_rank, dist_url=args.dist_url, unsafe_load=args.unsafe_load,
        evaluator=args.evaluator,
        **(dict(train_dataset=args.train_dataset, train_images=args.train_images,
                resume=args.resume, **sweep) if train else {}))
    if train and not request.is_sweep and request.weights is None:
        raise TransferError("--weights", "required (or --methods NAME=WEIGHTS ...)")
    check_launch(request.num_gpus, request.num_machines, request.machine_rank)
    return request
