"""Synthetic checkpoints for the conversion tests: real torchvision ResNets, made-up wrappers.

BN running statistics are calibrated on random images (as training would), so that eval-mode
activations have realistic magnitudes and a numerical comparison means something.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torchvision


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run small forwards on one thread, restoring the setting afterwards.

    The test machine's two cores are shared: OpenMP threads then spin against each other and
    a 64-pixel ResNet-50 forward takes 5x longer on two threads than on one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def calibrated_resnet(arch: str, seed: int) -> torch.nn.Module:
    """torchvision ``arch`` with seeded weights and BN statistics from a random batch."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # running statistics := those of the calibration batch
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    model.train()
    with torch.no_grad(), one_torch_thread():
        model(torch.randn(4, 3, 48, 48))
    return model.eval()


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without ``fc``: what a self-supervised backbone holds."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


@pytest.fixture(scope="session")
def r18_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(teacher, student) backbone states of two different resnet18s."""
    return (backbone_state(calibrated_resnet("resnet18", 1)),
            backbone_state(calibrated_resnet("resnet18", 2)))


@pytest.fixture(scope="session")
def r50_model() -> torch.nn.Module:
    return calibrated_resnet("resnet50", 3)


@pytest.fixture(scope="session")
def r50_file(r50_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain torchvision resnet50 state dict (with fc) on disk."""
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.save(r50_model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def r18_file(r18_pair: tuple[dict, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("r18") / "resnet18.pth"
    torch.save(r18_pair[0], path)
    return path


def projector_state(seed: int, in_dim: int = 512, hidden: int = 32, out: int = 16,
                    momentum_bn: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors shaped like the projector MLP (Linear → BN1d → ReLU → Linear)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "0.weight": torch.randn(hidden, in_dim, generator=g), "0.bias": torch.randn(hidden),
        "1.weight": torch.ones(hidden), "1.bias": torch.zeros(hidden),
        "1.running_mean": torch.zeros(hidden), "1.running_var": torch.ones(hidden),
        "1.num_batches_tracked": torch.tensor(5),
        "3.weight": torch.randn(out, hidden, generator=g), "3.bias": torch.randn(out),
    }
    if momentum_bn:
        state["1.step"] = torch.tensor(5)
        state["1.total_steps"] = torch.tensor(100)
    return state


def with_momentum_bn(state: dict[str, torch.Tensor], step: int = 5,
                     total: int = 100) -> dict[str, torch.Tensor]:
    """Add the momentum-BN counters our teacher's BNs carry (SPEC §1.1) after every BN."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[key] = value
        if key.endswith("num_batches_tracked"):
            owner = key[: -len("num_batches_tracked")]
            out[owner + "step"] = torch.tensor(step)
            out[owner + "total_steps"] = torch.tensor(total)
    return out


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def our_checkpoint(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor],
                   method: str = "m2t", arch: str = "resnet18",
                   export_branch: str = "auto") -> dict:
    """What ``m2t-pretrain`` saves (format described in the conversion issue); an
    ``export_branch`` of "auto" (the default) leaves the branch to the method."""
    teacher_state = prefixed("projector.", projector_state(11, momentum_bn=True))
    if method != "projector_only":
        teacher_state.update(prefixed("backbone.", with_momentum_bn(teacher)))
    return {
        "format": "momentum2-pretrain", "version": 1, "method": method, "arch": arch,
        "student": {**prefixed("backbone.", student),
                    **prefixed("projector.", projector_state(12)),
                    **prefixed("predictor.", projector_state(13, in_dim=16))},
        "teacher": teacher_state,
        "config": {"model": {"arch": arch, "method": method},
                   "train": {"export_branch": export_branch}},
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": 5, "epoch": 1,
    }


class Synth:
    """The helpers above, handed to tests as a fixture (``--import-mode=importlib`` gives
    test modules no way to import this file)."""

    calibrated_resnet = staticmethod(calibrated_resnet)
    backbone_state = staticmethod(backbone_state)
    projector_state = staticmethod(projector_state)
    with_momentum_bn = staticmethod(with_momentum_bn)
    prefixed = staticmethod(prefixed)
    our_checkpoint = staticmethod(our_checkpoint)


@pytest.fixture(scope="session")
def synth() -> type[Synth]:
    return Synth
