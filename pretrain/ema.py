"""Teacher weights as an exponential moving average of the student's (SPEC §1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ._private import lerp_all_


@torch.no_grad()
def update_ema(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor],
               momentum: float) -> None:
    """θ_T ← m θ_T + (1 − m) θ_S over paired tensors, with one fused foreach call.

    ``lerp_all_(T, S, 1 − m)`` computes T + (1 − m)(S − T) = m T + (1 − m) S.

    >>> t, s = [torch.zeros(2)], [torch.ones(2)]
    >>> update_ema(t, s, 0.75); t[0].tolist()
    [0.25, 0.25]
    """
    t, s = list(teacher), list(student)
    if len(t) != len(s):
        raise ValueError(f"teacher has {len(t)} tensors, student {len(s)}")
    if t:
        lerp_all_(t, s, 1.0 - momentum)


def update_ema_loop(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor],
                    momentum: float) -> None:
    """Per-tensor reference implementation of :func:`update_ema` (tests, benchmarks)."""
    with torch.no_grad():
        for pt, ps in zip(teacher, student, strict=False):
            pt.mul_(momentum).add_(ps, alpha=1.0 - momentum)
