"""submitit's executor for a job of one task (rank) per GPU, submission, and the lines that
tell a user where the job is and how it ended.

On SLURM, ``srun --kill-on-bad-exit=1`` ends every task of a job as soon as one fails (as
torchrun does), instead of leaving the others waiting in a collective until its timeout.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

from .errors import JobError
from .options import JobOptions

SIGNAL_DELAY_S = {"slurm": 120, "local": 30}  # how long before the limit the signal comes
MAX_TIMEOUTS = 100  # time limits met before submitit gives up requeuing (preemptions: no limit)
#: What srun is given: a rank that fails ends the others, not a wait in a collective.
SRUN_ARGS = ("--kill-on-bad-exit=1",)


def make_executor(opts: JobOptions, folder: Path, name: str) -> Any:
    """The executor of ``opts.cluster``, its parameters set; JobError when srun is missing."""
    if opts.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(nodes=1, tasks_per_node=opts.tasks_per_node,
                                   gpus_per_node=opts.gpus_per_node, timeout_min=opts.time,
                                   signal_delay_s=SIGNAL_DELAY_S["local"])
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as exc:  # no srun
        detail = f"{exc} (sbatch is there, srun is not)"
        raise JobError("srun", detail, text=detail) from None
    params: dict[str, Any] = {
        "job_name": name, "time": opts.time, "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks_per_node, "signal_delay_s": SIGNAL_DELAY_S["slurm"],
        "srun_args": list(SRUN_ARGS)}
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


def submit(opts: JobOptions, calls: Sequence[Any], folder: Path, name: str) -> list[Any]:
    """Submit one job per callable (several: one job array) into ``folder``; JobError when
    sbatch or submitit refuses."""
    try:
        executor = make_executor(opts, folder, name)
        # clean_env: no SLURM_*/RANK/... of a job we may be inside; sbatch's complaint is
        # printed by submitit too: it comes once, in the error line
        with submitit.helpers.clean_env(), contextlib.redirect_stderr(io.StringIO()):
            if len(calls) == 1:
                return [executor.submit(calls[0])]
            with executor.batch():
                submitted = [executor.submit(call) for call in calls]
            return submitted
    except (UncompletedJobError, FailedSubmissionError) as exc:  # sbatch said no
        detail = f"refused the job: {first_line(str(exc))}"
        raise JobError("sbatch", detail, text=f"sbatch {detail}") from None
    except ValueError as exc:  # a parameter submitit refuses
        detail = f"cannot submit the job: {first_line(str(exc))}"
        raise JobError(str(folder), detail, text=detail) from None


def log_of(job: Any) -> Path:
    """The stdout file of a job's first task."""
    return Path(job.task(0).paths.stdout if job.num_tasks > 1 else job.paths.stdout)


def announce(job: Any, opts: JobOptions, folder: Path) -> None:
    """Where the job went, its folder, how to follow and cancel it."""
    cancel = f"scancel {job.job_id}" if opts.cluster == "slurm" else f"kill -INT {job.job_id}"
    print(f"submitted job {job.job_id} to {opts.describe()}", flush=True)
    print(f"job folder: {folder}")
    print(f"follow the log: tail -f {log_of(job)}")
    print(f"cancel: {cancel}", flush=True)


def announce_array(jobs: Sequence[Any], labels: Sequence[str], opts: JobOptions,
                   folder: Path) -> None:
    """What :func:`announce` says, for several jobs (one SLURM job array)."""
    if opts.cluster == "slurm":
        arrays = sorted({str(job.job_id).split("_")[0] for job in jobs})
        cancel = f"scancel {' '.join(arrays)}"
    else:
        cancel = f"kill -INT {' '.join(str(job.job_id) for job in jobs)}"
    print(f"submitted {len(jobs)} jobs to {opts.describe()} each", flush=True)
    for job, label in zip(jobs, labels, strict=True):
        print(f"  job {job.job_id}: {label}")
    print(f"job folder: {folder}")
    print(f"follow a log: tail -f {folder / 'JOBID_0_log.out'}")
    print(f"cancel: {cancel}", flush=True)


def wait_result(job: Any) -> Any:
    """The result of a job's rank 0, once it and its requeues ended; JobError naming the job,
    the reason and the log if it failed."""
    try:
        results = job.results()
    except (UncompletedJobError, FailedJobError) as exc:
        detail = (f"failed: {reason(str(exc))} "
                  f"(log: {log_of(job).with_suffix('.err')})")
        raise JobError(f"job {job.job_id}", detail, text=f"job {job.job_id} {detail}") from None
    return results[0]


def wait_for(job: Any, opts: JobOptions) -> Any | None:
    """:func:`wait_result`, said first; None when Ctrl-C stopped the waiting (said too)."""
    ctrl_c = "stops waiting, not the job" if opts.cluster == "slurm" else "stops the job too"
    print(f"waiting for job {job.job_id} and its requeues (Ctrl-C {ctrl_c})", flush=True)
    try:
        return wait_result(job)
    except KeyboardInterrupt:
        print(f"stopped waiting for job {job.job_id}", file=sys.stderr)
        return None


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def reason(text: str) -> str:
    """The exception line of a job's traceback (``pkg.mod.Error: message`` → ``message``)."""
    lines = [line.strip() for line in text.splitlines()]
    for line in reversed(lines):
        m = re.match(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\w*: (.+)$", line)
        if m:
            return m.group(1)
    return first_line(text)
