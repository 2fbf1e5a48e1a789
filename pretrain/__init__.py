"""Self-supervised pretraining: Momentum² Teacher and its relatives (SPEC §1)."""

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
