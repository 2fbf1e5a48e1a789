"""``m2t-pretrain train --slurm``: the run as a submitit job, one task (one rank) per GPU.

The command checks the options and the run directory, resolves the config and submits; it
prints the job id, the job folder (``RUN/slurm/``) and how to follow the log, and returns (or,
with ``--wait``, waits for the job and its requeues and prints the result).

In the job, each task exports the environment torchrun would give it (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT: ``submitit.helpers.TorchDistributedEnvironment``), so
the Trainer joins its process group as under torchrun (NCCL on GPUs, gloo on CPUs).

Time limit and preemption (:mod:`jobs.stop`): SLURM (or the local executor) sends SIGUSR2
``signal_delay_s`` ahead. Each rank notes it; after every step the ranks agree (one all-reduce
of a flag), stop at the same step, and rank 0 saves last.pth; then submitit's own handler
calls ``checkpoint()`` and requeues the job, which resumes from last.pth. A run resumes bit for
bit, so a chain of jobs ends with the weights of one uninterrupted run. A rank that fails ends
the others (``srun --kill-on-bad-exit=1``: :mod:`jobs.executor`).

The options, the executor, the stop and the lines a user reads are :mod:`jobs`'s, shared with
``m2t-transfer train --slurm``; here is what is the pretraining's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from jobs import JobError
from jobs import executor as jobs_executor
from jobs import options as jobs_options
from jobs.options import JobOptions
from jobs.stop import StopRequest, preemption_signal

from .config import Config, apply_overrides
from .errors import UserError
from .hooks import StopHook

__all__ = ["JobOptions", "JobSpec", "PretrainJob", "StopHook", "StopRequest",
           "check_job_options", "job_device", "make_executor", "submit", "wait_for"]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The job plumbing's errors as the pretraining words them: one ``UserError`` line."""
    try:
        yield
    except JobError as exc:
        raise UserError(str(exc)) from None


def check_job_options(slurm: bool, given: Mapping[str, Any]) -> JobOptions:
    """The job options (``given``: by flag, None when not given), checked in one line each."""
    with user_errors():
        opts = jobs_options.check_job_options(slurm, given, "the run")
    assert opts is not None  # asked for when --slurm or a job option is given
    return opts


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


def attach(stop: StopRequest, trainer: Any) -> None:
    """Check ``stop`` after each of ``trainer``'s steps."""
    stop.attach(trainer.dist.world_size)
    trainer.register_hooks([StopHook(stop)])


class PretrainJob(submitit.helpers.Checkpointable):
    """The job's callable, one call per task. ``checkpoint()`` (Checkpointable's) submits it
    again as it is: with last.pth in the run directory, it resumes from there."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        # the whole run is the loop: a signal before the first step stops after it
        stop = StopRequest(preemption_signal(), in_loop=True).install()
        # SIGTERM (scancel, a preemption without --signal; submitit only logs it): stop at the
        # next step boundary with last.pth saved, and end the job with an error, no requeue
        term = StopRequest(signal.SIGTERM, in_loop=True).install()
        # torchrun's variables; each task keeps every GPU of the node and takes LOCAL_RANK's
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
        try:
            return self._run(stop, term)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise

    def _run(self, stop: StopRequest, term: StopRequest | None = None) -> dict[str, Any]:
        import torch.distributed as dist

        from .checkpoint import load_resume
        from .train import Trainer

        spec = self.spec
        resume = (Path(spec.out) / "last.pth").exists()
        cfg, ckpt = load_resume(spec.out, spec.overrides) if resume else (spec.config, None)
        trainer = Trainer(cfg, spec.data, spec.out, val=spec.val, resume=ckpt,
                          stop_after=spec.stop_after, profile_steps=spec.profile)
        attach(stop, trainer)
        if term is not None:
            attach(term, trainer)
        if trainer.dist.main:
            print("resolved config:\n" + cfg.dump(), flush=True)
        start = trainer.step
        last = trainer.run()
        result = {"rank": trainer.dist.rank, "start_step": start, "step": trainer.step,
                  "total_steps": trainer.total_steps, "checkpoint": str(last)}
        if dist.is_initialized():
            dist.destroy_process_group()
        if term is not None and term.agreed and trainer.step < trainer.total_steps:
            raise UserError(f"terminated (SIGTERM): stopped at step {trainer.step}/"
                            f"{trainer.total_steps}, {last} saved; --resume continues")
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
def make_executor(opts: JobOptions, folder: Path, name: str) -> Any:
    """:func:`jobs.executor.make_executor`, its errors a ``UserError``."""
    with user_errors():
        return jobs_executor.make_executor(opts, folder, name)


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
    with user_errors():
        (job,) = jobs_executor.submit(opts, [PretrainJob(spec)], folder,
                                      f"m2t-pretrain-{run.name}")
    jobs_executor.announce(job, opts, folder)
    if not wait:
        return 0
    return wait_for(job, opts)


def wait_for(job: Any, opts: JobOptions) -> int:
    """Wait for the job and its requeues; print where the run ended (130: Ctrl-C)."""
    with user_errors():
        r = jobs_executor.wait_for(job, opts)
    if r is None:
        return 130
    resumed = f", this attempt resumed at step {r['start_step']}" if r["start_step"] else ""
    if r["step"] < r["total_steps"]:
        print(f"job {job.job_id} ended at step {r['step']}/{r['total_steps']} (--stop-after)"
              f"{resumed}; continue with --resume: {r['checkpoint']}")
    else:
        print(f"job {job.job_id} finished: step {r['step']}/{r['total_steps']}{resumed}; "
              f"checkpoint: {r['checkpoint']}")
    return 0
