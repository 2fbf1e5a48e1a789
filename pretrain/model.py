"""Networks shared by every method: torchvision ResNet backbone, projector, predictor."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from .errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet (v1.5) with ``fc`` replaced by identity; returns it and its width.

    Keeping torchvision's module names means the state-dict keys are torchvision's, which is
    what ``m2t-convert`` reads.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, hidden) → BN1d → ReLU → Linear(hidden, out), biases on (SPEC §1)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class Encoder(nn.Module):
    """Backbone followed by projector; the part the teacher copies."""

    def __init__(self, arch: str, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch)
        self.projector = mlp(self.feature_dim, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class Student(nn.Module):
    """Encoder plus predictor. One forward takes both views, so DDP sees one call per step."""

    def __init__(self, arch: str, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        encoder = Encoder(arch, hidden_dim, out_dim)
        self.backbone, self.projector = encoder.backbone, encoder.projector
        self.feature_dim = encoder.feature_dim
        self.predictor = mlp(out_dim, hidden_dim, out_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        f1, f2 = self.backbone(x1), self.backbone(x2)
        z1, z2 = self.projector(f1), self.projector(f2)
        return {"f1": f1, "f2": f2, "z1": z1, "z2": z2,
                "q1": self.predictor(z1), "q2": self.predictor(z2)}

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Backbone + projector parameters, in the order the teacher's ``parameters()`` has."""
        return [*self.backbone.parameters(), *self.projector.parameters()]
