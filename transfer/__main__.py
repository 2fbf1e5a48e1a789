"""``m2t-transfer``: fine-tune, evaluate and compare detectors from converted checkpoints.

Sub-commands::

    m2t-transfer train    --config NAME_OR_PATH --weights model.pkl [options] [KEY VALUE ...]
    m2t-transfer train    ... --slurm [--nodes N --gpus-per-node G --time MIN ... --wait]
    m2t-transfer train    ... --seeds 0 1 2 [--methods NAME=WEIGHTS ...] [--slurm ...]
    m2t-transfer eval     --config NAME_OR_PATH --weights model_final.pth [options] [KEY VALUE ...]
    m2t-transfer evaluate --dataset NAME_OR_JSON --predictions results.json [--output-dir DIR]
                          [--evaluator fast|official]
    m2t-transfer report   RUN_DIR [RUN_DIR ...] [--output-dir DIR]
    m2t-transfer configs

Bad input ends with one line ``error: <path>: <what is wrong>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

EPILOG = """\
KEY VALUE pairs after the options override the config (Detectron2 keys), e.g.
  SOLVER.IMS_PER_BATCH 4 TRANSFER.TOTAL_BATCH 4 SEED 1
TRANSFER.TOTAL_BATCH N rescales LR and schedule linearly from the config's 16 images to N.
Builtin datasets (coco_2017_train, lvis_v1_val, ...) are looked up under --dataset-root or
$DETECTRON2_DATASETS; any COCO-format JSON can be given by path instead.
"""


def _add_run_options(p: argparse.ArgumentParser, train: bool) -> None:
    p.add_argument("--config", required=True,
                   help="config name (see `m2t-transfer configs`) or path to a Detectron2 YAML")
    p.add_argument("--weights", required=not train,
                   help="Detectron2 weights: a .pkl from m2t-convert"
                        + (" (or --methods)" if train else ", or model_final.pth of a run"))
    p.add_argument("--output-dir", help="run directory (default output/transfer/CONFIG/METHOD)")
    p.add_argument("--dataset-root", help="folder holding coco/ and lvis/ (default "
                                          "$DETECTRON2_DATASETS)")
    if train:
        p.add_argument("--train-dataset", help="builtin name or COCO-format JSON path "
                                               "(replaces DATASETS.TRAIN)")
        p.add_argument("--train-images", help="image folder of a --train-dataset JSON")
    p.add_argument("--test-dataset", help="builtin name or COCO-format JSON path "
                                          "(replaces DATASETS.TEST)")
    p.add_argument("--test-images", help="image folder of a --test-dataset JSON")
    p.add_argument("--method", help="name of the pretraining method in reports "
                                    "(default: the weights file name)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto",
                   help="rendezvous URL for multi-machine runs, e.g. tcp://HOST:PORT")
    p.add_argument("--unsafe-load", action="store_true",
                   help="if safe loading refuses the weights file (numpy arrays and plain "
                        "data only) or a YAML tag of the config, load it fully: runs code "
                        "from the file, only for files you trust")
    if train:
        p.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint in --output-dir")
    _add_evaluator_option(p)
    if train:
        from .slurm import add_job_options
        from .sweep import add_sweep_options

        add_job_options(p)
        add_sweep_options(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides, after all options")


def _add_evaluator_option(p: argparse.ArgumentParser) -> None:
    from .scoring import EVALUATORS

    p.add_argument("--evaluator", choices=EVALUATORS, default=None,
                   help="COCO/LVIS evaluation: fast (faster-coco-eval, C++; the default) or "
                        "official (pycocotools / lvis, pure Python); the same numbers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2t-transfer", description="Detectron2 fine-tuning and COCO/LVIS evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, train, text in (("train", True, "fine-tune a detector from converted weights, "
                                              "then evaluate"),
                              ("eval", False, "evaluate trained weights on the test set")):
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_run_options(p, train)
    p = sub.add_parser("evaluate", help="score a COCO-format results file from any source")
    p.add_argument("--dataset", required=True,
                   help="ground truth: builtin name (coco_2017_val, lvis_v1_val) or JSON path")
    p.add_argument("--predictions", required=True, help="COCO-format results JSON")
    p.add_argument("--dataset-root", help="folder holding coco/ and lvis/")
    p.add_argument("--output-dir", help="also write results.json and report.md here")
    _add_evaluator_option(p)
    p = sub.add_parser("report", help="put several runs side by side (Markdown + PNG)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or folders holding them")
    p.add_argument("--output-dir", default="transfer_report",
                   help="where report.md and report.png go (default ./transfer_report)")
    sub.add_parser("configs", help="list the shipped configs")
    return parser


def _check_launch(args: argparse.Namespace) -> None:
    """The process-count options, before anything starts."""
    from .errors import TransferError

    if args.num_gpus < 1:
        raise TransferError("--num-gpus", f"must be >= 1 (processes per machine), got "
                                          f"{args.num_gpus}")
    if args.num_machines < 1:
        raise TransferError("--num-machines", f"must be >= 1, got {args.num_machines}")
    if not 0 <= args.machine_rank < args.num_machines:
        raise TransferError("--machine-rank", f"must be between 0 and --num-machines - 1 = "
                                              f"{args.num_machines - 1}, got {args.machine_rank}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from . import slurm, sweep

        sweep.split_overrides(args)
        opts = slurm.check_job_options(args)
        if sweep.wants_sweep(args):
            if opts is None:
                _check_launch(args)
            return sweep.run_sweep(args, opts)
        if args.weights is None:
            from .errors import TransferError

            raise TransferError("--weights", "required (or --methods NAME=WEIGHTS ...)")
        if opts is not None:
            return slurm.submit_training(args, opts)
    if args.command in ("train", "eval"):
        _check_launch(args)
        from .report import run_table
        from .train import run_evaluation, run_training

        common = dict(output_dir=args.output_dir, overrides=args.opts,
                      test_dataset=args.test_dataset, dataset_root=args.dataset_root,
                      test_images=args.test_images, method=args.method,
                      num_gpus=args.num_gpus, num_machines=args.num_machines,
                      machine_rank=args.machine_rank, dist_url=args.dist_url,
                      unsafe_load=args.unsafe_load, evaluator=args.evaluator)
        if args.command == "train":
            results = run_training(args.config, args.weights, train_dataset=args.train_dataset,
                                   train_images=args.train_images, resume=args.resume, **common)
        else:
            results = run_evaluation(args.config, args.weights, **common)
        if results:
            print(run_table(results))
            print(f"wrote {results['output_dir']}/results.json and report.md")
        return 0
    if args.command == "evaluate":
        from .evaluate import evaluate_predictions
        from .report import run_table

        metrics = evaluate_predictions(args.dataset, args.predictions,
                                       dataset_root=args.dataset_root,
                                       output_dir=args.output_dir,
                                       evaluator=args.evaluator or "fast")
        print(run_table(metrics))
        return 0
    if args.command == "report":
        from .report import write_report

        md, png = write_report(args.runs, args.output_dir)
        print(md.read_text(), end="")
        print(f"wrote {md} and {png}")
        return 0
    from .config import available_configs

    print("\n".join(available_configs()))
    return 0


#: Libraries whose own deprecation and internal notices are not the user's business (a
#: torch.meshgrid argument inside Detectron2, numpy's copy keyword inside pycocotools, ...).
QUIET_MODULES = r"(torch|torchvision|detectron2|fvcore|iopath|pycocotools|faster_coco_eval|lvis)"
#: torch's own loggers that print on import or tracing ("No CUDA runtime is found" on a CPU).
QUIET_LOGGERS = ("torch.utils.cpp_extension", "torch.fx._symbolic_trace")


def quiet_libraries() -> None:
    """Keep the libraries' warnings off the terminal; ours and Detectron2's log lines stay."""
    import logging

    warnings.filterwarnings("ignore", module=QUIET_MODULES + r"(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``m2t-transfer``; returns the exit status."""
    quiet_libraries()
    args = build_parser().parse_args(argv)
    from .errors import TransferError

    try:
        return _run(args)
    except TransferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
