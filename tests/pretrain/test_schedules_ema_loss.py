"""EMA, schedules and the loss: formula checks on tiny tensors (SPEC §1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain import cosine_momentum, symmetric_byol_loss, update_ema, warmup_cosine_lr
from pretrain.config import load_config
from pretrain.ema import update_ema_loop
from pretrain.loss import cosine_gap, regression_loss
from pretrain.methods import build_method
from pretrain.schedules import scaled_lr


def test_fused_ema_update_equals_the_formula() -> None:
    torch.manual_seed(0)
    teacher = [torch.randn(3, 4), torch.randn(5)]
    student = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * t + 0.1 * s for t, s in zip(teacher, student, strict=False)]
    update_ema(teacher, student, 0.9)
    for got, want in zip(teacher, expected, strict=False):
        torch.testing.assert_close(got, want)


def test_fused_ema_matches_the_per_tensor_loop() -> None:
    torch.manual_seed(1)
    a = [torch.randn(7) for _ in range(4)]
    b = [t.clone() for t in a]
    s = [torch.randn(7) for _ in range(4)]
    update_ema(a, s, 0.996)
    update_ema_loop(b, s, 0.996)
    for x, y in zip(a, b, strict=False):
        torch.testing.assert_close(x, y)


def test_momentum_schedule_endpoints_and_midpoint() -> None:
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)


def test_lr_warmup_then_cosine_to_zero() -> None:
    lrs = [warmup_cosine_lr(s, 110, 1.0, 10) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5)
    assert lrs[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert scaled_lr(0.05, 1024) == pytest.approx(0.2)


def test_loss_known_values_identical_orthogonal_opposite() -> None:
    v = torch.tensor([[1.0, 0.0]])
    assert regression_loss(v, 3 * v).item() == pytest.approx(0.0)
    assert regression_loss(v, torch.tensor([[0.0, 2.0]])).item() == pytest.approx(2.0)
    assert regression_loss(v, -v).item() == pytest.approx(4.0)


def test_loss_is_symmetric_and_summed_over_directions() -> None:
    torch.manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(6, 8) for _ in range(4))
    by_hand = ((2 - 2 * (F.normalize(q1, dim=1) * F.normalize(k2, dim=1)).sum(1))
               + (2 - 2 * (F.normalize(q2, dim=1) * F.normalize(k1, dim=1)).sum(1))).mean()
    loss = symmetric_byol_loss(q1, q2, k1, k2)
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(symmetric_byol_loss(q2, q1, k2, k1), loss)
    # identical predictions and targets: 0; orthogonal in both directions: 2 + 2 = 4 (summed)
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert symmetric_byol_loss(e1, e1, e2, e2).item() == pytest.approx(4.0)


def test_cosine_gap_is_zero_for_equal_and_one_for_orthogonal() -> None:
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert cosine_gap(e1, 2 * e1).item() == pytest.approx(0.0)
    assert cosine_gap(e1, e2).item() == pytest.approx(1.0)


def tiny_cfg(method: str = "m2t"):
    return load_config(None, [f"model.method={method}", "model.arch=resnet18",
                              "model.proj_hidden_dim=32", "model.proj_dim=16"])


def test_teacher_starts_as_a_copy_has_no_grads_and_no_predictor() -> None:
    model = build_method(tiny_cfg(), total_steps=10)
    assert not hasattr(model.teacher, "predictor")
    assert all(not p.requires_grad for p in model.teacher.parameters())
    for t, s in zip(model.teacher.parameters(), model.student.encoder_parameters(), strict=False):
        assert t.shape == s.shape
        torch.testing.assert_close(t, s)
    x = torch.randn(4, 3, 32, 32)
    out = model(x, x.flip(-1))
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())


def test_update_teacher_applies_the_scheduled_momentum() -> None:
    model = build_method(tiny_cfg(), total_steps=10)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    m = model.update_teacher(step=3)
    assert m == pytest.approx(1 - 0.01 * (math.cos(math.pi * 3 / 10) + 1) / 2)
    for b, t, s in zip(before, model.teacher.parameters(), model.student.encoder_parameters(), strict=False):
        torch.testing.assert_close(t, m * b + (1 - m) * s)
