"""Which torchvision ResNet a set of backbone tensors is, told from the tensors themselves.

The block type (a ``conv3`` means bottleneck blocks) and the number of blocks per stage
identify the depth; torchvision's own model, built on the meta device (no memory, no
initialisation cost), then supplies the exact key set and shapes to check against.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import torch
import torchvision

#: name → (block type, blocks per stage), as in torchvision.models.resnet.
RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")


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


@functools.cache
def meta_model(arch: str) -> torch.nn.Module:
    """torchvision's ``arch`` on the meta device: names and shapes, no storage. Do not modify."""
    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


def expected_shapes(arch: str) -> dict[str, torch.Size]:
    """Every backbone tensor torchvision's ``arch`` registers (``fc`` excluded), with shape."""
    state = meta_model(arch).state_dict()
    return {k: v.shape for k, v in state.items() if not k.startswith("fc.")}


def check(tensors: Mapping[str, torch.Tensor], arch: str) -> list[str]:
    """Problems that stop ``tensors`` from being a torchvision ``arch`` backbone (empty: none).

    A missing ``num_batches_tracked`` is not a problem (old checkpoints lack it).
    """
    expected = expected_shapes(arch)
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
            problems.append(f"{key} has shape {tuple(tensors[key].shape)}, a torchvision {arch} "
                            f"has {tuple(shape)} (ResNeXt, wide and CIFAR-stem variants are "
                            f"not supported)")
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
