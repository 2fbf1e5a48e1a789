"""``m2t-convert``: convert a pretraining checkpoint for Detectron2 or torchvision (SPEC §3).

    m2t-convert INPUT OUTPUT [--branch teacher|student] [--format d2|torchvision] [--verify]
                [--arch resnet50] [--force] [--prefix P] [--unsafe-load]

Prints a short summary; problems come out as one line, ``error: <file>: <what is wrong>``,
with exit status 2, as for bad command-line usage (argparse) and in ``m2t-pretrain`` and
``m2t-transfer``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .choices import FORMATS, RESNETS
from .errors import ConversionError, ConversionWarning, one_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2t-convert",
        description="Convert a ResNet checkpoint (ours, the Momentum² Teacher authors', MoCo, "
                    "DINO, PixPro, BYOL, EMAN, solo-learn, lightly, mmselfsup, OpenSelfSup, "
                    "timm, .safetensors or plain torchvision: docs/checkpoint-formats.md) to a "
                    "Detectron2 .pkl or a torchvision .pth backbone state dict.")
    parser.add_argument("input", help="checkpoint path or URL (read through iopath)")
    parser.add_argument("output", help="output file: .pkl for Detectron2, .pth for torchvision")
    parser.add_argument("--branch", choices=("teacher", "student"), default=None,
                        help="which network of a teacher-student checkpoint to export "
                             "(default: the one the checkpoint's own code transfers, e.g. "
                             "MoCo's encoder_q, DINO's teacher; ours: by method; see "
                             "docs/checkpoint-formats.md)")
    parser.add_argument("--format", choices=FORMATS, default=None, dest="fmt",
                        help="output format (default: from the output's extension)")
    parser.add_argument("--arch", choices=tuple(RESNETS), default=None,
                        help="expected architecture; an error if the checkpoint holds another")
    parser.add_argument("--verify", action="store_true",
                        help="prove the result: Detectron2 loads every backbone tensor and "
                             "reproduces torchvision's stage outputs (needs Detectron2)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--prefix", default=None,
                        help="take the backbone under this key prefix (for layouts not "
                             "recognised automatically)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="if weights-only loading refuses the file, unpickle it fully "
                             "(runs code from the file: only for files you trust)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 success, 2 conversion/verify failure)."""
    args = build_parser().parse_args(argv)
    from .pipeline import VerificationError, convert_checkpoint, summary_lines  # torch: seconds

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # library chatter (torch, Detectron2) is not for users
            warnings.simplefilter("always", ConversionWarning)
            warnings.showwarning = _warn
            summary = convert_checkpoint(args.input, args.output, branch=args.branch,
                                         fmt=args.fmt, arch=args.arch, force=args.force,
                                         verify=args.verify, prefix=args.prefix,
                                         unsafe_load=args.unsafe_load)
    except VerificationError as e:
        for line in e.report.lines():
            print(f"verify: {line}", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(summary):
        print(line)
    print(f"done in {summary['seconds']:.2f} s")
    return 0


def _warn(message: Warning | str, category: type[Warning], filename: str, lineno: int,
          file: object = None, line: str | None = None) -> None:
    """Our warnings as one 'warning: ...' line, not Python's two-line format with source."""
    print(f"warning: {one_line(str(message))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
