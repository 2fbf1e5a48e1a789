"""Momentum BatchNorm: the teacher's normalisation in Momentum² Teacher (SPEC §1.1).

A momentum BN keeps running statistics μ_r, σ²_r and a batch weight α that follows a half
cosine over the run, α_k = (1 + cos(π k / K)) / 2 at step k of K. In training mode a forward
on a batch with per-channel mean μ_b and unbiased variance σ²_b normalises with the mix

    μ = α μ_b + (1 − α) μ_r,        σ² = α σ²_b + (1 − α) σ²_r,

then applies the affine weight and bias. The batch statistics are *recorded*, not applied:
both views of a step mix with the same history from before the step. ``commit()`` then
updates the history once with the mean of what was recorded,

    μ_r ← α · mean(μ_b) + (1 − α) μ_r      (the same for σ²_r),

and advances the step (and so α). Statistics are per process: no all-reduce. In eval mode the
module is ordinary BN inference with μ_r, σ²_r. Gradients never flow through the statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._private import BatchNorm, version
from .schedules import cosine_schedule


def bn_alpha(step: int, total_steps: int) -> float:
    """Batch-statistics weight α at ``step`` of ``total_steps``: 1 at the start, 0 at the end.

    >>> bn_alpha(0, 100), bn_alpha(50, 100), bn_alpha(100, 100)
    (1.0, 0.5, 0.0)
    """
    return round(cosine_schedule(step, total_steps, 1.0, 0.0), 15)


class _MomentumBatchNorm(nn.Module):
    """Shared code of the 1d and 2d variants: statistics pool every axis but the channels (1)."""

    _expected_dims: tuple[int, ...] = (2,)

    def __init__(self, num_features: int, total_steps: int, eps: float = 1e-5,
                 double_variance_correction: bool = False) -> None:
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.num_features = num_features
        self.eps = eps
        # The authors' code multiplies the already-unbiased variance by n/(n-1) once more.
        self.double_variance_correction = double_variance_correction
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("total_steps", torch.tensor(int(total_steps), dtype=torch.long))
        self._recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._host: dict[str, tuple[torch.Tensor, int, int]] = {}

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.double()``...: buffers are replaced, so drop every cached
        reference to the old ones. Statistics recorded but not yet committed were computed on
        the old device/dtype; they are discarded, as after a skipped step."""
        self._recorded.clear()
        self._host.clear()
        return super()._apply(fn, *args, **kwargs)

    def _host_value(self, name: str) -> int:
        """Buffer ``name`` (``step``/``total_steps``) as a Python int, without a host–device
        sync per forward: the value is read from the device only when the buffer has changed
        since it was last read, which its version counter tells (``load_state_dict``,
        ``fill_``, ``.to()``); ``commit()`` records the step it advances to itself."""
        buf = getattr(self, name)
        seen = self._host.get(name)
        if seen is None or seen[0] is not buf or seen[1] != version(buf):
            seen = (buf, version(buf), int(buf))
            self._host[name] = seen
        return seen[2]

    @property
    def alpha(self) -> float:
        return bn_alpha(self._host_value("step"), self._host_value("total_steps"))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, step={int(self.step)}/"
                f"{int(self.total_steps)}, alpha={self.alpha:.4f}")

    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and unbiased variance of ``x``, in the running buffers' dtype.

        Computed by the BN kernel itself (one fused pass, any memory format, bf16/fp16 input
        accumulated in float32): with momentum 1 its running-statistics update *is* the batch
        mean and unbiased variance. Several times faster than ``torch.var_mean`` over (N, H, W).
        """
        dtype = self.running_mean.dtype
        if not (x.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32):
            x = x.to(dtype)  # mixed precision only as the BN kernels support it
        mean = torch.zeros(self.num_features, device=x.device, dtype=dtype)
        var = torch.zeros_like(mean)
        # eps only enters the normalised output, which is not used; the kernel wants it > 0
        F.batch_norm(x, mean, var, training=True, momentum=1.0, eps=1e-5)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self._expected_dims:
            raise ValueError(f"{type(self).__name__} expects {self._expected_dims}-D input, "
                             f"got {tuple(x.shape)}")
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            with torch.no_grad():
                n = x.numel() // x.shape[1]
                if n < 2:
                    raise ValueError(f"{type(self).__name__} needs more than one value per channel "
                                     f"in training, got input {tuple(x.shape)}")
                batch_mean, batch_var = self._batch_statistics(x.detach())
                if self.double_variance_correction:
                    batch_var = batch_var * (n / (n - 1))
                self._recorded.append((batch_mean, batch_var))
                a = self.alpha
                mean = torch.lerp(self.running_mean, batch_mean, a)  # a·μ_b + (1 − a)·μ_r
                var = torch.lerp(self.running_var, batch_var, a)
        # ordinary BN inference with the mixed statistics: one fused kernel, any memory format
        return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, momentum=0.0,
                            eps=self.eps)

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the statistics recorded since the last commit into the history; advance α.

        Does nothing if no training forward happened since the last commit.
        """
        if not self._recorded:
            return
        means = torch.stack([m for m, _ in self._recorded]).mean(0)
        variances = torch.stack([v for _, v in self._recorded]).mean(0)
        step = self._host_value("step")
        a = self.alpha
        self.running_mean.lerp_(means.to(self.running_mean.dtype), a)
        self.running_var.lerp_(variances.to(self.running_var.dtype), a)
        self._recorded.clear()
        self.step.add_(1)
        self._host["step"] = (self.step, version(self.step), step + 1)
        self.num_batches_tracked.add_(1)

    @torch.no_grad()
    def discard(self) -> None:
        """End a step that is not kept (a non-finite loss): forget what it recorded, leave the
        history as it is, and advance the step as ``commit()`` does, so that α stays on the
        run's schedule like the trainer's other schedules. Does nothing if no training
        forward happened since the last commit."""
        if not self._recorded:
            return
        self._recorded.clear()
        step = self._host_value("step")
        self.step.add_(1)
        self._host["step"] = (self.step, version(self.step), step + 1)
        self.num_batches_tracked.add_(1)


class MomentumBatchNorm1d(_MomentumBatchNorm):
    """Momentum BN over (N, C) or (N, C, L) input: statistics per channel."""

    _expected_dims = (2, 3)


class MomentumBatchNorm2d(_MomentumBatchNorm):
    """Momentum BN over (N, C, H, W) input: statistics per channel."""

    _expected_dims = (4,)


def convert_to_momentum_bn(module: nn.Module, total_steps: int,
                           double_variance_correction: bool = False) -> nn.Module:
    """Swap every BatchNorm1d/2d in ``module`` for a momentum BN, in place; returns ``module``.

    Affine weights, running statistics and eps are kept, so the converted module computes the
    same function in eval mode.
    """
    kinds = {nn.BatchNorm1d: MomentumBatchNorm1d, nn.BatchNorm2d: MomentumBatchNorm2d,
             nn.SyncBatchNorm: None}

    def swap(bn: BatchNorm) -> nn.Module:
        cls = kinds.get(type(bn))
        if cls is None:  # SyncBatchNorm: choose by the running statistics' use (2d backbones)
            cls = MomentumBatchNorm2d
        new = cls(bn.num_features, total_steps, eps=bn.eps,
                  double_variance_correction=double_variance_correction)
        with torch.no_grad():
            if bn.affine:
                new.weight.copy_(bn.weight)
                new.bias.copy_(bn.bias)
            if bn.track_running_stats and bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean)
                new.running_var.copy_(bn.running_var)
        new.to(device=bn.weight.device if bn.affine else None)
        new.train(bn.training)
        return new

    if isinstance(module, tuple(kinds)):
        return swap(module)
    for name, child in list(module.named_children()):
        if isinstance(child, tuple(kinds)):
            setattr(module, name, swap(child))
        else:
            convert_to_momentum_bn(child, total_steps, double_variance_correction)
    return module


def momentum_bn_modules(module: nn.Module) -> list[_MomentumBatchNorm]:
    return [m for m in module.modules() if isinstance(m, _MomentumBatchNorm)]


def commit_momentum_bn(module: nn.Module) -> None:
    """Commit every momentum BN inside ``module`` (once per kept training step)."""
    for m in momentum_bn_modules(module):
        m.commit()


def discard_momentum_bn(module: nn.Module) -> None:
    """Discard the step in every momentum BN inside ``module`` (once per skipped step)."""
    for m in momentum_bn_modules(module):
        m.discard()
