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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import ConversionError
    from .pipeline import VerificationError, convert_checkpoint, read_backbone, summary_lines
    from .verify import TorchvisionReport, VerifyReport, verify_detectron2, verify_torchvision

#: Each name of the API and its module, imported on first use: ``m2t-convert --help`` then
#: starts without torch.
_API = {"ConversionError": ".errors", "TorchvisionReport": ".verify",
        "VerificationError": ".pipeline", "VerifyReport": ".verify",
        "convert_checkpoint": ".pipeline", "read_backbone": ".pipeline",
        "summary_lines": ".pipeline", "verify_detectron2": ".verify",
        "verify_torchvision": ".verify"}
__all__ = ["ConversionError", "TorchvisionReport", "VerificationError", "VerifyReport",
           "convert_checkpoint", "read_backbone", "summary_lines", "verify_detectron2",
           "verify_torchvision"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
