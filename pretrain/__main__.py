"""``m2t-pretrain``: self-supervised pretraining from the command line.

    m2t-pretrain train --config configs/pretrain/resnet18_cifar.yaml --data DIR --out RUN [key=value ...]
    torchrun --nproc_per_node 8 -m pretrain train --config ... --data DIR --out RUN
    m2t-pretrain train --config ... --data DIR --out RUN --slurm --nodes 4 --partition P
    m2t-pretrain linear RUN --train DIR --val DIR --protocol standard [--slurm ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from jobs.options import add_job_options, given_options

from .errors import UserError

CONFIG_DIR = (Path(__file__).resolve().parent / "configs").resolve()  # the link, followed


def resolve_config_path(name: str | None) -> Path | None:
    """A path, or the name of a file in configs/pretrain/ (with or without .yaml)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    if not known:
        raise UserError(f"{CONFIG_DIR}: no shipped configs here (the package's configs link to "
                        "configs/pretrain is missing or broken); give a path to a YAML file")
    raise UserError(f"{name}: config not found (not a file, nor one of {', '.join(known)})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2t-pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pretrain a ResNet (Momentum² Teacher by default)")
    t.add_argument("--config", help="YAML file or name in configs/pretrain/")
    t.add_argument("--data", required=True, help="ImageFolder-style training images")
    t.add_argument("--val", help="labelled ImageFolder for the kNN monitor (optional)")
    t.add_argument("--out", required=True, help="run directory (config, metrics, checkpoints)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last.pth (config taken from it); "
                        "starts afresh when there is none yet, so a restarted job resumes")
    t.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop (with a checkpoint) after N steps of this invocation, e.g. to fit "
                        "a job time limit; --resume continues")
    t.add_argument("--profile", type=int, default=0, metavar="N",
                   help="record a torch profiler trace of N steps (after 2 warm-up steps) "
                        "into RUN/profile/")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="shorthand for train.device=...")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.epochs=5 data.batch_size=64")
    add_job_options(t, "the run")  # --slurm, --nodes, ...: jobs.options
    for name, what in (("knn", "kNN top-1 (cosine, temperature-weighted votes)"),
                       ("linear", "linear evaluation top-1/top-5 on a frozen backbone")):
        e = sub.add_parser(name, help=f"{what} of a run's teacher and/or student backbone")
        e.add_argument("run", help="run directory, checkpoint .pth, or 'random' for a "
                                   "randomly initialised backbone (the floor)")
        e.add_argument("--train", required=True, help="labelled ImageFolder (memory bank / "
                                                      "training set)")
        e.add_argument("--val", required=True, help="labelled ImageFolder to score")
        e.add_argument("--branch", choices=("teacher", "student", "both"),
                       default="both" if name == "knn" else None,
                       help="default: both (linear --protocol standard: the branch the "
                            "method's authors evaluate: teacher for m2t, student for byol, "
                            "eman and projector_only)")
        e.add_argument("--arch", default="resnet18", help="architecture for 'random'")
        e.add_argument("--image-size", type=int, help="default: the run's data.image_size")
        e.add_argument("--device", default="cpu" if name == "knn" else None,
                       help="default: cpu (linear --protocol standard: auto, a GPU if any)")
        if name == "knn":
            e.add_argument("--k", type=int, default=20)
            e.add_argument("--temperature", type=float, default=0.07)
        else:
            add_linear_options(e)
    return parser


def add_linear_options(e: argparse.ArgumentParser) -> None:
    """``linear``: the fast probe (default) or the standard protocol (pretrain/linear.py)."""
    e.add_argument("--protocol", choices=("probe", "standard"), default="probe",
                   help="probe: a BN1d + Linear head on features extracted once, no "
                        "augmentation (fast); standard: the authors' augmented evaluation "
                        "(Linear → BN1d, SGD 0.2 × batch/256, cosine, 80 epochs, the best "
                        "epoch reported), resumable, under torchrun or --slurm")
    e.add_argument("--epochs", type=int, help="default: probe 100, standard 80")
    e.add_argument("--lr", type=float,
                   help="probe: the rate (default 0.1); standard: per 256 images, scaled by "
                        "--batch-size/256 (default 0.2)")
    e.add_argument("--no-bn", action="store_true",
                   help="no BN1d in the head (probe: before the Linear layer; standard: after)")
    e.add_argument("--normalize", action="store_true",
                   help="probe: L2-normalise the features first (the probe before this was "
                        "a setting; the standard protocol never does)")
    s = e.add_argument_group("--protocol standard")
    s.add_argument("--out", help="its run folder (config, metrics, last.pth, results.json); "
                                 "default RUN/linear_BRANCH")
    s.add_argument("--resume", action="store_true",
                   help="continue --out from its last.pth (starts afresh when there is none)")
    s.add_argument("--batch-size", type=int, default=256, help="total over every process")
    s.add_argument("--workers", type=int, default=4, help="data-loading processes per rank")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--log-every", type=int, default=50, metavar="N")
    s.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop (with last.pth) after N steps of this invocation; --resume "
                        "continues")
    add_job_options(e, "the linear evaluation")


def check_eval_args(args: argparse.Namespace) -> None:
    """The numbers of ``knn``/``linear`` within the ranges of the config settings they mirror."""
    from .config import Range, check_range, range_of
    from .distributed import check_device

    if args.image_size is not None:
        check_range("--image-size", args.image_size, range_of("data.image_size"))
    if args.command == "knn":
        check_range("--k", args.k, range_of("train.knn_k"))
        check_range("--temperature", args.temperature, range_of("train.knn_temperature"))
    else:
        check_range("--epochs", args.epochs, Range(low=1))
        check_range("--lr", args.lr, Range(low=0.0, low_open=True))
        if args.protocol == "standard":
            check_range("--batch-size", args.batch_size, Range(low=1))
            check_range("--workers", args.workers, Range(low=0))
            check_range("--log-every", args.log_every, Range(low=1))
            check_range("--stop-after", args.stop_after, Range(low=0, why="0: run to the end"))
        else:
            given = [flag for flag, value, default in (
                ("--out", args.out, None), ("--resume", args.resume, False),
                ("--batch-size", args.batch_size, 256), ("--workers", args.workers, 4),
                ("--seed", args.seed, 0), ("--log-every", args.log_every, 50),
                ("--stop-after", args.stop_after, 0),
                ("--slurm", args.slurm or any(v is not None for v in given_options(args).values()),
                 False))
                if value != default]
            if given:
                raise UserError(f"{', '.join(given)}: only with --protocol standard (the fast "
                                f"probe runs in one process, in one go)")
    if args.device is not None:
        check_device(args.device, "--device ")


def check_train_args(args: argparse.Namespace) -> None:
    from .config import Range, check_range

    check_range("--stop-after", args.stop_after, Range(low=0, why="0: run to the end"))
    check_range("--profile", args.profile, Range(low=0, why="0: no trace"))


def slurm_options(args: argparse.Namespace) -> dict[str, object]:
    """The job options of ``train`` as given (None: not given), by their flag."""
    return given_options(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate as ev

    check_eval_args(args)
    if args.command == "linear" and args.protocol == "standard":
        return cmd_linear_standard(args)
    if args.command == "linear":
        args.branch, args.device = args.branch or "both", args.device or "cpu"
        args.epochs, args.lr = args.epochs or 100, args.lr or 0.1
    rows = []
    branches = ["teacher", "student"] if args.branch == "both" else [args.branch]
    for branch in (["random"] if args.run == "random" else branches):
        if args.run == "random":
            backbone, size, step = ev.random_backbone(args.arch), args.image_size or 32, 0
        else:
            backbone, info = ev.load_backbone(args.run, branch)
            size, step = args.image_size or info["config"].data.image_size, info["step"]
        if args.command == "knn":
            res = ev.knn_eval(backbone, args.train, args.val, size, args.k, args.temperature,
                              args.device)
        else:
            res = ev.linear_eval(backbone, args.train, args.val, size, args.epochs, args.lr,
                                 not args.no_bn, args.device, normalize=args.normalize)
        row = {"eval": args.command, "branch": branch, "step": step, **res}
        if args.command == "linear":
            row.update(protocol="probe", normalize=args.normalize)
        # what produced the numbers, so that a row of metrics.jsonl says it on its own
        row.update(train=str(Path(args.train).resolve()), val=str(Path(args.val).resolve()),
                   image_size=size)
        if args.command == "knn":
            row.update(k=args.k, temperature=args.temperature)
        rows.append(row)
        if args.run != "random":
            ev.append_metrics(args.run, row)
    cols = ["branch", "step"] + [k for k in rows[0] if k.startswith(("knn_top", "linear_top"))]
    print(ev.format_table(rows, cols))
    return 0


def _evaluated_branch(run: str) -> str:
    """The branch the run's method's authors evaluate (``pretrain.checkpoint.evaluated_branch``):
    the teacher for m2t, the online network for BYOL and EMAN."""
    from .checkpoint import evaluated_branch, load_checkpoint
    from .evaluate import checkpoint_path

    return evaluated_branch(load_checkpoint(checkpoint_path(run))["config"])


def cmd_linear_standard(args: argparse.Namespace) -> int:
    """``linear --protocol standard`` (pretrain/linear.py): here (under torchrun: on every
    rank), or submitted with ``--slurm``."""
    from . import linear

    if args.normalize:
        raise UserError("--normalize: only with --protocol probe (the standard protocol feeds "
                        "the head the backbone's features as they are)")
    branch = args.branch or (_evaluated_branch(args.run) if args.run != "random" else "teacher")
    branches = (["random"] if args.run == "random"
                else ["teacher", "student"] if branch == "both" else [branch])
    outs = linear.out_dirs(args.run, branches, args.out)
    recipe = linear.recipe_of(args)
    if args.slurm or any(v is not None for v in slurm_options(args).values()):
        from .linear_slurm import submit  # submitit is imported for --slurm only

        return submit(args, branches, outs, recipe, slurm_options(args))
    rows, d = linear.evaluate_backbones(args.run, branches, args.train, args.val, outs, recipe,
                                        args.device or "auto", args.arch, args.resume,
                                        args.stop_after)
    if d.main:
        linear.report(args.run, rows)
    _leave_process_group()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import load_resume
    from .config import load_config
    from .train import Trainer

    check_train_args(args)
    job = None
    if args.slurm or any(v is not None for v in slurm_options(args).values()):
        from .slurm import check_job_options  # submitit is imported for --slurm only

        job = check_job_options(args.slurm, slurm_options(args))
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    resume = args.resume and (Path(args.out) / "last.pth").exists()
    if resume:  # last.pth read here, once: its config, then the state Trainer restores
        cfg, ckpt = load_resume(args.out, overrides)
    else:
        cfg, ckpt = load_config(resolve_config_path(args.config), overrides), None
    if job is not None:
        from .slurm import submit

        return submit(job, cfg, overrides, resume, data=args.data, out=args.out, val=args.val,
                      stop_after=args.stop_after, profile=args.profile, wait=args.wait)
    trainer = Trainer(cfg, args.data, args.out, val=args.val, resume=ckpt,
                      stop_after=args.stop_after, profile_steps=args.profile)
    if trainer.dist.main:
        print("resolved config:\n" + cfg.dump(), flush=True)
    last, term = _run_until_terminated(trainer)
    if term:
        if trainer.dist.main:
            print(f"terminated (SIGTERM): stopped at step {trainer.step}/{trainer.total_steps}, "
                  f"{last} saved; --resume continues", file=sys.stderr, flush=True)
        _leave_process_group()
        return 143
    if trainer.dist.main:
        print(f"checkpoint: {last}")
    _leave_process_group()
    return 0


def _run_until_terminated(trainer: Any) -> tuple[Path, bool]:
    """``trainer.run()``, with SIGTERM (``kill``, torchrun passing on a stop, a container's
    stop) ending it at the next step boundary with last.pth saved, agreed by every rank;
    outside the loop SIGTERM stops as Ctrl-C does. Returns the checkpoint and whether SIGTERM
    ended the run early."""
    import signal

    from jobs.stop import StopRequest

    from .hooks import StopHook

    stop = StopRequest(signal.SIGTERM, in_loop=True).install()
    stop.attach(trainer.dist.world_size)
    trainer.register_hooks([StopHook(stop)])
    try:
        last = trainer.run()
    finally:
        stop.uninstall()
    return last, stop.agreed and trainer.step < trainer.total_steps


def _leave_process_group() -> None:
    """End a torchrun run as the SLURM path does: the process group destroyed before exit
    (NCCL warns, and may hang at exit, when it is left to the interpreter's teardown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jobs.stop import Terminated, terminate_as_interrupt

    terminate_as_interrupt()  # SIGTERM stops the run as Ctrl-C does, not at once
    try:
        return {"train": cmd_train, "knn": cmd_eval, "linear": cmd_eval}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, run directory gone, ...: the environment, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}; the last checkpoint is intact",
              file=sys.stderr)
        return 2
    except Terminated as stopped:
        print(str(stopped) or "terminated (SIGTERM); the last checkpoint is intact",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
