"""The ``--slurm`` options of ``m2t-pretrain train`` and ``m2t-transfer train``, defined once.

:func:`add_job_options` puts the flags on a parser; :func:`given_options` reads them back
(None: not given); :func:`check_job_options` checks them, one error line each, into a
:class:`JobOptions`. Nothing here imports submitit or torch (until a local GPU job is
checked): ``--help`` stays fast.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import JobError
from .ranges import Range, check_range

DEFAULT_TIME_MIN = 24 * 60
#: The job options, as flags, and their attribute names on the parsed arguments.
FLAGS = {"--cluster": "cluster", "--nodes": "nodes", "--gpus-per-node": "gpus_per_node",
         "--tasks-per-node": "tasks_per_node", "--cpus-per-task": "cpus_per_task",
         "--mem-gb": "mem_gb", "--time": "time", "--partition": "partition",
         "--account": "account", "--qos": "qos", "--constraint": "constraint"}
#: What the local executor has no use for.
SLURM_ONLY = ("--partition", "--account", "--qos", "--constraint", "--cpus-per-task", "--mem-gb")


@dataclass(frozen=True)
class JobOptions:
    """What the job asks for, checked."""

    cluster: str
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    time: int
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    wait: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def device(self) -> str:
        """Where the job's ranks compute: ``cuda`` with GPUs, ``cpu`` without."""
        return "cuda" if self.gpus_per_node else "cpu"

    def describe(self) -> str:
        where = "slurm" if self.cluster == "slurm" else "the local executor"
        per_node = (f"{self.tasks_per_node} task(s) with {self.gpus_per_node} GPU(s)"
                    if self.gpus_per_node else f"{self.tasks_per_node} CPU task(s)")
        return f"{where}: {self.nodes} node(s) × {per_node}, time limit {self.time} min"


def add_job_options(parser: Any, what: str = "the run") -> None:
    """The ``--slurm`` flags, in their own group of ``parser``; ``what`` the job runs."""
    j = parser.add_argument_group(
        "SLURM", f"submit {what} as a job (submitit) instead of running it here; one task "
                 f"(rank) per GPU; requeued with a checkpoint before a time limit or preemption")
    j.add_argument("--slurm", action="store_true", help="submit; print the job id and return")
    j.add_argument("--cluster", choices=("slurm", "local"),
                   help="slurm (default: sbatch) or local (submitit's local executor: the "
                        "tasks as processes on this machine, e.g. a dry run)")
    j.add_argument("--nodes", type=int, metavar="N", help="default 1")
    j.add_argument("--gpus-per-node", type=int, metavar="N",
                   help="default 8; 0: a CPU job (gloo)")
    j.add_argument("--tasks-per-node", type=int, metavar="N",
                   help="default: one per GPU (1 for a CPU job)")
    j.add_argument("--cpus-per-task", type=int, metavar="N")
    j.add_argument("--mem-gb", type=float, metavar="GB", help="memory per node")
    j.add_argument("--time", type=int, metavar="MINUTES",
                   help=f"the job's time limit (default {DEFAULT_TIME_MIN}); the run goes on in "
                        f"a requeued job")
    j.add_argument("--partition")
    j.add_argument("--account")
    j.add_argument("--qos")
    j.add_argument("--constraint")
    j.add_argument("--wait", action="store_true",
                   help="wait for the job (and its requeues) to end and print the result")


def given_options(args: Any) -> dict[str, Any]:
    """The job options of parsed arguments as given (None: not given), by their flag."""
    given = {flag: getattr(args, attr) for flag, attr in FLAGS.items()}
    given["--wait"] = True if args.wait else None
    return given


def check_job_options(slurm: bool, given: Mapping[str, Any],
                      what: str = "the run") -> JobOptions | None:
    """The job options (``given``: by flag, None when not given), checked in one line each;
    None without ``--slurm`` (and then no job option may be given)."""
    named = [flag for flag, value in given.items() if value is not None]
    if not slurm:
        if named:
            raise JobError(", ".join(named), f"only with --slurm (which submits {what} as a "
                                             f"job instead of running it here)")
        return None
    cluster = given["--cluster"] or "slurm"
    nodes = _default(given["--nodes"], 1)
    gpus = _default(given["--gpus-per-node"], 8)
    time = _default(given["--time"], DEFAULT_TIME_MIN)
    check_range("--nodes", nodes, Range(low=1))
    check_range("--gpus-per-node", gpus, Range(low=0, why="0: a CPU job"))
    check_range("--time", time, Range(low=1, why="minutes"))
    tasks = _default(given["--tasks-per-node"], gpus or 1)
    check_range("--tasks-per-node", tasks, Range(low=1))
    check_range("--cpus-per-task", given["--cpus-per-task"], Range(low=1))
    check_range("--mem-gb", given["--mem-gb"], Range(low=0.0, low_open=True))
    if gpus and tasks != gpus:
        _refuse("--tasks-per-node", f"{tasks} with --gpus-per-node {gpus}: one task per GPU "
                                    f"(leave --tasks-per-node out, or ask for {tasks} GPU(s))")
    if cluster == "local":
        if nodes != 1:
            _refuse("--nodes", f"{nodes} with --cluster local: the local executor runs on this "
                               f"machine only (--nodes 1)")
        if gpus:
            import torch

            have = torch.cuda.device_count()
            if gpus > have:
                _refuse("--gpus-per-node", f"{gpus} with --cluster local but this machine has "
                                           f"{have} CUDA device(s) (--gpus-per-node 0: a CPU "
                                           f"job)")
        ignored = [flag for flag in SLURM_ONLY if given[flag] is not None]
        if ignored:
            print(f"note: --cluster local ignores {', '.join(ignored)} (SLURM requests)")
    elif shutil.which("sbatch") is None:
        _refuse("sbatch", "not found: SLURM is not installed here (or not on PATH); submit "
                          "from a SLURM login node, or try the job here with --cluster local")
    return JobOptions(cluster, nodes, gpus, tasks, time, given["--cpus-per-task"],
                      given["--mem-gb"], given["--partition"], given["--account"], given["--qos"],
                      given["--constraint"], bool(given.get("--wait")))


def _refuse(flag: str, detail: str) -> None:
    """``FLAG VALUE with ...``: the sentence names the flag, then what is wrong with it."""
    raise JobError(flag, detail, text=f"{flag} {detail}")


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
