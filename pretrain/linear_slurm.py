"""``m2t-pretrain linear --protocol standard --slurm``: the evaluation as a submitit job.

The same job as ``train --slurm`` (:mod:`pretrain.slurm`, :mod:`jobs`): one task (rank) per
GPU with torchrun's environment, the preemption signal agreed across ranks after each step,
last.pth saved there and the job requeued; the requeued job resumes from it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from jobs import executor as jobs_executor
from jobs.stop import StopRequest, preemption_signal

from .errors import UserError
from .linear import Recipe, evaluate_backbones, report
from .slurm import check_job_options, user_errors


@dataclass
class LinearSpec:
    """What the job evaluates, resolved at submission."""

    run: str
    branches: list[str]
    train: str
    val: str
    outs: list[str]
    recipe: Recipe
    device: str
    arch: str
    stop_after: int = 0


class LinearJob(submitit.helpers.Checkpointable):
    """The job's callable, one call per task; ``checkpoint()`` submits it again as it is,
    and the new attempt resumes from each folder's last.pth."""

    def __init__(self, spec: LinearSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        stop = StopRequest(preemption_signal(), in_loop=True).install()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                              overwrite=True)
        try:
            return self._run(stop)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise

    def _run(self, stop: StopRequest) -> dict[str, Any]:
        import torch.distributed as dist

        s = self.spec
        world = int(os.environ.get("WORLD_SIZE", "1"))
        attached = []

        def should_stop() -> bool:
            if not attached:  # the process group exists once the evaluation started it
                stop.attach(world)
                attached.append(True)
            return stop.check()

        rows, d = evaluate_backbones(s.run, s.branches, s.train, s.val,
                                     [Path(o) for o in s.outs], s.recipe, s.device, s.arch,
                                     resume=True, stop_after=s.stop_after,
                                     should_stop=should_stop)
        if dist.is_initialized():
            dist.destroy_process_group()
        unfinished = [r for r in rows if not r["finished"]]
        if stop.agreed and unfinished:
            r = unfinished[0]
            if d.main:
                print(f"{signal.Signals(stop.signum).name} (time limit or preemption): stopped "
                      f"at step {r['linear_step']}/{r['linear_steps']}, {r['out']}/last.pth "
                      f"saved; requeuing", flush=True)
            stop.requeue()
            return {"rank": d.rank, "rows": rows, "stopped": True}
        if d.main:
            report(s.run, rows)
        return {"rank": d.rank, "rows": rows}


def job_device(device: str | None, gpus_per_node: int) -> str:
    """The ranks' device: the GPUs the job asked for, or the CPU when it asked for none."""
    wanted = "cuda" if gpus_per_node else "cpu"
    if device not in (None, "auto", wanted) and not (wanted == "cuda"
                                                     and device.startswith("cuda")):
        raise UserError(f"--device {device} with --gpus-per-node {gpus_per_node}: the job's "
                        f"ranks run on {'its GPUs' if gpus_per_node else 'CPUs'} (leave "
                        f"--device out)")
    return wanted


def submit(args: Any, branches: list[str], outs: list[Path], recipe: Recipe,
           given: Mapping[str, Any]) -> int:
    """Check the options and the folders, submit; print the job id and where to follow it
    (and with ``--wait``, wait and print the result)."""
    opts = check_job_options(args.slurm, given)
    if recipe.batch_size % opts.world_size:
        raise UserError(f"--batch-size {recipe.batch_size} is not divisible by the job's "
                        f"{opts.world_size} ranks")
    absolute = [Path(os.path.abspath(o)) for o in outs]
    if not args.resume:
        for out in absolute:
            if (out / "last.pth").exists():
                raise UserError(f"{out}: already holds last.pth; pass --resume to continue "
                                f"it or choose another --out")
    run = args.run if args.run == "random" else os.path.abspath(args.run)
    spec = LinearSpec(run, branches, os.path.abspath(args.train), os.path.abspath(args.val),
                      [str(o) for o in absolute], recipe, job_device(args.device,
                                                                     opts.gpus_per_node),
                      args.arch, args.stop_after)
    folder = absolute[0].parent / "slurm" if len(absolute) > 1 else absolute[0] / "slurm"
    with user_errors():
        (job,) = jobs_executor.submit(opts, [LinearJob(spec)], folder,
                                      f"m2t-linear-{absolute[0].name}")
    jobs_executor.announce(job, opts, folder)
    if not opts.wait:
        return 0
    with user_errors():
        result = jobs_executor.wait_for(job, opts)
    if result is None:
        return 130
    print(f"job {job.job_id} ended: " + "; ".join(
        f"{r['branch']} step {r['linear_step']}/{r['linear_steps']}" for r in result["rows"]))
    return 0
