"""Momentum BN against hand-computed values (SPEC §1.1)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from pretrain import MomentumBatchNorm1d, MomentumBatchNorm2d, bn_alpha, convert_to_momentum_bn

# One channel, batch [1, 3]: mean 2, unbiased variance ((1-2)² + (3-2)²) / 1 = 2.
X = torch.tensor([[1.0], [3.0]])


def make_bn(total_steps: int = 4, step: int = 0, mean: float = 10.0, var: float = 4.0,
            eps: float = 0.0) -> MomentumBatchNorm1d:
    bn = MomentumBatchNorm1d(1, total_steps=total_steps, eps=eps)
    bn.running_mean.fill_(mean)
    bn.running_var.fill_(var)
    bn.step.fill_(step)
    return bn.train()


@pytest.mark.parametrize("step,alpha", [(0, 1.0), (2, 0.5), (4, 0.0)])
def test_momentum_bn_mixes_batch_and_history_with_alpha(step: int, alpha: float) -> None:
    bn = make_bn(step=step)
    assert bn.alpha == pytest.approx(alpha)
    mean = alpha * 2.0 + (1 - alpha) * 10.0
    var = alpha * 2.0 + (1 - alpha) * 4.0
    expected = (X - mean) / math.sqrt(var)
    torch.testing.assert_close(bn(X), expected)


def test_alpha_schedule_endpoints_and_half_cosine() -> None:
    assert bn_alpha(0, 100) == 1.0
    assert bn_alpha(100, 100) == 0.0
    assert bn_alpha(50, 100) == pytest.approx(0.5)
    assert bn_alpha(25, 100) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert bn_alpha(150, 100) == 0.0  # clamped past the end


def test_momentum_bn_uses_history_from_before_the_step_for_both_views() -> None:
    bn = make_bn(step=2)  # alpha 0.5
    x2 = torch.tensor([[5.0], [9.0]])  # mean 7, var 8
    y1 = bn(X)
    y2 = bn(x2)
    # the second view still mixes with the untouched history (10, 4)
    torch.testing.assert_close(y2, (x2 - (0.5 * 7 + 5.0)) / math.sqrt(0.5 * 8 + 2.0))
    torch.testing.assert_close(y1, (X - 6.0) / math.sqrt(3.0))
    assert bn.running_mean.item() == 10.0 and bn.running_var.item() == 4.0
    assert int(bn.step) == 2


def test_commit_updates_once_with_the_mean_of_the_recorded_statistics() -> None:
    bn = make_bn(step=2)
    bn(X)
    bn(torch.tensor([[5.0], [9.0]]))
    bn.commit()
    # averaged batch stats: mean (2+7)/2 = 4.5, var (2+8)/2 = 5; alpha 0.5
    assert bn.running_mean.item() == pytest.approx(0.5 * 4.5 + 0.5 * 10.0)
    assert bn.running_var.item() == pytest.approx(0.5 * 5.0 + 0.5 * 4.0)
    assert int(bn.step) == 3
    assert bn.alpha == pytest.approx(bn_alpha(3, 4))
    bn.commit()  # nothing recorded since: no second update
    assert int(bn.step) == 3
    assert bn.running_mean.item() == pytest.approx(7.25)


def test_commit_at_alpha_one_replaces_history_and_at_alpha_zero_freezes_it() -> None:
    bn = make_bn(step=0)
    bn(X)
    bn.commit()
    assert bn.running_mean.item() == pytest.approx(2.0)
    bn = make_bn(step=4)
    bn(X)
    bn.commit()
    assert bn.running_mean.item() == pytest.approx(10.0)


def test_eval_mode_is_ordinary_bn_inference() -> None:
    bn = make_bn(step=0, eps=1e-5)
    bn.weight.data.fill_(2.0)
    bn.bias.data.fill_(0.5)
    bn.eval()
    ref = nn.BatchNorm1d(1, eps=1e-5).eval()
    ref.load_state_dict({k: v for k, v in bn.state_dict().items()
                         if k not in ("step", "total_steps")})
    torch.testing.assert_close(bn(X), ref(X))
    bn(X)
    assert not bn._recorded


def test_momentum_bn_2d_statistics_are_per_channel_over_batch_and_space() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 5)
    bn = MomentumBatchNorm2d(2, total_steps=10, eps=1e-5).train()
    ref = nn.BatchNorm2d(2, eps=1e-5).train()
    # at alpha 1 the output is batch-normalised with the unbiased variance
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=True, keepdim=True)
    torch.testing.assert_close(bn(x), (x - mean) / torch.sqrt(var + 1e-5))
    ref(x)
    bn.commit()
    torch.testing.assert_close(bn.running_var, x.var(dim=(0, 2, 3), unbiased=True))


def test_double_variance_correction_is_a_switch_default_off() -> None:
    bn = make_bn(step=0)
    assert not bn.double_variance_correction
    compat = MomentumBatchNorm1d(1, total_steps=4, eps=0.0, double_variance_correction=True).train()
    compat(X)
    compat.commit()
    assert compat.running_var.item() == pytest.approx(2.0 * 2 / 1)  # n/(n-1) applied again


def test_gradients_do_not_flow_through_the_statistics() -> None:
    bn = make_bn(step=2)
    x = X.clone().requires_grad_(True)
    bn(x).sum().backward()
    # with constant statistics, d/dx of sum((x - mu)/sigma) is 1/sigma for every element
    torch.testing.assert_close(x.grad, torch.full_like(X, 1 / math.sqrt(3.0)))


def test_state_dict_round_trip_keeps_history_and_step() -> None:
    bn = make_bn(step=3, total_steps=7)
    bn(X)
    bn.commit()
    state = bn.state_dict()
    assert {"weight", "bias", "running_mean", "running_var", "step", "total_steps"} <= set(state)
    other = MomentumBatchNorm1d(1, total_steps=99)
    other.load_state_dict(state)
    assert int(other.step) == 4 and int(other.total_steps) == 7
    assert other.alpha == bn.alpha
    torch.testing.assert_close(other.running_mean, bn.running_mean)


def test_converting_a_torchvision_resnet_keeps_eval_outputs_identical() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    # give the BNs non-trivial statistics and affine parameters
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
        converted = convert_to_momentum_bn(net, total_steps=10)
        after = converted(x)
    n_bn = sum(isinstance(m, MomentumBatchNorm2d) for m in converted.modules())
    assert n_bn == 20 and not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_momentum_bn_rejects_a_single_value_per_channel_in_training() -> None:
    with pytest.raises(ValueError, match="more than one value"):
        make_bn()(torch.ones(1, 1))


def test_momentum_bn_training_step_reads_no_scalar_back_from_the_device() -> None:
    # int(step) per forward would stall the host on a GPU once per BN and view (SPEC §1.6 speed)
    bn = make_bn(step=2)
    bn(X)  # the first forward reads step and total_steps once
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bn(X)
        bn(torch.tensor([[5.0], [9.0]]))
        bn.commit()
        bn(X)
    reads = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    assert reads == 0
    assert bn.alpha == pytest.approx(bn_alpha(3, 4))
    bn.step.fill_(4)  # a change made outside commit() is seen
    assert bn.alpha == 0.0
