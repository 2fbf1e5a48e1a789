"""Loading pretrained weights into a detector, and proof that the backbone received them.

Detectron2's ``DetectionCheckpointer`` does the loading (``.pkl`` from ``m2t-convert`` with
its name-matching heuristics, or a Detectron2 ``.pth``); it only *logs* tensors it could not
match or whose shape differs. Here every ResNet tensor the model has (stem, res2-res5,
also res5 inside the C4 ROI head) must be loaded, otherwise the weights are for another
architecture and training would silently start from random init.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

from .errors import TransferError

#: State-dict names of the ResNet parts a converted checkpoint provides.
_RESNET_KEY = re.compile(r"^(?:backbone\.(?:bottom_up\.)?|roi_heads\.)(?:stem\.|res[2-5]\.\d+\.)")


def resnet_keys(model: nn.Module) -> list[str]:
    """The model's ResNet tensors a backbone checkpoint must fill (BN counters excluded)."""
    return [k for k in model.state_dict()
            if _RESNET_KEY.match(k) and not k.endswith("num_batches_tracked")]


class RecordingCheckpointer(DetectionCheckpointer):
    """A ``DetectionCheckpointer`` that keeps the incompatible keys of its last load."""

    incompatible: _IncompatibleKeys | None = None

    def _load_model(self, checkpoint: Any) -> _IncompatibleKeys:
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


@dataclass
class LoadReport:
    """What loading a weights file into a model did to its ResNet tensors."""

    path: str
    resnet_total: int
    resnet_missing: list[str]
    other_missing: int
    unexpected: list[str]

    @property
    def resnet_loaded(self) -> int:
        return self.resnet_total - len(self.resnet_missing)


def load_weights(model: nn.Module, path: str) -> LoadReport:
    """Load ``path`` into ``model`` with Detectron2's checkpointer; report the ResNet part.

    Raises :class:`TransferError` if the file is missing or not a weights file.
    """
    file = Path(path)
    if not file.is_file():
        raise TransferError(path, "weights file not found")
    checkpointer = RecordingCheckpointer(model)
    try:
        checkpointer.load(str(file))
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError,
            AttributeError, TypeError, AssertionError) as err:
        raise TransferError(path, f"not a weights file Detectron2 can read (a .pkl from "
                                  f"m2t-convert or a Detectron2 .pth): {err}") from None
    incompatible = checkpointer.incompatible
    missing = set(incompatible.missing_keys) if incompatible else set()
    expected = resnet_keys(model)
    return LoadReport(
        path=str(path),
        resnet_total=len(expected),
        resnet_missing=[k for k in expected if k in missing],
        other_missing=len(missing - set(expected)),
        unexpected=list(incompatible.unexpected_keys) if incompatible else [],
    )


def require_backbone(report: LoadReport, cfg: CfgNode, config_name: str) -> None:
    """Raise :class:`TransferError` unless every ResNet tensor was loaded."""
    if not report.resnet_missing:
        return
    arch = _converted_arch(report.path)
    found = f" (it holds a {arch})" if arch else ""
    raise TransferError(
        report.path,
        f"weights do not fit the ResNet-{cfg.MODEL.RESNETS.DEPTH} backbone of {config_name}"
        f"{found}: {len(report.resnet_missing)} of {report.resnet_total} backbone tensors are "
        f"missing or have another shape (first: {report.resnet_missing[0]}); convert a "
        f"checkpoint of the matching architecture with m2t-convert or set MODEL.RESNETS.DEPTH",
    )


def check_weights(cfg: CfgNode, path: str, config_name: str) -> LoadReport:
    """Build the model of ``cfg`` on the CPU and check that ``path`` fills its backbone."""
    probe = cfg.clone()
    probe.defrost()
    probe.MODEL.DEVICE = "cpu"
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the checkpointer's per-key notes come again in training
    try:
        model = build_model(probe)
        report = load_weights(model, path)
    finally:
        logging.disable(previous)
    require_backbone(report, cfg, config_name)
    return report


def _converted_arch(path: str) -> str | None:
    """The architecture ``m2t-convert`` recorded in a ``.pkl``, if any."""
    if not path.endswith(".pkl"):
        return None
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        return data.get("m2t_convert", {}).get("arch")
    except Exception:  # noqa: BLE001 - only a hint for the error message
        return None
