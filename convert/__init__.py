"""Checkpoint conversion (SPEC §3): any ResNet checkpoint → Detectron2 ``.pkl`` or torchvision ``.pth``.

Python API::

    from convert import convert_checkpoint, verify_detectron2
    summary = convert_checkpoint("runs/m2t/last.pth", "r50_m2t.pkl", verify=True)
    report = verify_detectron2("r50_m2t.pkl", "resnet50")   # report.ok, report.lines()

Command line: ``m2t-convert INPUT OUTPUT [--branch teacher|student] [--format d2|torchvision]
[--verify] [--arch resnet50]``. Detectron2 is imported only by the verification, lazily.
"""

from __future__ import annotations

from .errors import ConversionError
from .pipeline import VerificationError, convert_checkpoint, read_backbone, summary_lines
from .verify import VerifyReport, verify_detectron2

__all__ = ["ConversionError", "VerificationError", "VerifyReport", "convert_checkpoint", "read_backbone",
           "summary_lines", "verify_detectron2"]
