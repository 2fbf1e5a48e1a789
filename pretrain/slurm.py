"""``m2t-pretrain train --slurm``: the run as a submitit job, one task (one rank) per GPU.

The command checks the options and the run directory, resolves the config and submits; it
prints the job id, the job folder (``RUN/slurm/``) and how to follow the log, and returns (or,
with ``--wait``, waits for the job and its requeues and prints the result).

In the job, each task exports the environment torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT: ``submitit.helpers.TorchDistributedEnvironment``), so
the Trainer joins its process group as under torchrun (NCCL on GPUs, gloo on CPUs).

Time limit and preemption: SLURM (or the local executor) sends SIGUSR2 ``signal_delay_s``
ahead. Each rank notes it; after every step the ranks agree (one all-reduce of a flag), stop
at the same step, and rank 0 saves last.pth; then submitit's own handler calls ``checkpoint()``
and requeues the job, which resumes from last.pth. A run resumes bit for bit, so a chain of
jobs ends with the weights of one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedSubmissionError, UncompletedJobError

from .config import Config, Range, apply_overrides, check_range
from .errors import UserError
from .hooks import HookBase

DEFAULT_TIME_MIN = 24 * 60
SIGNAL_DELAY_S = {"slurm": 120, "local": 30}  # how long before the limit the signal comes
MAX_TIMEOUTS = 100  # time limits met before submitit gives up requeuing (preemptions: no limit)
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

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        where = "slurm" if self.cluster == "slurm" else "the local executor"
        per_node = (f"{self.tasks_per_node} task(s) with {self.gpus_per_node} GPU(s)"
                    if self.gpus_per_node else f"{self.tasks_per_node} CPU task(s)")
        return f"{where}: {self.nodes} node(s) × {per_node}, time limit {self.time} min"


def check_job_options(slurm: bool, given: dict[str, Any]) -> JobOptions:
    """The job options (``given``: by flag, None when not given), checked in one line each."""
    named = [flag for flag, value in given.items() if value is not None]
    if not slurm:
        raise UserError(f"{', '.join(named)}: only with --slurm (which submits the run as a "
                        f"job instead of running it here)")
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
        raise UserError(f"--tasks-per-node {tasks} with --gpus-per-node {gpus}: one task per "
                        f"GPU (leave --tasks-per-node out, or ask for {tasks} GPU(s))")
    if cluster == "local":
        if nodes != 1:
            raise UserError(f"--nodes {nodes} with --cluster local: the local executor runs "
                            f"on this machine only (--nodes 1)")
        if gpus:
            import torch

            have = torch.cuda.device_count()
            if gpus > have:
                raise UserError(f"--gpus-per-node {gpus} with --cluster local but this machine "
                                f"has {have} CUDA device(s) (--gpus-per-node 0: a CPU job)")
        ignored = [flag for flag in SLURM_ONLY if given[flag] is not None]
        if ignored:
            print(f"note: --cluster local ignores {', '.join(ignored)} (SLURM requests)")
    elif shutil.which("sbatch") is None:
        raise UserError("sbatch not found: SLURM is not installed here (or not on PATH); "
                        "submit from a SLURM login node, or try the job here with --cluster local")
    return JobOptions(cluster, nodes, gpus, tasks, time, given["--cpus-per-task"],
                      given["--mem-gb"], given["--partition"], given["--account"], given["--qos"],
                      given["--constraint"])


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def job_device(configured: str, gpus_per_node: int) -> str:
    """``train.device`` for the job: the GPUs it asked for, or the CPU when it asked for none."""
    if gpus_per_node == 0:
        if configured == "cuda":
            raise UserError("train.device=cuda but --gpus-per-node 0: ask for GPUs, or "
                            "train.device=cpu")
        return "cpu"
    if configured == "cpu":
        raise UserError(f"train.device=cpu with --gpus-per-node {gpus_per_node}: the GPUs "
                        f"would sit idle (--gpus-per-node 0: a CPU job)")
    return "cuda"


# ----- in the job -------------------------------------------------------------------------
@dataclass
class JobSpec:
    """A run as the job starts it: the config resolved at submission (used while there is no
    last.pth) and the overrides put on the saved config when it resumes."""

    config: Config
    overrides: list[str]
    data: str
    out: str
    val: str | None = None
    stop_after: int = 0
    profile: int = 0


class StopRequest(HookBase):
    """A stop asked for by a signal, on any rank; the ranks agree on it after each step.

    The handler only sets a flag (nothing else is safe in a signal handler); as the trainer's
    last hook, ``after_step`` all-reduces it (``check``) so that every rank stops after the
    same step. The handler it replaces (submitit's) is kept: ``requeue`` calls it once
    last.pth is saved.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.asked = False
        self.agreed = False
        self.previous: Any = None
        self._world_size = 1
        self._group: Any = None

    def install(self) -> StopRequest:
        self.previous = signal.signal(self.signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.asked = True

    def attach(self, trainer: Any) -> None:
        """Check after each of ``trainer``'s steps; collectives on a gloo group (on the CPU:
        no GPU synchronisation per step)."""
        import torch.distributed as dist

        self._world_size = trainer.dist.world_size
        if self._world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        trainer.register_hooks([self])

    def after_step(self) -> None:
        if self.check():
            self.trainer.request_stop()

    def check(self) -> bool:
        if self._world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(self.asked)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            self.agreed = bool(flag.item())
        else:
            self.agreed = self.asked
        return self.agreed

    def requeue(self) -> None:
        """submitit's handler: on rank 0 it calls ``checkpoint()``, requeues the job and exits;
        the other ranks leave without a result (the requeued job runs them again)."""
        if callable(self.previous):
            self.previous(self.signum, None)
            raise SystemExit(0)


class PretrainJob(submitit.helpers.Checkpointable):
    """The job's callable, one call per task. ``checkpoint()`` (Checkpointable's) submits it
    again as it is: with last.pth in the run directory, it resumes from there."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        # SIGUSR2, or what SUBMITIT_PREEMPT_SIGNAL names
        stop = StopRequest(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)).install()
        # torchrun's variables; each task keeps every GPU of the node and takes LOCAL_RANK's
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
        try:
            return self._run(stop)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise

    def _run(self, stop: StopRequest) -> dict[str, Any]:
        import torch.distributed as dist

        from .train import Trainer, resume_config

        spec = self.spec
        resume = (Path(spec.out) / "last.pth").exists()
        cfg = resume_config(spec.out, spec.overrides) if resume else spec.config
        trainer = Trainer(cfg, spec.data, spec.out, val=spec.val, resume=resume,
                          stop_after=spec.stop_after, profile_steps=spec.profile)
        stop.attach(trainer)
        if trainer.dist.main:
            print("resolved config:\n" + cfg.dump(), flush=True)
        start = trainer.step
        last = trainer.run()
        result = {"rank": trainer.dist.rank, "start_step": start, "step": trainer.step,
                  "total_steps": trainer.total_steps, "checkpoint": str(last)}
        if dist.is_initialized():
            dist.destroy_process_group()
        if stop.agreed and trainer.step < trainer.total_steps:
            if trainer.dist.main:
                print(f"{signal.Signals(stop.signum).name} (time limit or preemption): stopped "
                      f"at step {trainer.step}/{trainer.total_steps}, {last} saved; requeuing",
                      flush=True)
            stop.requeue()
            return {**result, "stopped": True}  # not under submitit: nothing requeues
        if trainer.dist.main:
            print(f"checkpoint: {last}", flush=True)
        return result


# ----- at submission ----------------------------------------------------------------------
def make_executor(opts: JobOptions, folder: Path, name: str) -> submitit.core.core.Executor:
    if opts.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(nodes=1, tasks_per_node=opts.tasks_per_node,
                                   gpus_per_node=opts.gpus_per_node, timeout_min=opts.time,
                                   signal_delay_s=SIGNAL_DELAY_S["local"])
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as exc:  # no srun
        raise UserError(f"{exc} (sbatch is there, srun is not)") from None
    params: dict[str, Any] = {
        "job_name": name, "time": opts.time, "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks_per_node, "signal_delay_s": SIGNAL_DELAY_S["slurm"],
        # a rank that fails ends the others (as torchrun does), not a wait in a collective
        "srun_args": ["--kill-on-bad-exit=1"]}
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb is not None:
        params["mem"] = (f"{int(opts.mem_gb)}GB" if opts.mem_gb == int(opts.mem_gb)
                         else f"{int(opts.mem_gb * 1024)}MB")
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if getattr(opts, key) is not None:
            params[key] = getattr(opts, key)
    executor.update_parameters(**params)
    return executor


def submit(opts: JobOptions, cfg: Config, overrides: list[str], resume: bool, *, data: str,
           out: str, val: str | None, stop_after: int, profile: int, wait: bool) -> int:
    """Submit the run; print the job id, its folder and how to follow it (and wait)."""
    from .rundir import check_fresh, check_out

    device = job_device(cfg.train.device, opts.gpus_per_node)
    if cfg.train.device != device:
        overrides = [*overrides, f"train.device={device}"]
        cfg = apply_overrides(cfg, [f"train.device={device}"])
    run = Path(os.path.abspath(out))
    check_out(run, data, val)
    if not resume:  # refused now, not in the job's log
        check_fresh(run, cfg.dump())
    spec = JobSpec(cfg, overrides, os.path.abspath(data), str(run),
                   os.path.abspath(val) if val else None, stop_after, profile)
    folder = run / "slurm"
    try:
        executor = make_executor(opts, folder, f"m2t-pretrain-{run.name}")
        # clean_env: no SLURM_*/RANK/... of a job we may be inside; sbatch's complaint is
        # printed by submitit too: it comes once, in the error line
        with submitit.helpers.clean_env(), contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(PretrainJob(spec))
    except (UncompletedJobError, FailedSubmissionError) as exc:  # sbatch said no
        raise UserError(f"sbatch refused the job: {_first_line(str(exc))}") from None
    except ValueError as exc:  # a parameter submitit refuses
        raise UserError(f"cannot submit the job: {_first_line(str(exc))}") from None
    log = job.task(0).paths.stdout if job.num_tasks > 1 else job.paths.stdout
    cancel = f"scancel {job.job_id}" if opts.cluster == "slurm" else f"kill -INT {job.job_id}"
    print(f"submitted job {job.job_id} to {opts.describe()}", flush=True)
    print(f"job folder: {folder}")
    print(f"follow the log: tail -f {log}")
    print(f"cancel: {cancel}", flush=True)
    if not wait:
        return 0
    return wait_for(job, opts, log)


def wait_for(job: Any, opts: JobOptions, log: Path) -> int:
    ctrl_c = "stops waiting, not the job" if opts.cluster == "slurm" else "stops the job too"
    print(f"waiting for job {job.job_id} and its requeues (Ctrl-C {ctrl_c})", flush=True)
    try:
        results = job.results()
    except KeyboardInterrupt:
        print(f"stopped waiting for job {job.job_id}", file=sys.stderr)
        return 130
    except UncompletedJobError as exc:
        raise UserError(f"job {job.job_id} failed: {_reason(str(exc))} "
                        f"(log: {log.with_suffix('.err')})") from None
    r = results[0]
    resumed = f", this attempt resumed at step {r['start_step']}" if r["start_step"] else ""
    if r["step"] < r["total_steps"]:
        print(f"job {job.job_id} ended at step {r['step']}/{r['total_steps']} (--stop-after)"
              f"{resumed}; continue with --resume: {r['checkpoint']}")
    else:
        print(f"job {job.job_id} finished: step {r['step']}/{r['total_steps']}{resumed}; "
              f"checkpoint: {r['checkpoint']}")
    return 0


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def _reason(text: str) -> str:
    """The exception line of a job's traceback (``pkg.mod.Error: message`` → ``message``)."""
    lines = [line.strip() for line in text.splitlines()]
    for line in reversed(lines):
        m = re.match(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\w*: (.+)$", line)
        if m:
            return m.group(1)
    return _first_line(text)
