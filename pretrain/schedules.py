"""Schedules as pure functions of the global step, so that resume is exact by construction."""

from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (held outside).

    ``end + (start − end)·(1 + cos(π k / K))/2`` with k = ``step`` clamped to [0, K]. The one
    cosine of the teacher momentum, the learning rate and the momentum-BN weight α.

    >>> [cosine_schedule(k, 4, 1.0, 0.0) for k in (-1, 0, 2, 4, 9)]
    [1.0, 1.0, 0.5, 0.0, 0.0]
    """
    k = min(max(step, 0), total_steps)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * (k / total_steps)))


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """Teacher EMA momentum m_k = 1 − (1 − m0)·(cos(π k / K) + 1)/2 (SPEC §1).

    Starts at ``base`` (m0) and reaches 1 at the last step.

    >>> cosine_momentum(0, 10, 0.99), cosine_momentum(10, 10, 0.99)
    (0.99, 1.0)
    """
    return cosine_schedule(step, total_steps, base, 1.0)


def warmup_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int,
                     final_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine to ``final_lr``.

    Set per iteration. Step 0 of a warm-up already gets a non-zero rate (1/warmup of it).

    >>> warmup_cosine_lr(0, 100, 1.0, 10), warmup_cosine_lr(9, 100, 1.0, 10)
    (0.1, 1.0)
    >>> warmup_cosine_lr(100, 100, 1.0, 10)
    0.0
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return cosine_schedule(step - warmup_steps, span, base_lr, final_lr)


def scaled_lr(base_lr_per_256: float, total_batch: int) -> float:
    """Linear scaling rule: LR = base × total batch / 256."""
    return base_lr_per_256 * total_batch / 256.0
