"""Networks shared by every method: torchvision ResNet backbone, projector, predictor."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from .errors import UserError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STEMS = ("imagenet", "cifar")
STANDARD_WIDTH = 64  # torchvision's (and Detectron2's) stem and res2 width


def build_backbone(arch: str, stem: str = "imagenet",
                   width: int = STANDARD_WIDTH) -> tuple[nn.Module, int]:
    """A torchvision ResNet (v1.5) with ``fc`` replaced by identity; returns it and its width.

    ``stem="cifar"`` swaps the 7×7 stride-2 conv and the max-pool for one 3×3 stride-1 conv,
    the usual stem for 32 px images (solo-learn's and lightly's CIFAR benchmarks); ``width``
    scales every stage's channels (64 is torchvision's network). Module names, and so
    state-dict keys, stay torchvision's, which is what ``m2t-convert`` reads.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if width != STANDARD_WIDTH:
        _rescale(net, width)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        _init_like_torchvision(net.conv1)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _rescale(net: torchvision.models.ResNet, width: int) -> None:
    """Rebuild ``net``'s stem and stages with ``width`` channels where torchvision has 64."""
    block = type(net.layer1[0])
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    inplanes = width
    for index in range(1, 5):
        old = getattr(net, f"layer{index}")
        planes, stride = width * 2 ** (index - 1), 1 if index == 1 else 2
        blocks = []
        for i in range(len(old)):
            out = planes * block.expansion
            down = None
            if i == 0 and (stride != 1 or inplanes != out):
                down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(out))
            blocks.append(block(inplanes, planes, stride if i == 0 else 1, down))
            inplanes = out
        setattr(net, f"layer{index}", nn.Sequential(*blocks))
    net.fc = nn.Linear(inplanes, net.fc.out_features)
    _init_like_torchvision(net)


def _init_like_torchvision(module: nn.Module) -> None:
    """The initialisation ``torchvision.models.ResNet.__init__`` gives its convs and BNs."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


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

    def __init__(self, arch: str, hidden_dim: int, out_dim: int, stem: str = "imagenet",
                 width: int = STANDARD_WIDTH) -> None:
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch, stem, width)
        self.projector = mlp(self.feature_dim, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class Student(nn.Module):
    """Encoder plus predictor. One forward takes both views, so DDP sees one call per step."""

    def __init__(self, arch: str, hidden_dim: int, out_dim: int, stem: str = "imagenet",
                 width: int = STANDARD_WIDTH) -> None:
        super().__init__()
        encoder = Encoder(arch, hidden_dim, out_dim, stem, width)
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
