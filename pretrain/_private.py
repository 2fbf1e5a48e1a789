"""Private names of torch and fvcore that pretraining relies on, each with its reason.

Underscore names change without notice; gathering them here (issue 17) makes a library
upgrade a check of this one file. Add to it only what has no public way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: The base class of every BatchNorm layer (1d/2d/3d, lazy, SyncBatchNorm); torch has no
#: public name for it, and listing the subclasses would miss the ones a later torch adds.
BatchNorm = nn.modules.batchnorm._BatchNorm


def lerp_all_(tensors: Sequence[torch.Tensor], ends: Sequence[torch.Tensor],
              weight: float) -> None:
    """``t.lerp_(e, weight)`` for every pair, in one fused kernel launch per device: torch's
    foreach ops (the optimisers' own) have no public name."""
    torch._foreach_lerp_(list(tensors), list(ends), weight)


def copy_all_(tensors: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``t.copy_(s)`` for every pair, fused as :func:`lerp_all_` is."""
    torch._foreach_copy_(list(tensors), list(sources))


def version(tensor: torch.Tensor) -> int:
    """The counter autograd advances on every in-place change of ``tensor`` (``fill_``,
    ``copy_``, ``load_state_dict``): a cached copy of it is current while this is unchanged."""
    return tensor._version
