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
:class:`transfer.train.Trainer`), so a chain of jobs ends with one uninterrupted run's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from detectron2.engine import HookBase
from submitit.core.utils import FailedJobError, FailedSubmissionError, UncompletedJobError

from .errors import TransferError

DEFAULT_TIME_MIN = 24 * 60
SIGNAL_DELAY_S = {"slurm": 120, "local": 30}  # how long before the limit the signal comes
MAX_TIMEOUTS = 100  # time limits met before submitit gives up requeuing (preemptions: no limit)
SLURM_ONLY = ("--partition", "--account", "--qos", "--constraint", "--cpus-per-task", "--mem-gb")
#: The job options, as flags, and their attribute names on the parsed arguments.
FLAGS = {"--cluster": "cluster", "--nodes": "nodes", "--gpus-per-node": "gpus_per_node",
         "--tasks-per-node": "tasks_per_node", "--cpus-per-task": "cpus_per_task",
         "--partition": "partition", "--time": "time", "--account": "account", "--qos": "qos",
         "--constraint": "constraint", "--mem-gb": "mem_gb"}


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
        return "cuda" if self.gpus_per_node else "cpu"

    def describe(self) -> str:
        where = "slurm" if self.cluster == "slurm" else "the local executor"
        per_node = (f"{self.tasks_per_node} task(s) with {self.gpus_per_node} GPU(s)"
                    if self.gpus_per_node else f"{self.tasks_per_node} CPU task(s)")
        return f"{where}: {self.nodes} node(s) × {per_node}, time limit {self.time} min"


def add_job_options(parser: Any) -> None:
    """The ``--slurm`` options of ``m2t-transfer train``."""
    g = parser.add_argument_group("SLURM jobs (submitit)")
    g.add_argument("--slurm", action="store_true",
                   help="submit the fine-tuning as a job instead of running it here")
    g.add_argument("--cluster", choices=("slurm", "local"), default=None,
                   help="slurm (default), or local: submitit's local executor, real processes "
                        "on this machine (tries the job here)")
    g.add_argument("--nodes", type=int, default=None, help="machines (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per machine, one task (rank) per GPU (default 8; 0: a CPU job)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks (ranks) per machine of a CPU job (default: one per GPU, or 1)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per task")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--time", type=int, default=None, metavar="MINUTES",
                   help=f"time limit of each job (default {DEFAULT_TIME_MIN}); the job saves "
                        f"a checkpoint and requeues itself before it")
    g.add_argument("--account", default=None, help="SLURM account")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g.add_argument("--constraint", default=None, help="SLURM node constraint")
    g.add_argument("--mem-gb", type=float, default=None, help="memory per machine (GB)")
    g.add_argument("--wait", action="store_true",
                   help="wait for the job (and its requeues) and print the result")


def _range(flag: str, value: float | None, low: float, why: str = "",
           open_low: bool = False) -> None:
    if value is None:
        return
    if value < low or (open_low and value == low):
        bound = f"> {low}" if open_low else f">= {low}"
        raise TransferError(flag, f"must be {bound}{f' ({why})' if why else ''}, got {value}")


def check_job_options(args: Any) -> JobOptions | None:
    """The job options of parsed ``train`` arguments, checked (one line each); None when
    ``--slurm`` is not given (and then no job option may be)."""
    given = {flag: getattr(args, attr) for flag, attr in FLAGS.items()}
    if args.wait:
        given["--wait"] = True
    named = [flag for flag, value in given.items() if value is not None]
    if not args.slurm:
        if named:
            raise TransferError(", ".join(named), "only with --slurm (which submits the "
                                                  "fine-tuning as a job instead of running it "
                                                  "here)")
        return None
    for flag, attr, default in (("--num-gpus", "num_gpus", 1), ("--num-machines",
                                                                "num_machines", 1),
                                ("--machine-rank", "machine_rank", 0),
                                ("--dist-url", "dist_url", "auto")):
        if getattr(args, attr) != default:
            raise TransferError(flag, "not with --slurm: the job starts one task per GPU "
                                      "(--nodes, --gpus-per-node, --tasks-per-node)")
    cluster = args.cluster or "slurm"
    nodes = 1 if args.nodes is None else args.nodes
    gpus = 8 if args.gpus_per_node is None else args.gpus_per_node
    time = DEFAULT_TIME_MIN if args.time is None else args.time
    _range("--nodes", nodes, 1)
    _range("--gpus-per-node", gpus, 0, "0: a CPU job")
    _range("--time", time, 1, "minutes")
    tasks = (gpus or 1) if args.tasks_per_node is None else args.tasks_per_node
    _range("--tasks-per-node", tasks, 1)
    _range("--cpus-per-task", args.cpus_per_task, 1)
    _range("--mem-gb", args.mem_gb, 0, open_low=True)
    if gpus and tasks != gpus:
        raise TransferError("--tasks-per-node", f"{tasks} with --gpus-per-node {gpus}: one "
                                                f"task per GPU (leave --tasks-per-node out, or "
                                                f"ask for {tasks} GPU(s))")
    if cluster == "local":
        if nodes != 1:
            raise TransferError("--nodes", f"{nodes} with --cluster local: the local executor "
                                           f"runs on this machine only (--nodes 1)")
        if gpus:
            import torch

            have = torch.cuda.device_count()
            if gpus > have:
                raise TransferError("--gpus-per-node", f"{gpus} with --cluster local but this "
                                                       f"machine has {have} CUDA device(s) "
                                                       f"(--gpus-per-node 0: a CPU job)")
        ignored = [flag for flag in SLURM_ONLY if given[flag] is not None]
        if ignored:
            print(f"note: --cluster local ignores {', '.join(ignored)} (SLURM requests)")
    elif shutil.which("sbatch") is None:
        raise TransferError("sbatch", "not found: SLURM is not installed here (or not on "
                                      "PATH); submit from a SLURM login node, or try the job "
                                      "here with --cluster local")
    return JobOptions(cluster, nodes, gpus, tasks, time, args.cpus_per_task, args.mem_gb,
                      args.partition, args.account, args.qos, args.constraint, args.wait)


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
class TrainingStopped(BaseException):
    """Raised by :class:`StopHook` to leave Detectron2's training loop after a saved
    iteration (a BaseException: Detectron2 logs every ``Exception`` as a failure)."""


class StopRequest:
    """A stop asked for by the preemption signal, on any rank.

    Inside the training loop the handler only sets a flag; :class:`StopHook` all-reduces it
    after each iteration, so that every rank stops after the same one. Outside the loop
    there is nothing unsaved, and the handler requeues at once. The handler it replaces
    (submitit's) is kept: :meth:`requeue` calls it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.asked = False
        self.in_loop = False
        self.previous: Any = None
        self._world_size = 1
        self._group: Any = None

    def install(self) -> StopRequest:
        self.previous = signal.signal(self.signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.in_loop:
            self.asked = True
        else:
            self.requeue()

    def attach(self, world_size: int) -> None:
        """Agree on the flag over a gloo group (no GPU synchronisation for it)."""
        import torch.distributed as dist

        self._world_size = world_size
        if world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def agreed(self) -> bool:
        if self._world_size == 1:
            return self.asked
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.asked)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def requeue(self) -> None:
        """submitit's handler: on rank 0 it calls ``checkpoint()``, requeues the job and exits;
        the other ranks leave without a result (the requeued job runs them again)."""
        self.in_loop = False
        if callable(self.previous):
            self.previous(self.signum, None)
        raise SystemExit(0)


class StopHook(HookBase):
    """After each iteration: stop (all ranks) if the signal came, with a checkpoint saved."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop

    def after_step(self) -> None:
        trainer = self.trainer
        it = trainer.iter
        final = it + 1 >= trainer.max_iter
        if self.stop.agreed():
            self.stop.in_loop = False
            name = f"model_{it:07d}"
            last = Path(trainer.checkpointer.get_checkpoint_file() or "").stem
            # at the final iteration Detectron2 saved model_final just before, and at one of
            # SOLVER.CHECKPOINT_PERIOD this very checkpoint
            if not final and last != name:
                trainer.checkpointer.save(name, iteration=it)
            raise TrainingStopped(it)
        self.stop.in_loop = not final  # from the end of a session's first iteration


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

        from .__main__ import quiet_libraries
        from .train import run_job

        quiet_libraries()  # as the command does: the libraries' warnings off the job's log
        # SIGUSR2, or what SUBMITIT_PREEMPT_SIGNAL names
        stop = StopRequest(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)).install()
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
        out = Path(self.job.cfg.OUTPUT_DIR)
        try:
            run_job(self.job, hooks=[StopHook(stop)])
        except TrainingStopped as stopped:
            if env.rank == 0:
                last = (out / "last_checkpoint").read_text().strip()
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
    if opts.cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(nodes=1, tasks_per_node=opts.tasks_per_node,
                                   gpus_per_node=opts.gpus_per_node, timeout_min=opts.time,
                                   signal_delay_s=SIGNAL_DELAY_S["local"])
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError as exc:  # no srun
        raise TransferError("srun", f"{exc} (sbatch is there, srun is not)") from None
    params: dict[str, Any] = {
        "job_name": name, "time": opts.time, "nodes": opts.nodes,
        "ntasks_per_node": opts.tasks_per_node, "signal_delay_s": SIGNAL_DELAY_S["slurm"]}
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


def submit_jobs(opts: JobOptions, jobs: Sequence[Any], folder: Path, name: str) -> list[Any]:
    """Submit one :class:`TrainingJob` per prepared run (several: one job array)."""
    try:
        executor = make_executor(opts, folder, name)
        # clean_env: no SLURM_*/RANK/... of a job we may be inside; sbatch's complaint is
        # printed by submitit too: it comes once, in the error line
        with submitit.helpers.clean_env(), contextlib.redirect_stderr(io.StringIO()):
            if len(jobs) == 1:
                return [executor.submit(TrainingJob(for_the_job(jobs[0])))]
            with executor.batch():
                submitted = [executor.submit(TrainingJob(for_the_job(job))) for job in jobs]
            return submitted
    except (UncompletedJobError, FailedSubmissionError) as exc:  # sbatch said no
        raise TransferError("sbatch", f"refused the job: {_first_line(str(exc))}") from None
    except ValueError as exc:  # a parameter submitit refuses
        raise TransferError(folder, f"cannot submit the job: {_first_line(str(exc))}") from None


def log_of(job: Any) -> Path:
    """The stdout file of a job's first task (Detectron2's log lines)."""
    return Path(job.task(0).paths.stdout if job.num_tasks > 1 else job.paths.stdout)


def announce(job: Any, opts: JobOptions, folder: Path) -> None:
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


def wait_result(job: Any) -> dict[str, Any]:
    """The results of a job's rank 0, once it and its requeues ended; TransferError naming
    the job and the reason if it failed."""
    try:
        results = job.results()
    except (UncompletedJobError, FailedJobError) as exc:
        raise TransferError(f"job {job.job_id}", f"failed: {_reason(str(exc))} "
                                                 f"(log: {log_of(job).with_suffix('.err')})"
                            ) from None
    return results[0]


def submit_training(args: Any, opts: JobOptions) -> int:
    """``m2t-transfer train --slurm``: check the run, submit it, print where it is (and wait)."""
    from .report import run_table
    from .train import prepare

    device = job_device(args.opts, opts)
    job = prepare("train", args.config, args.weights, overrides=args.opts,
                  train_dataset=args.train_dataset, test_dataset=args.test_dataset,
                  dataset_root=args.dataset_root, train_images=args.train_images,
                  test_images=args.test_images, output_dir=args.output_dir,
                  method=args.method, world_size=opts.world_size, resume=args.resume,
                  unsafe_load=args.unsafe_load, evaluator=args.evaluator, device=device)
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


def results_of(jobs: Mapping[Any, Any]) -> dict[Any, dict[str, Any] | TransferError]:
    """Wait for several jobs: ``{key: results or the TransferError saying why it failed}``."""
    out: dict[Any, dict[str, Any] | TransferError] = {}
    for key, job in jobs.items():
        try:
            out[key] = wait_result(job)
        except TransferError as err:
            out[key] = err
    return out
