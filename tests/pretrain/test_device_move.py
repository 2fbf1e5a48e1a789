"""Every method stays correct after ``.to()`` (issue 12, STYLE "look state up").

``Module.to()`` keeps parameters but replaces buffers: on a GPU, a module that kept references
to its buffers from ``__init__`` goes on updating the orphaned CPU tensors, silently.
``.to(torch.float64)`` and ``.to(memory_format=torch.channels_last)`` replace tensors on the CPU
just as ``.to("cuda")`` does, so each method is moved that way, trained one step, and compared
with the same method that never moved: its teacher weights and every BN statistic must move
exactly as in the unmoved one (SPEC §1: weight EMA for all; momentum-BN commit for m2t and
projector_only; train-mode BN for byol; the EMA of the student's statistics for eman).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.config import load_config
from pretrain.methods import StudentTeacher, build_method
from pretrain.momentum_bn import MomentumBatchNorm2d

from .conftest import TINY

VARIANTS = {
    "m2t": ["model.method=m2t"],
    "byol": ["model.method=byol"],
    "eman": ["model.method=eman"],
    "projector_only": ["model.method=projector_only"],
    "m2t+residual": ["model.method=m2t", "model.residual=true"],
    "byol+residual": ["model.method=byol", "model.residual=true"],
    "eman+residual": ["model.method=eman", "model.residual=true"],
}
STEPS = 10


def build(variant: str, seed: int = 0) -> StudentTeacher:
    cfg = load_config(None, ["model.arch=resnet18", "model.proj_hidden_dim=32",
                             "model.proj_dim=16", *VARIANTS[variant]])
    torch.manual_seed(seed)
    return build_method(cfg, total_steps=STEPS).train()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def one_step(model: StudentTeacher, x1: torch.Tensor, x2: torch.Tensor, step: int = 0) -> None:
    """What the trainer does in a step: forward, backward, SGD step, teacher update."""
    opt = torch.optim.SGD(model.student.parameters(), lr=0.5, momentum=0.9)
    loss = model(x1, x2)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.update_teacher(step)


def teacher_state(model: StudentTeacher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.teacher.state_dict().items()}


def bn_statistics(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


def stale_tensor_references(root: nn.Module) -> list[str]:
    """Tensors held in a module's plain attributes (lists, tuples, dicts of them included)
    that are not one of the tree's current parameters or buffers: references that a
    ``.to()`` left behind."""
    live = {id(t) for t in (*root.parameters(), *root.buffers())}
    found = []

    def walk(obj: object, where: str, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in live:
                found.append(where)
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(item, f"{where}[{i}]", depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for key, item in obj.items():
                walk(item, f"{where}[{key!r}]", depth + 1)

    for name, mod in root.named_modules():
        for attr, value in vars(mod).items():
            if attr not in ("_parameters", "_buffers", "_modules"):
                walk(value, f"{name or type(root).__name__}.{attr}", 0)
    return found


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 3, 32, 32, generator=g, dtype=dtype),
            torch.randn(4, 3, 32, 32, generator=g, dtype=dtype))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_method_moved_to_float64_updates_its_teacher_like_one_never_moved(variant: str) -> None:
    moved = build(variant)
    initial = {k: v.clone() for k, v in moved.state_dict().items()}
    moved.to(torch.float64)
    with default_dtype(torch.float64):  # tensors created as float64: never moved
        reference = build(variant, seed=123)
    reference.load_state_dict(initial)  # copies values in place, replaces no tensor
    assert all(t.dtype == torch.float64 for t in reference.state_dict().values()
               if t.is_floating_point())

    before = teacher_state(reference)
    x1, x2 = inputs(torch.float64)
    one_step(reference, x1, x2)
    one_step(moved, x1, x2)
    expected, got = teacher_state(reference), teacher_state(moved)

    stats = bn_statistics(before)
    assert stats, "no BN statistics in the teacher"
    unmoved = [k for k in stats if torch.equal(before[k], expected[k])]
    assert not unmoved, f"{variant}: the reference teacher's statistics did not move: {unmoved}"
    for key, value in expected.items():
        assert torch.equal(got[key], value), (
            f"{variant}: teacher {key} after .to(float64) moved by "
            f"{(got[key] - before[key]).abs().max().item():.3g}, the never-moved method's by "
            f"{(value - before[key]).abs().max().item():.3g}")
    assert stale_tensor_references(moved) == []


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_method_moved_to_channels_last_updates_its_teacher_like_one_never_moved(
        variant: str) -> None:
    moved, reference = build(variant), build(variant)
    before = teacher_state(reference)
    moved.to(memory_format=torch.channels_last)
    assert moved.student.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x1, x2 = inputs()
    one_step(reference, x1, x2)
    one_step(moved, x1.to(memory_format=torch.channels_last),
             x2.to(memory_format=torch.channels_last))
    expected, got = teacher_state(reference), teacher_state(moved)
    for key, value in expected.items():
        if not value.is_floating_point():
            assert torch.equal(got[key], value), key
            continue
        # another convolution kernel for the other layout: the same step up to float32
        # rounding (a teacher left behind would differ by the whole step)
        change = (value - before[key]).abs().max().item()
        diff = (got[key] - value).abs().max().item()
        assert diff <= 2e-3 * change + 1e-7, (
            f"{variant}: teacher {key} differs after channels_last by {diff:.3g} "
            f"(the never-moved teacher moved by {change:.3g})")
    for key in bn_statistics(before):
        assert not torch.equal(got[key], before[key]), f"{variant}: {key} did not move"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_tensor_reference_survives_a_move_after_training(variant: str) -> None:
    """Train a step first (so any cache is filled), move, train again: nothing stale."""
    model = build(variant)
    one_step(model, *inputs())
    model.to(torch.float64)
    assert stale_tensor_references(model) == []
    before = teacher_state(model)
    one_step(model, *inputs(torch.float64), step=1)
    after = teacher_state(model)
    assert all(not torch.equal(after[k], before[k]) for k in bn_statistics(before))


def test_momentum_bn_moved_between_forward_and_commit_drops_the_old_statistics() -> None:
    bn = MomentumBatchNorm2d(3, total_steps=4).train()
    bn(torch.randn(2, 3, 4, 4))
    assert bn.alpha == 1.0  # read and cached from the step buffer
    bn.to(torch.float64)
    assert stale_tensor_references(bn) == []
    bn.commit()  # the float32 statistics were dropped: nothing to fold in
    assert int(bn.step) == 0 and torch.equal(bn.running_mean, torch.zeros(3, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    bn(x)
    bn.commit()  # α = 1 at step 0: the history becomes the batch's statistics
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)))
    assert torch.allclose(bn.running_var, x.var((0, 2, 3), unbiased=True))
    assert int(bn.step) == 1 and bn.alpha == pytest.approx(0.5 + 0.5 * 0.7071067811865476)


@pytest.mark.parametrize("method", ["eman", "m2t"])
def test_trainer_builds_the_optimiser_on_the_moved_parameters(method: str, tiny_train: Path,
                                                              tmp_path: Path) -> None:
    from pretrain.train import Trainer

    cfg = load_config(None, [*TINY, f"model.method={method}", "train.steps=2",
                             "train.channels_last=true", "train.device=cpu"])
    trainer = Trainer(cfg, tiny_train, tmp_path / "run")
    in_optimiser = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimiser == {id(p) for p in trainer.model.student.parameters()}
    assert trainer.model.student.backbone.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert stale_tensor_references(trainer.model) == []


def test_a_compiled_student_can_be_passed_to_the_method() -> None:
    """``train.compile`` hands the method ``torch.compile(student)``, a module wrapper without
    ``__len__``: its truth value raised TypeError, so every compiled run failed at step 0."""
    model = build("m2t")
    compiled = torch.compile(model.student, backend="eager")
    x1, x2 = inputs()
    out = model(x1, x2, student=compiled)
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
