"""LARS (You et al. 2017) for the large-batch recipe; BN and biases are not adapted."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._private import BatchNorm


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor step is scaled by η‖w‖ / ‖∇w + λw‖.

    Parameter groups with ``lars_exclude=True`` (BN weights and biases) take plain SGD steps.
    Weight decay λ applies to every group that sets it; the BYOL and EMAN recipes give the
    excluded group λ = 0 (``train.build_optimizer``), as DeepMind's BYOL and EMAN's
    ``collect_params`` do. The trust ratio is DeepMind's/optax's η‖w‖ / ‖∇w + λw‖ (EMAN's
    ``utils/LARS.py`` divides by ‖∇w‖ + λ‖w‖ instead).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coefficient: float = 1e-3) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    ratio = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    grad = grad.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def split_bn_and_bias(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights to adapt, BN parameters and biases) of trainable parameters."""
    adapt, exclude = [], []
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(mod, BatchNorm) or name == "bias" or p.ndim == 1:
                exclude.append(p)
            else:
                adapt.append(p)
    return adapt, exclude
