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

Start-up: this module imports no torch, Detectron2 or submitit. ``train``'s and ``eval``'s
options are added to their parsers when that sub-command is used (``train``'s SLURM
options come from :mod:`jobs.options`, the standard library only), and each command imports
what it needs when it runs: ``--help``, ``evaluate``, ``report`` and ``configs`` do not load
the training stack.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .quiet import quiet_libraries

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
        from jobs.options import add_job_options

        from .sweep import add_sweep_options

        add_job_options(p, "the fine-tuning")
        add_sweep_options(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                   help="config overrides, after all options")


def _add_evaluator_option(p: argparse.ArgumentParser) -> None:
    from .scoring import EVALUATORS

    p.add_argument("--evaluator", choices=EVALUATORS, default=None,
                   help="COCO/LVIS evaluation: fast (faster-coco-eval, C++; the default) or "
                        "official (pycocotools / lvis, pure Python); the same numbers")


class _SubcommandParser(argparse.ArgumentParser):
    """A sub-command's parser whose options are added when it is first used (parsed, or its
    help printed) rather than when ``m2t-transfer``'s parser is built: the modules that
    define some of them are slow to import, and the other sub-commands do not need them."""

    def __init__(self, *args: Any,
                 add_options: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_options = add_options

    def _complete(self) -> None:
        if self._add_options is not None:
            add, self._add_options = self._add_options, None
            add(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2t-transfer", description="Detectron2 fine-tuning and COCO/LVIS evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)
    for name, train, text in (("train", True, "fine-tune a detector from converted weights, "
                                              "then evaluate"),
                              ("eval", False, "evaluate trained weights on the test set")):
        sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       add_options=lambda p, train=train: _add_run_options(p, train))
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


def _run_request(args: argparse.Namespace) -> int:
    """``train`` and ``eval``: the command line read into one request, which is then run
    here, submitted as a job (``--slurm``) or swept (``--seeds``/``--methods``)."""
    from .request import request_from_args

    opts = None
    if args.command == "train":
        from .slurm import check_job_options

        opts = check_job_options(args)  # the job options first: they say where it runs
    request = request_from_args(args)
    if request.is_sweep:
        from .sweep import run_sweep

        return run_sweep(request, opts)
    if opts is not None:
        from .slurm import submit_training

        return submit_training(request, opts)
    from .report import run_table
    from .train import run

    results = run(request)
    if results:
        print(run_table(results))
        print(f"wrote {results['output_dir']}/results.json and report.md")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command in ("train", "eval"):
        return _run_request(args)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``m2t-transfer``; returns the exit status."""
    quiet_libraries()
    args = build_parser().parse_args(argv)
    import logging

    from jobs.stop import Terminated, terminate_as_interrupt

    from .errors import TransferError

    terminate_as_interrupt()  # SIGTERM stops the command as Ctrl-C does, not at once
    # a log file on a full disk: no "--- Logging error ---" traceback per record (the write
    # that matters, a checkpoint's or the results', fails in one line below)
    logging.raiseExceptions = False
    sys.unraisablehook = _unraisable  # nor a second report of it when the log closes at exit
    try:
        return _run(args)
    except TransferError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a folder gone: the environment, not a bug
        where = err.filename or getattr(args, "output_dir", None)
        print(f"error: {where + ': ' if where else ''}could not write ({err.strerror or err}); "
              f"checkpoints and results already written are whole (each is replaced only once "
              f"complete)", file=sys.stderr)
        return 2
    except Terminated as stopped:
        print(str(stopped) or "terminated (SIGTERM); the last checkpoint is intact",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


def _unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` that drops an ``OSError`` raised where Python cannot raise it
    (Detectron2's log file, flushed at exit onto a full disk: the command already said so in
    its one line); anything else goes to Python's own hook."""
    if not isinstance(unraisable.exc_value, OSError):
        sys.__unraisablehook__(unraisable)


if __name__ == "__main__":
    sys.exit(main())
