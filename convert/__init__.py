"""Checkpoint conversion (SPEC §3): any ResNet checkpoint → Detectron2 ``.pkl`` or torchvision ``.pth``.

Python API::

    from convert import convert_checkpoint, verify_detectron2
    summary = convert_checkpoint("runs/m2t/last.pth", "r50_m2t.pkl", verify=True)
    report = verify_detectron2("r50_m2t.pkl", "resnet50")   # report.ok, report.lines()

Command line: ``m2t-convert INPUT OUTPUT [--branch teacher|student] [--format d2|torchvision]
[--verify] [--arch resnet50]``. Detectron2 is imported only by the verification, lazily.

CIFAR-stem and narrow/wide ResNets (``archs.Variant``) convert to ``.pth`` only (proven by
``verify_torchvision``); Detectron2's ResNet cannot host them, so ``.pkl`` is refused.
"""

from __future__ import annotations

from .errors import ConversionError
from .pipeline import VerificationError, convert_checkpoint, read_backbone, summary_lines
from .verify import TorchvisionReport, VerifyReport, verify_detectron2, verify_torchvision

__all__ = ["ConversionError", "TorchvisionReport", "VerificationError", "VerifyReport",
           "convert_checkpoint", "read_backbone", "summary_lines", "verify_detectron2",
           "verify_torchvision"]
