"""``m2t-transfer train --slurm``: a fine-tuning as a submitit job, one task (one rank) per GPU.

The command checks the options, then the run as ``train`` does (config, datasets, weights,
output directory: :func:`transfer.train.prepare`, for the job's device and world size), and
submits; it prints the job id, the job folder (``OUTPUT_DIR/slurm/``) and how to follow the
log, and returns (with ``--wait``: waits for the job and its requeues, prints the metrics).

In the job each task is one rank: ``submitit.helpers.TorchDistributedEnvironment`` gives its
rank, the world size and the master's address; the task joins the process group (NCCL on
GPUs, gloo on CPUs) and Detectron2's local process group as Detectron2's ``launch`` would
have, without spawning, and runs :func:`transfer.train.run_job`.

Time limit and preemption: SLURM (or the local executor) sends SIGUSR2 ``signal_delay_s``
ahead. During the training loop each rank notes it; after every iteration the ranks agree
(one all-reduce of a flag), stop after the same iteration, and rank 0 saves Detectron2's
checkpoint (``model_XXXXXXX.pth`` and ``last_checkpoint``); then submitit's own handler calls
:meth:`TrainingJob.checkpoint`, which submits the job again with ``--resume``. Outside the
loop (setting up, the first iteration of a session, the final evaluation) nothing new is
unsaved: the job is requeued at once. A resumed run goes on as if uninterrupted (see
:class:`transfer.trainer.Trainer`), so a chain of jobs ends with one uninterrupted run's weights.
A rank that fails ends the others (``srun --kill-on-bad-exit=1``).

The options, the executor, the stop agreement and the lines a user reads are :mod:`jobs`'s,
shared with ``m2t-pretrain train --slurm``; here is what is the fine-tuning's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import submitit

from jobs import JobError
from jobs import executor as jobs_executor
from jobs import options as jobs_options
from jobs.executor import announce, announce_array, log_of
from jobs.options import JobOptions
from jobs.stop import StopRequest

from .errors import TransferError
from .stopping import StopHook, TrainingStopped

__all__ = ["JobOptions", "StopHook", "StopRequest", "TrainingJob", "TrainingStopped",
           "add_job_options", "announce", "announce_array", "check_job_options", "for_the_job",
           "job_device", "log_of", "make_executor", "results_of", "submit_jobs",
           "submit_training", "wait_result"]


@contextlib.contextmanager
def transfer_errors() -> Iterator[None]:
    """The job plumbing's errors as the transfer stage words them: ``<what>: <wrong>``."""
    try:
        yield
    except JobError as exc:
        raise TransferError(exc.subject, exc.detail) from None


def add_job_options(parser: Any) -> None:
    """The ``--slurm`` options of ``m2t-transfer train`` (:func:`jobs.options.add_job_options`)."""
    jobs_options.add_job_options(parser, "the fine-tuning")


def check_job_options(args: Any) -> JobOptions | None:
    """The job options of parsed ``train`` arguments, checked (one line each); None when
    ``--slurm`` is not given (and then no job option may be)."""
    given = jobs_options.given_options(args)
    if not args.slurm:
        with transfer_errors():
            return jobs_options.check_job_options(False, given, "the fine-tuning")
    for flag, attr, default in (("--num-gpus", "num_gpus", 1), ("--num-machines",
                                                                "num_machines", 1),
                                ("--machine-rank", "machine_rank", 0),
                                ("--dist-url", "dist_url", "auto")):
        if getattr(args, attr) != default:
            raise TransferError(flag, "not with --slurm: the job starts one task per GPU "
                                      "(--nodes, --gpus-per-node, --tasks-per-node)")
    with transfer_errors():
        return jobs_options.check_job_options(True, given, "the fine-tuning")


def job_device(overrides: Sequence[str], opts: JobOptions) -> str:
    """``MODEL.DEVICE`` of the job: the GPUs it asked for, or the CPU when it asked for none
    (a ``MODEL.DEVICE`` override that contradicts ``--gpus-per-node`` is refused)."""
    pairs = dict(zip(overrides[::2], overrides[1::2], strict=False))
    configured = pairs.get("MODEL.DEVICE")
    if configured is not None:
        if opts.gpus_per_node == 0 and configured.startswith("cuda"):
            raise TransferError("MODEL.DEVICE", f"{configured} but --gpus-per-node 0: ask for "
                                                f"GPUs, or MODEL.DEVICE cpu")
        if opts.gpus_per_node and configured == "cpu":
            raise TransferError("MODEL.DEVICE", f"cpu with --gpus-per-node "
                                                f"{opts.gpus_per_node}: the GPUs would sit idle "
                                                f"(--gpus-per-node 0: a CPU job)")
    return opts.device


def for_the_job(job: Any) -> Any:
    """A prepared run as a job runs it: its ``OUTPUT_DIR`` absolute (the job may start in
    another directory), and a seed fixed now if its config draws one (``SEED -1``), the same
    for all its requeues: a resumed run continues its data stream only from a known seed."""
    cfg = job.cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = os.path.abspath(cfg.OUTPUT_DIR)
    if cfg.SEED < 0:
        cfg.SEED = secrets.randbelow(2**31)
    cfg.freeze()
    return dataclasses.replace(job, cfg=cfg, info={**job.info, "seed": cfg.SEED})


# ----- in the job -------------------------------------------------------------------------
class TrainingJob(submitit.helpers.Checkpointable):
    """The job's callable, one call per task; returns the run's results on rank 0.

    ``checkpoint()`` (called by submitit's handler) submits it again with ``--resume``.
    """

    def __init__(self, job: Any) -> None:
        self.job = job

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(
            TrainingJob(dataclasses.replace(self.job, resume=True)))

    def __call__(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist
        from detectron2.engine.launch import DEFAULT_TIMEOUT
        from detectron2.utils import comm

        from .quiet import quiet_libraries
        from .train import run_job

        quiet_libraries()  # as the command does: the libraries' warnings off the job's log
        # SIGUSR2, or what SUBMITIT_PREEMPT_SIGNAL names
        stop = StopRequest(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)).install()
        # SIGTERM (scancel, a preemption without --signal; submitit only logs it): stop at the
        # next iteration's end with it saved, and end the job with an error, no requeue
        term = StopRequest(signal.SIGTERM).install()
        env = submitit.helpers.TorchDistributedEnvironment()
        cuda = self.job.cfg.MODEL.DEVICE.startswith("cuda")
        if env.world_size > 1:
            # what Detectron2's launch() does in each process it spawns: here they exist
            dist.init_process_group(backend="NCCL" if cuda else "GLOO",
                                    init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                    world_size=env.world_size, rank=env.rank,
                                    timeout=DEFAULT_TIMEOUT)
            comm.create_local_process_group(env.local_world_size)
            if cuda:
                torch.cuda.set_device(env.local_rank)
            comm.synchronize()
        stop.attach(env.world_size)
        term.attach(env.world_size)
        out = Path(self.job.cfg.OUTPUT_DIR)
        try:
            run_job(self.job, hooks=[StopHook(stop), StopHook(term)])
        except TrainingStopped as stopped:
            last = (out / "last_checkpoint").read_text().strip()
            if term.agreed:
                raise TransferError(out / last, f"terminated (SIGTERM): stopped after iteration "
                                    f"{stopped.args[0]} of {self.job.cfg.SOLVER.MAX_ITER}, "
                                    f"saved; --resume continues") from None
            if env.rank == 0:
                print(f"{signal.Signals(stop.signum).name} (time limit or preemption): stopped "
                      f"after iteration {stopped.args[0]} of {self.job.cfg.SOLVER.MAX_ITER}, "
                      f"{out / last} saved; requeuing with --resume", flush=True)
            stop.requeue()
        stop.in_loop = False
        if env.rank != 0:
            return {}
        return json.loads((out / "results.json").read_text())


# ----- at submission ----------------------------------------------------------------------
def make_executor(opts: JobOptions, folder: Path, name: str) -> Any:
    """:func:`jobs.executor.make_executor` (``srun --kill-on-bad-exit=1``), its errors a
    ``TransferError``."""
    with transfer_errors():
        return jobs_executor.make_executor(opts, folder, name)


def submit_jobs(opts: JobOptions, jobs: Sequence[Any], folder: Path, name: str) -> list[Any]:
    """Submit one :class:`TrainingJob` per prepared run (several: one job array)."""
    with transfer_errors():
        return jobs_executor.submit(opts, [TrainingJob(for_the_job(job)) for job in jobs],
                                    folder, name)


def wait_result(job: Any) -> dict[str, Any]:
    """The results of a job's rank 0, once it and its requeues ended; TransferError naming
    the job and the reason if it failed."""
    with transfer_errors():
        return jobs_executor.wait_result(job)


def submit_training(request: Any, opts: JobOptions) -> int:
    """``m2t-transfer train --slurm``: check the run (a :class:`transfer.request.RunRequest`)
    on the job's machines, submit it, print where it is (and wait)."""
    from .report import run_table
    from .train import prepare

    device = job_device(request.overrides, opts)
    job = prepare(request.for_job(opts.nodes, opts.tasks_per_node, device))
    out = Path(os.path.abspath(job.cfg.OUTPUT_DIR))
    folder = out / "slurm"
    (submitted,) = submit_jobs(opts, [job], folder, f"m2t-transfer-{out.name}")
    announce(submitted, opts, folder)
    if not opts.wait:
        print(f"results: {out / 'results.json'} when the job ends (a time limit or preemption "
              f"requeues it; it resumes from its last checkpoint)")
        return 0
    ctrl_c = "stops waiting, not the job" if opts.cluster == "slurm" else "stops the job too"
    print(f"waiting for job {submitted.job_id} and its requeues (Ctrl-C {ctrl_c})", flush=True)
    try:
        results = wait_result(submitted)
    except KeyboardInterrupt:
        print(f"stopped waiting for job {submitted.job_id}", file=sys.stderr)
        return 130
    print(run_table(results))
    print(f"wrote {results['output_dir']}/results.json and report.md")
    return 0


def results_of(jobs: Mapping[Any, Any]) -> dict[Any, dict[str, Any] | TransferError]:
    """Wait for several jobs: ``{key: results or the TransferError saying why it failed}``."""
    out: dict[Any, dict[str, Any] | TransferError] = {}
    for key, job in jobs.items():
        try:
            out[key] = wait_result(job)
        except TransferError as err:
            out[key] = err
    return out
