"""BYOL's normalised-MSE loss, symmetric and summed over the two directions (SPEC §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 − 2⟨q̂, k̂⟩ with q̂, k̂ L2-normalised; k is treated as a constant target.

    Identical directions give 0, orthogonal 2, opposite 4.
    """
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.detach().float(), dim=-1)
    return 2.0 - 2.0 * (q * k).sum(dim=-1)


def symmetric_byol_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor,
                        k2: torch.Tensor) -> torch.Tensor:
    """L = mean((2 − 2⟨q1, k2⟩) + (2 − 2⟨q2, k1⟩)): the two directions are summed, not averaged."""
    return (regression_loss(q1, k2) + regression_loss(q2, k1)).mean()


def cosine_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance 1 − cos(a, b): the student–teacher gap metric (SPEC §1.5)."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()
