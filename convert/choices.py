"""What a conversion can write and for which networks: plain data, no torch.

``m2t-convert --help`` lists these, so they live where the command line can read them
without importing torch and torchvision (seconds of start-up).
"""

from __future__ import annotations

#: Output formats: a Detectron2 ``.pkl`` or a torchvision ``.pth`` backbone state dict.
FORMATS = ("d2", "torchvision")

#: name → (block type, blocks per stage), as in torchvision.models.resnet.
RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
