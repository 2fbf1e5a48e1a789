"""The student–teacher methods, chosen by name from one registry (SPEC §1.1–1.5).

Every method shares the student (backbone → projector → predictor), the symmetric summed BYOL
loss and the cosine EMA of the teacher's weights. They differ in what the teacher is, how its
BatchNorm gets statistics, and in the recipe their authors run them with: the teacher EMA's
m0 and whether BN parameters and biases are weight-decayed. Each class overrides just that;
docs/methods.md lists every choice with its source.
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
    #: Whether the method's authors weight-decay BN parameters and biases
    #: (``optim.bn_bias_weight_decay: null`` takes this).
    decays_bn_and_bias = True
    has_teacher_backbone = True

    def __init__(self, cfg: Config, total_steps: int, epochs: int | None = None) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.total_steps = total_steps
        self.base_momentum = (m.base_momentum if m.base_momentum is not None
                              else self.authors_momentum(cfg.train.epochs if epochs is None else epochs))
        self.residual_weight = m.residual_weight if m.residual else 0.0
        self.student = Student(m.arch, m.proj_hidden_dim, m.proj_dim, m.stem, m.width)
        self.teacher = self._make_teacher()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    # ----- what varies between methods -----------------------------------------------------
    @classmethod
    def authors_momentum(cls, epochs: int) -> float:
        """The teacher EMA's m0 the method's authors use for a run of ``epochs`` epochs (the
        default of ``model.base_momentum``)."""
        return cls.default_momentum

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
    """BYOL: the teacher's BN uses each batch's statistics (ordinary train-mode BN).

    The BYOL recipe (Grill et al. 2020, Appendix A "Optimization"): BN parameters and biases
    are excluded from weight decay and from LARS adaptation; τ_base = 0.996 for the 1000-epoch
    headline, 0.99 for 300 epochs and fewer (DeepMind's ``byol/configs/byol.py``:
    ``_EMA_PRESETS = {40: 0.97, 100: 0.99, 300: 0.99, 1000: 0.996}``; its 0.97 for 40 epochs
    is not taken: ``model.base_momentum=0.97``). The online network is the result (SPEC §3).
    """

    default_momentum = 0.996
    decays_bn_and_bias = False

    @classmethod
    def authors_momentum(cls, epochs: int) -> float:
        return 0.99 if epochs <= 300 else 0.996

    def __init__(self, cfg: Config, total_steps: int, epochs: int | None = None) -> None:
        super().__init__(cfg, total_steps, epochs)
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

    The authors' BYOL-EMAN recipe (Cai et al. 2021; README of
    amazon-science/exponential-moving-average-normalization: ``main_byol.py --arch BYOLEMAN
    --byol-m 0.98``, 200 epochs) starts the EMA at 0.98, and its ``collect_params`` excludes BN
    parameters and biases from weight decay and LARS adaptation. The online network is the
    result (SPEC §3).
    """

    default_momentum = 0.98
    decays_bn_and_bias = False

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
class ProjectorOnly(StudentTeacher):
    """Projector-only momentum (Pham et al. 2022): the teacher is a momentum projector, an EMA
    of the student's, applied to the detached student backbone features; no teacher backbone
    pass. Exports the student.

    Its BN is ``model.projector_bn``: ``plain`` (the paper's: train-mode BN on the batch, as
    BYOL's teacher) or ``momentum`` (Momentum² Teacher's momentum BN, this toolkit's variant).
    m0 0.99 and the weight decay of every parameter are M2T's recipe; the paper's own values
    are not verified (docs/methods.md).
    """

    default_momentum = 0.99
    has_teacher_backbone = False

    def _make_teacher(self) -> nn.Module:
        if self.cfg.model.residual:
            from .errors import UserError

            raise UserError("model.residual needs a teacher backbone; projector_only has none")
        projector = copy.deepcopy(self.student.projector)
        if self.cfg.model.projector_bn == "momentum":
            projector = convert_to_momentum_bn(projector, self.total_steps,
                                               self.cfg.model.double_variance_correction)
        return nn.ModuleDict({"projector": projector})

    def update_teacher(self, step: int) -> float:
        """Commit the momentum BNs' step (``projector_bn: momentum``; nothing to do with plain
        BN), then the weight EMA."""
        commit_momentum_bn(self.teacher)
        return super().update_teacher(step)

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.teacher.parameters()), list(self.student.projector.parameters())

    def teacher_embed(self, x: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        return self.teacher["projector"](student_features)


def method_names() -> list[str]:
    return sorted(METHODS)


def build_method(cfg: Config, total_steps: int, epochs: int | None = None) -> StudentTeacher:
    """The method ``cfg.model.method`` names (a config that ``pretrain.config`` built names a
    registered one), for a run of ``total_steps`` steps and ``epochs`` epochs (by default
    ``train.epochs``: the run length the method's default m0 is chosen by)."""
    from .errors import UserError

    key = cfg.model.method
    if cfg.model.sync_bn and key != "byol":
        raise UserError("model.sync_bn is a BYOL-baseline option; Momentum² Teacher and the other "
                        "methods use per-process statistics by design")
    if cfg.model.projector_bn != "plain" and key != "projector_only":
        raise UserError(f"model.projector_bn is the BN of projector_only's momentum projector; "
                        f"method {key} has none (leave it at plain)")
    return METHODS[key](cfg, total_steps, epochs)


def decays_bn_and_bias(cfg: Config) -> bool:
    """Whether BN parameters and biases are weight-decayed: ``optim.bn_bias_weight_decay``, or
    when it is null what the method's authors do."""
    chosen = cfg.optim.bn_bias_weight_decay
    return METHODS[cfg.model.method].decays_bn_and_bias if chosen is None else chosen


__all__ = ["METHODS", "StudentTeacher", "BYOL", "M2T", "EMAN", "ProjectorOnly", "build_method",
           "decays_bn_and_bias", "method_names", "register"]
