"""The student–teacher methods, chosen by name from one registry (SPEC §1.1–1.5).

Every method shares the student (backbone → projector → predictor), the symmetric summed BYOL
loss and the cosine EMA of the teacher's weights. They differ only in what the teacher is and
how its BatchNorm gets statistics; each class overrides just that.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._private import BatchNorm
from .ema import update_ema
from .loss import cosine_gap, regression_loss, symmetric_byol_loss
from .model import Encoder, Student
from .momentum_bn import commit_momentum_bn, convert_to_momentum_bn, discard_momentum_bn
from .schedules import cosine_momentum

if TYPE_CHECKING:  # for the annotations only: config imports this module to list the methods
    from .config import Config

#: Self-supervised student–teacher methods, by name (m2t, byol, ...): the values
#: ``model.method`` accepts. ``pretrain.config`` checks a config's method against it, the one
#: place a name is checked; ``build_method`` looks the class up.
METHODS: dict[str, type[StudentTeacher]] = {}


def register(name: str):
    """Register a method class under ``name`` (the value of ``model.method``)."""

    def deco(cls: type[StudentTeacher]) -> type[StudentTeacher]:
        if name in METHODS:
            raise ValueError(f"a method named {name!r} is already registered "
                             f"({METHODS[name].__qualname__})")
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return deco


class StudentTeacher(nn.Module):
    """Base method: BYOL-style student and EMA teacher.

    Subclasses say how the teacher is built (``_make_teacher``), how it embeds a view
    (``teacher_embed``) and what happens to it after the optimiser step (``update_teacher``:
    the step is kept) or instead of it (``discard_step``: a non-finite loss, skipped).

    No method keeps a list of tensors between calls: ``Module.to()`` (a GPU, another dtype,
    channels_last) replaces buffers, and may replace parameters, so every pair the EMA
    updates is looked up from the modules when it is needed (``ema_pairs``, EMAN's
    ``bn_stat_pairs``). Listing them costs well under a millisecond per step.
    """

    default_momentum = 0.996
    has_teacher_backbone = True

    def __init__(self, cfg: Config, total_steps: int) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.total_steps = total_steps
        self.base_momentum = m.base_momentum if m.base_momentum is not None else self.default_momentum
        self.residual_weight = m.residual_weight if m.residual else 0.0
        self.student = Student(m.arch, m.proj_hidden_dim, m.proj_dim, m.stem, m.width)
        self.teacher = self._make_teacher()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    # ----- what varies between methods -----------------------------------------------------
    def _make_teacher(self) -> nn.Module:
        m = self.cfg.model
        teacher = Encoder(m.arch, m.proj_hidden_dim, m.proj_dim, m.stem, m.width)
        teacher.load_state_dict(self.student.state_dict(), strict=False)  # step 0: T = S
        return teacher

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) tensors the weight EMA pairs up, looked up now."""
        return list(self.teacher.parameters()), self.student.encoder_parameters()

    def teacher_embed(self, x: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def discard_step(self) -> None:
        """The step's loss was not finite and the step is skipped: drop what its forward
        recorded (m2t's momentum BN keeps its statistics until ``update_teacher``)."""
        discard_momentum_bn(self)

    def update_teacher(self, step: int) -> float:
        """EMA the teacher towards the student after optimiser step ``step``; returns m."""
        m = cosine_momentum(step, self.total_steps, self.base_momentum)
        update_ema(*self.ema_pairs(), momentum=m)
        return m

    # ----- shared --------------------------------------------------------------------------
    def forward(self, x1: torch.Tensor, x2: torch.Tensor,
                student: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Loss and metrics for one step. ``student`` may be the DDP-wrapped student."""
        out = (self.student if student is None else student)(x1, x2)
        with torch.no_grad():
            k1 = self.teacher_embed(x1, out["f1"].detach())
            k2 = self.teacher_embed(x2, out["f2"].detach())
        loss = symmetric_byol_loss(out["q1"], out["q2"], k1, k2)
        metrics = {"byol_loss": loss.detach()}
        if self.residual_weight:
            residual = 0.5 * (regression_loss(out["z1"], k1) + regression_loss(out["z2"], k2)).mean()
            loss = loss + self.residual_weight * residual
            metrics["residual_loss"] = residual.detach()
        metrics["gap"] = 0.5 * (cosine_gap(out["z1"].detach(), k1) + cosine_gap(out["z2"].detach(), k2))
        return {**metrics, "loss": loss}

    def export_backbone(self, branch: str) -> nn.Module:
        if branch == "teacher" and self.has_teacher_backbone:
            return self.teacher.backbone
        return self.student.backbone


@register("byol")
class BYOL(StudentTeacher):
    """BYOL: the teacher's BN uses each batch's statistics (ordinary train-mode BN)."""

    default_momentum = 0.996

    def __init__(self, cfg: Config, total_steps: int) -> None:
        super().__init__(cfg, total_steps)
        if cfg.model.sync_bn:
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)


@register("m2t")
class M2T(StudentTeacher):
    """Momentum² Teacher: every teacher BN is a momentum BN with lazy two-view updates."""

    default_momentum = 0.99

    def _make_teacher(self) -> nn.Module:
        teacher = super()._make_teacher()
        return convert_to_momentum_bn(teacher, self.total_steps,
                                      self.cfg.model.double_variance_correction)

    def update_teacher(self, step: int) -> float:
        """The step is kept: fold the two views' batch statistics into the momentum BNs'
        history (SPEC §1.1), then the weight EMA."""
        commit_momentum_bn(self.teacher)
        return super().update_teacher(step)


@register("eman")
class EMAN(StudentTeacher):
    """EMAN: the teacher runs in eval mode; its BN statistics are an EMA of the student's.

    The running mean/var follow the same m_k as the weights; ``num_batches_tracked`` is copied.
    The teacher's BN therefore never normalises with batch statistics.
    """

    default_momentum = 0.996

    def bn_stat_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        """Teacher and student running means/vars and counters, looked up now (buffers are
        replaced by every ``.to()``: a list kept from ``__init__`` would go stale)."""
        t_bns = [m for m in self.teacher.modules() if isinstance(m, BatchNorm)]
        s_bns = [m for m in (*self.student.backbone.modules(), *self.student.projector.modules())
                 if isinstance(m, BatchNorm)]
        stats_t = [b for m in t_bns for b in (m.running_mean, m.running_var)]
        stats_s = [b for m in s_bns for b in (m.running_mean, m.running_var)]
        counters = [(t.num_batches_tracked, s.num_batches_tracked) for t, s in zip(t_bns, s_bns, strict=True)]
        return stats_t, stats_s, counters

    def train(self, mode: bool = True) -> EMAN:
        super().train(mode)
        self.teacher.eval()
        return self

    def update_teacher(self, step: int) -> float:
        m = super().update_teacher(step)
        stats_t, stats_s, counters = self.bn_stat_pairs()
        update_ema(stats_t, stats_s, momentum=m)
        with torch.no_grad():
            for t, s in counters:
                t.copy_(s)
        return m


@register("projector_only")
class ProjectorOnly(M2T):
    """Projector-only momentum: the teacher is a momentum projector (momentum BN) applied to
    the detached student backbone features; no teacher backbone pass. Exports the student."""

    has_teacher_backbone = False

    def _make_teacher(self) -> nn.Module:
        if self.cfg.model.residual:
            from .errors import UserError

            raise UserError("model.residual needs a teacher backbone; projector_only has none")
        projector = copy.deepcopy(self.student.projector)
        return nn.ModuleDict({"projector": convert_to_momentum_bn(
            projector, self.total_steps, self.cfg.model.double_variance_correction)})

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.teacher.parameters()), list(self.student.projector.parameters())

    def teacher_embed(self, x: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        return self.teacher["projector"](student_features)


def method_names() -> list[str]:
    return sorted(METHODS)


def build_method(cfg: Config, total_steps: int) -> StudentTeacher:
    """The method ``cfg.model.method`` names (a config that ``pretrain.config`` built names a
    registered one)."""
    from .errors import UserError

    key = cfg.model.method
    if cfg.model.sync_bn and key != "byol":
        raise UserError("model.sync_bn is a BYOL-baseline option; Momentum² Teacher and the other "
                        "methods use per-process statistics by design")
    return METHODS[key](cfg, total_steps)


__all__ = ["METHODS", "StudentTeacher", "BYOL", "M2T", "EMAN", "ProjectorOnly", "build_method",
           "method_names", "register"]
