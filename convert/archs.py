"""Which torchvision ResNet a set of backbone tensors is, told from the tensors themselves.

The block type (a ``conv3`` means bottleneck blocks) and the number of blocks per stage
identify the depth; torchvision's own model, built on the meta device (no memory, no
initialisation cost), then supplies the exact key set and shapes to check against.

Two variants keep torchvision's module names (and so its state-dict keys) and change only
shapes; ``conv1.weight`` tells them apart (``variant_of``):

* the CIFAR stem: ``conv1`` is a 3×3 stride-1 conv and there is no max-pool (no tensors),
  so ``conv1.weight`` is (width, 3, 3, 3) instead of (width, 3, 7, 7);
* width ``w``: every channel count is scaled by w/64. All of a torchvision ResNet's channel
  counts are multiples of 64 (the 3 input channels aside), so the variant's shapes are
  torchvision's with every multiple of 64 scaled (``expected_shapes``).

These are the networks ``m2t-pretrain`` builds for ``model.stem: cifar`` and
``model.width``; Detectron2's ResNet can host neither (``detectron2_refusal``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torchvision

from .choices import RESNETS  # name → (block type, blocks per stage)

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")

STEMS = ("imagenet", "cifar")
#: torchvision's (and Detectron2's) stem width; every channel count is a multiple of it.
STANDARD_WIDTH = 64
#: The widest stem taken as a width variant (``m2t-pretrain`` allows 8..1024); a wider
#: ``conv1`` is reported as a shape mismatch, and no model that size is ever built.
MAX_WIDTH = 1024
#: The most values a backbone may hold (8 GiB as float32): a wide variant's shapes come from
#: the file, and expanded tensors make a few-kB file claim any size; the largest torchvision
#: ResNet (resnet152) holds 60 million.
MAX_ELEMENTS = 2**31
#: conv1's kernel for each stem.
STEM_KERNELS = {"imagenet": (7, 7), "cifar": (3, 3)}


class Variant(NamedTuple):
    """Stem and width of a ResNet with torchvision's module names."""

    stem: str = "imagenet"
    width: int = STANDARD_WIDTH

    @property
    def standard(self) -> bool:
        """Whether this is torchvision's (and Detectron2's) own network."""
        return self.stem == "imagenet" and self.width == STANDARD_WIDTH

    def describe(self) -> str:
        """'CIFAR stem, width 16', 'width 32', 'CIFAR stem', or '' for the standard network."""
        parts = ["CIFAR stem"] if self.stem == "cifar" else []
        if self.width != STANDARD_WIDTH:
            parts.append(f"width {self.width}")
        return ", ".join(parts)


STANDARD = Variant()


def variant_of(tensors: Mapping[str, torch.Tensor]) -> Variant:
    """Stem and width read from ``conv1.weight``: (width, 3, 7, 7) is the ImageNet stem,
    (width, 3, 3, 3) the CIFAR one. Anything else (absent, another kernel, a width outside
    1..``MAX_WIDTH``) is taken as the standard network, so that ``check`` reports the
    mismatch exactly as for any other non-torchvision shape."""
    weight = tensors.get("conv1.weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != 3:
        return STANDARD
    width, kernel = int(weight.shape[0]), tuple(weight.shape[2:])
    if not 1 <= width <= MAX_WIDTH:
        return STANDARD
    for stem, stem_kernel in STEM_KERNELS.items():
        if kernel == stem_kernel:
            return Variant(stem, width)
    return STANDARD


def name(arch: str, stem: str = "imagenet", width: int = STANDARD_WIDTH) -> str:
    """'resnet18, CIFAR stem, width 16'; just 'resnet18' for torchvision's network."""
    extra = Variant(stem, width).describe()
    return f"{arch}, {extra}" if extra else arch


def stem_text(stem: str, width: int) -> str:
    """What the stem is, in words: '3×3 stride-1 conv1 with 16 channels, no max-pool'."""
    if stem == "cifar":
        return f"3×3 stride-1 conv1 with {width} channels, no max-pool"
    return f"7×7 stride-2 conv1 with {width} channels, max-pool"


def detectron2_refusal(arch: str, stem: str, width: int) -> str:
    """Why Detectron2 cannot host this variant, and what to do instead (one sentence)."""
    return (f"is a {name(arch, stem, width)} ({stem_text(stem, width)}), which Detectron2's "
            f"ResNet cannot host: its stem is a 7×7 stride-2 conv with max-pool and its widths "
            f"are fixed at torchvision's (64 stem channels); nothing was written: convert to a "
            f"torchvision state dict instead (an output named *.pth)")


def depth(arch: str) -> int:
    """18 for ``resnet18`` and so on (Detectron2's ``RESNETS.DEPTH``)."""
    return int(arch[len("resnet"):])


def describe(block: str, counts: tuple[int, ...]) -> str:
    """'bottleneck blocks 3-4-6-3': how the summary and errors name a structure."""
    return f"{block} blocks {'-'.join(str(c) for c in counts)}"


def structure(keys: list[str]) -> tuple[str, tuple[int, int, int, int]]:
    """Block type and blocks per stage of a torchvision-named ResNet backbone."""
    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in keys) else "basic"
    counts = [0, 0, 0, 0]
    for key in keys:
        match = _BLOCK.match(key)
        if match is not None:
            stage, index = int(match.group(1)) - 1, int(match.group(2))
            counts[stage] = max(counts[stage], index + 1)
    return block, (counts[0], counts[1], counts[2], counts[3])


def detect(keys: list[str]) -> str:
    """The torchvision architecture name, or ValueError saying what structure was found."""
    found = structure(keys)
    for name, spec in RESNETS.items():
        if spec == found:
            return name
    raise ValueError(f"a ResNet with {describe(*found)} is none of "
                     f"{', '.join(f'{n} ({describe(*s)})' for n, s in RESNETS.items())}")


def _scaled(size: int, width: int) -> int:
    return size // STANDARD_WIDTH * width if size % STANDARD_WIDTH == 0 else size


@functools.cache
def meta_model(arch: str, stem: str = "imagenet",
               width: int = STANDARD_WIDTH) -> torch.nn.Module:
    """torchvision's ``arch`` on the meta device: names and shapes, no storage. Do not modify.

    With a ``stem``/``width`` variant, torchvision's model with every conv and BN rebuilt at
    the scaled channel counts and, for the CIFAR stem, a 3×3 stride-1 ``conv1`` and no
    max-pool (see ``variant_model``).
    """
    return variant_model(arch, stem, width, device="meta")


def variant_model(arch: str, stem: str = "imagenet", width: int = STANDARD_WIDTH,
                  device: str = "meta") -> torch.nn.Module:
    """torchvision's ``arch`` with the stem and width variant applied, on ``device``.

    Module names stay torchvision's. Off the meta device the weights are uninitialised
    memory: for a model whose every tensor is about to be loaded (``fc`` aside).
    """
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width {width} is outside 1..{MAX_WIDTH}")
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
        if width != STANDARD_WIDTH:
            for parent in list(model.modules()):
                for child_name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Conv2d):
                        setattr(parent, child_name, torch.nn.Conv2d(
                            _scaled(child.in_channels, width), _scaled(child.out_channels, width),
                            child.kernel_size, child.stride, child.padding, bias=False))
                    elif isinstance(child, torch.nn.BatchNorm2d):
                        setattr(parent, child_name,
                                torch.nn.BatchNorm2d(_scaled(child.num_features, width)))
            model.fc = torch.nn.Linear(_scaled(model.fc.in_features, width),
                                       model.fc.out_features)
        if stem == "cifar":
            model.conv1 = torch.nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1,
                                          bias=False)
            model.maxpool = torch.nn.Identity()
    if device != "meta":
        model.to_empty(device=device)
    return model


def expected_shapes(arch: str, stem: str = "imagenet",
                    width: int = STANDARD_WIDTH) -> dict[str, torch.Size]:
    """Every backbone tensor torchvision's ``arch`` registers (``fc`` excluded), with shape.

    For a variant: torchvision's shapes with every multiple of 64 scaled by ``width``/64 and,
    for the CIFAR stem, a (width, 3, 3, 3) ``conv1.weight``.
    """
    state = meta_model(arch).state_dict()
    shapes = {k: v.shape for k, v in state.items() if not k.startswith("fc.")}
    if width != STANDARD_WIDTH:
        shapes = {k: torch.Size(_scaled(n, width) for n in v) for k, v in shapes.items()}
    if stem == "cifar":
        shapes["conv1.weight"] = torch.Size((width, 3, *STEM_KERNELS["cifar"]))
    return shapes


def check(tensors: Mapping[str, torch.Tensor], arch: str, stem: str = "imagenet",
          width: int = STANDARD_WIDTH) -> list[str]:
    """Problems that stop ``tensors`` from being a torchvision ``arch`` backbone (empty: none).

    ``stem``/``width``: check against that variant of ``arch`` (``variant_of`` reads them
    from the tensors). A missing ``num_batches_tracked`` is not a problem (old checkpoints
    lack it).
    """
    expected = expected_shapes(arch, stem, width)
    variant = Variant(stem, width)
    size = sum(shape.numel() for shape in expected.values())
    if size > MAX_ELEMENTS:
        return [f"a {name(arch, stem, width)} (as conv1.weight says) holds {size:,} values, "
                f"more than m2t-convert handles ({MAX_ELEMENTS:,})"]
    problems: list[str] = []
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    if missing:
        problems.append(f"{len(missing)} tensor(s) of a {arch} are missing, e.g. "
                        f"{', '.join(missing[:3])}")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) are not part of a torchvision {arch}, e.g. "
                        f"{', '.join(unexpected[:3])}")
    for key, tensor in tensors.items():
        counter = key.endswith("num_batches_tracked")
        if tensor.is_meta:
            problems.append(f"{key} holds no values (a tensor saved from the meta device); "
                            f"save the checkpoint from a model whose weights are materialised")
            break
        if tensor.layout != torch.strided or tensor.is_quantized or (
                not counter and not tensor.is_floating_point()):
            kind = f"{tensor.dtype}" + ("" if tensor.layout == torch.strided else
                                        f", {tensor.layout}")
            problems.append(f"{key} holds {kind} values; a backbone's weights are dense "
                            f"floating-point tensors")
            break
    for key, shape in expected.items():
        if key in tensors and tensors[key].shape != shape:
            if variant.standard:
                problems.append(f"{key} has shape {tuple(tensors[key].shape)}, a torchvision "
                                f"{arch} has {tuple(shape)} (ResNeXt and Wide ResNet variants "
                                f"are not supported)")
            else:
                problems.append(f"{key} has shape {tuple(tensors[key].shape)}, a torchvision "
                                f"{arch} with {variant.describe()} (as conv1.weight says) has "
                                f"{tuple(shape)} (only the CIFAR stem and a uniform width "
                                f"are supported; ResNeXt and Wide ResNet variants are not)")
            break
    return problems


def non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """"layer2.0.conv1.weight holds 3 NaN and 0 infinite of 36864 values" for the first
    floating-point tensor that is not finite, or None. Expects tensors ``check`` accepted."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            return (f"{key} holds {nan} NaN and {inf} infinite of {tensor.numel()} values")
    return None
