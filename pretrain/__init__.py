"""Self-supervised pretraining: Momentum² Teacher and its relatives (SPEC §1)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ema import update_ema
    from .loss import symmetric_byol_loss
    from .momentum_bn import (
        MomentumBatchNorm1d,
        MomentumBatchNorm2d,
        bn_alpha,
        commit_momentum_bn,
        convert_to_momentum_bn,
        discard_momentum_bn,
    )
    from .schedules import cosine_momentum, cosine_schedule, warmup_cosine_lr

#: Each name of the API and its module, imported on first use: ``m2t-pretrain --help`` then
#: starts without torch.
_API = {"update_ema": ".ema", "symmetric_byol_loss": ".loss",
        **dict.fromkeys(("MomentumBatchNorm1d", "MomentumBatchNorm2d", "bn_alpha",
                         "commit_momentum_bn", "convert_to_momentum_bn", "discard_momentum_bn"),
                        ".momentum_bn"),
        **dict.fromkeys(("cosine_momentum", "cosine_schedule", "warmup_cosine_lr"),
                        ".schedules")}

__all__ = [
    "MomentumBatchNorm1d",
    "MomentumBatchNorm2d",
    "bn_alpha",
    "commit_momentum_bn",
    "convert_to_momentum_bn",
    "discard_momentum_bn",
    "cosine_momentum",
    "cosine_schedule",
    "symmetric_byol_loss",
    "update_ema",
    "warmup_cosine_lr",
]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
