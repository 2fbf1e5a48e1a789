"""``m2t-pretrain``: self-supervised pretraining from the command line.

    m2t-pretrain train --config configs/pretrain/resnet18_cifar.yaml --data DIR --out RUN [key=value ...]
    torchrun --nproc_per_node 8 -m pretrain train --config ... --data DIR --out RUN
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "pretrain"


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
                   help="continue the run in --out from its last.pth (config taken from it)")
    t.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="stop (with a checkpoint) after N steps of this invocation, e.g. to fit "
                        "a job time limit; --resume continues")
    t.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="shorthand for train.device=...")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.epochs=5 data.batch_size=64")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import Trainer, resume_config

    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.resume:
        cfg = resume_config(args.out, overrides)
    else:
        cfg = load_config(resolve_config_path(args.config), overrides)
    trainer = Trainer(cfg, args.data, args.out, val=args.val, resume=args.resume,
                      stop_after=args.stop_after)
    if trainer.dist.main:
        print("resolved config:\n" + cfg.dump(), flush=True)
    last = trainer.run()
    if trainer.dist.main:
        print(f"checkpoint: {last}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
