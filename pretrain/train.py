"""The pretraining loop: one process per device, DDP on the student only (SPEC §1.6)."""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jobs.atomic import write_text

from ._private import BatchNorm, copy_all_
from .checkpoint import capture, check_resumable, remove_partial_saves, restore, save_atomic
from .config import Config
from .data.feed import Feed
from .data.folder import TwoViewDataset
from .data.loader import steps_per_epoch, total_steps_for
from .data.views import PilTwoViews
from .distributed import check_device, check_same_listing, start_process
from .errors import UserError
from .hooks import (
    MIN_READABLE,
    BadImages,
    HookBase,
    KnnMonitor,
    PeriodicCheckpoint,
    Profile,
    ProgressLog,
    RunLog,
    TrainingError,
)
from .lars import LARS, split_bn_and_bias
from .methods import StudentTeacher, build_method, decays_bn_and_bias
from .rundir import CONFIG, check_fresh, check_out
from .schedules import scaled_lr, warmup_cosine_lr


def build_optimizer(cfg: Config, student: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD or LARS over the student. LARS never adapts the steps of BN parameters and biases;
    whether they are weight-decayed is ``decays_bn_and_bias`` (byol and eman: not, as their
    authors; m2t and projector_only: like every weight)."""
    o = cfg.optim
    no_decay = {} if decays_bn_and_bias(cfg) else {"weight_decay": 0.0}
    if o.name == "lars":
        adapt, exclude = split_bn_and_bias(student)
        groups = [{"params": adapt}, {"params": exclude, "lars_exclude": True, **no_decay}]
        return LARS(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.lars_trust_coefficient)
    params: Any = student.parameters()
    if no_decay:
        decay, exclude = split_bn_and_bias(student)
        params = [{"params": decay}, {"params": exclude, **no_decay}]
    return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)


class Trainer:
    """Everything a pretraining run holds; ``run()`` trains until K steps or ``stop_after``.

    The loop (``run``) runs steps and ends epochs; the bad-image accounting, logging,
    checkpoints, the kNN monitor and the profiler are hooks (``pretrain/hooks.py``), and
    ``register_hooks`` adds more. The process group and device are ``distributed.py``'s, what
    a checkpoint holds ``checkpoint.py``'s. ``resume``: the run's last.pth as
    :func:`~pretrain.checkpoint.load_resume` read it, to continue from.
    """

    def __init__(self, cfg: Config, data: str | Path, out: str | Path, val: str | None = None,
                 resume: dict[str, Any] | None = None, stop_after: int = 0,
                 profile_steps: int = 0) -> None:
        check_device(cfg.train.device)  # the one check, before anything starts
        self.cfg, self.out, self.data, self.val = cfg, Path(out), data, val
        self.stop_after = stop_after
        check_out(self.out, data, val)
        if resume is None:
            check_fresh(self.out, cfg.dump())
        else:
            check_resumable(resume, cfg, self.out / "last.pth")
        self.dist, self.device = start_process(cfg.train.device)

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.dataset = TwoViewDataset(data, PilTwoViews(cfg.data.image_size, cfg.data.min_scale,
                                                        (cfg.data.view1_blur, cfg.data.view2_blur)),
                                      seed=cfg.train.seed)
        check_same_listing(self.dataset.folder.samples, data, self.device)
        self.feed = Feed(cfg, self.dataset, self.device, self.dist.main)
        self.per_epoch = steps_per_epoch(self.feed.num_images, cfg.data.batch_size,
                                         self.dist.world_size)
        if self.per_epoch < 1:
            raise UserError(f"{data}: {self.feed.num_images} images are fewer than one batch of "
                            f"{cfg.data.batch_size} per process × {self.dist.world_size} processes")
        knn = (KnnMonitor(self.dataset.folder, data, val, cfg.data.image_size,
                          cfg.train.knn_bank_per_class)
               if val is not None else None)  # --val checked now, before the model is built
        if knn is not None:
            check_same_listing(knn.val_set.samples, val, self.device)
        self.total_steps, self.epochs = total_steps_for(cfg.train.epochs, cfg.train.steps,
                                                        self.per_epoch)
        self.total_batch = cfg.data.batch_size * self.dist.world_size
        self.base_lr = scaled_lr(cfg.optim.base_lr, self.total_batch)
        self.warmup_steps = min(int(round(cfg.optim.warmup_epochs * self.per_epoch)),
                                self.total_steps)
        self._build_model(resume)
        self.bad_images = self.seen_images = self.skipped_steps = 0
        self.hooks: list[HookBase] = []
        self.register_hooks([*([Profile(profile_steps)] if profile_steps else []), BadImages(),
                             ProgressLog(), PeriodicCheckpoint(), *([knn] if knn else [])])

    def _build_model(self, ckpt: dict[str, Any] | None) -> None:
        """The method, its optimiser and loss scaler, restored from ``ckpt`` when resuming;
        ``self.student`` is what the step runs: DDP-wrapped and compiled as configured."""
        cfg = self.cfg
        self.model: StudentTeacher = build_method(cfg, self.total_steps,
                                                  self.epochs).to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model.student, self.base_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.step = 0 if ckpt is None else restore(self, ckpt, self.out / "last.pth")
        self.saved_step = None if ckpt is None else self.step  # the step last.pth holds, if known
        self.student: nn.Module = self.model.student
        if self.dist.world_size > 1:
            self.student = DistributedDataParallel(
                self.model.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.student = torch.compile(self.student)

    def register_hooks(self, hooks: list[HookBase]) -> None:
        """Add hooks; they run after those already registered, in the order given."""
        for hook in hooks:
            hook.trainer = self
        self.hooks.extend(hooks)

    def request_stop(self) -> None:
        """End ``run()`` after the current step, with last.pth saved, as ``stop_after`` does
        (a hook calls it: preemption, time limit)."""
        self.stop_at = self.step

    def save(self, epoch: int | None = None) -> None:
        """Refresh last.pth; also keep ``epoch_NNNN.pth`` when ``epoch`` is given.

        Weights that are no longer finite (a diverged step) are never saved: the run stops
        and last.pth keeps the last good state.
        """
        bad = nonfinite_tensors(self.model)
        if bad:
            held = f" (step {self.saved_step})" if self.saved_step is not None else ""
            raise TrainingError(f"weights are not finite after step {self.step} (e.g. {bad[0]}): "
                                f"training diverged; {self.out / 'last.pth'}{held} was not "
                                f"overwritten; resume from it with a lower optim.base_lr")
        state = capture(self)  # a collective: every rank takes part
        if state is None:
            return
        save_atomic(state, self.out / "last.pth")
        self.saved_step = self.step
        if epoch is not None:
            save_atomic(state, self.out / f"epoch_{epoch:04d}.pth")

    # ----- the loop ---------------------------------------------------------------------
    def train_step(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, Any]:
        """The optimiser step ``self.step`` (the loop counts it). A non-finite loss stops the
        run, or with ``train.nonfinite=skip`` leaves weights and BN statistics untouched."""
        lr = warmup_cosine_lr(self.step, self.total_steps, self.base_lr, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        memory = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        v1 = v1.to(self.device, non_blocking=True, memory_format=memory)
        v2 = v2.to(self.device, non_blocking=True, memory_format=memory)
        # a skipped step must leave no BatchNorm statistics behind: the ordinary BNs update
        # theirs in the forward, so they are put back; momentum BNs wait for the step's end
        running = running_statistics(self.model) if self.cfg.train.nonfinite == "skip" else []
        before = [b.clone() for b in running]
        with autocast(self.cfg.train.amp, self.device):
            out = self.model(v1, v2, student=self.student)
        loss = out["loss"]
        if not torch.isfinite(loss):
            if self.cfg.train.nonfinite == "stop":
                raise TrainingError(f"loss is {loss.item()} at step {self.step}; stopping. The "
                                    f"last checkpoint in {self.out} is from before this step "
                                    f"(train.nonfinite=skip skips such steps instead)")
            with torch.no_grad():
                copy_all_(running, before)
            self.model.discard_step()
            self.skipped_steps += 1
            return {**out, "lr": lr, "m": float("nan"), "skipped": True}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        m = self.model.update_teacher(self.step)
        return {**out, "lr": lr, "m": m}

    def run(self) -> Path:
        """Train from ``self.step`` to the end of the run, or ``stop_after`` steps further."""
        if self.dist.main:
            open_run_dir(self.out, self.cfg)
        self.log = RunLog(self.out, self.dist.main, self.step)
        self.stop_at = (min(self.total_steps, self.step + self.stop_after) if self.stop_after
                        else self.total_steps)
        self.model.train()
        try:
            self._call_hooks("before_train")
            while self.step < self.stop_at:
                epoch, start = divmod(self.step, self.per_epoch)
                for v1, v2, bad in self.feed.batches(self.dist.rank, self.dist.world_size,
                                                     epoch, start):
                    self._call_hooks("before_step", len(v1), bad)
                    out = self.train_step(v1, v2) if len(v1) >= MIN_READABLE else None
                    self.step += 1  # also for a skipped step: the schedules stay aligned
                    if out is not None:
                        self.last_out, self.last_batch = out, len(v1)
                        self._call_hooks("after_step")
                    if self.step >= self.stop_at or self.step % self.per_epoch == 0:
                        break
                if self.step % self.per_epoch == 0 or self.step >= self.total_steps:
                    self._call_hooks("after_epoch", math.ceil(self.step / self.per_epoch),
                                     self.step >= self.total_steps)
            self.save()
        finally:
            self._call_hooks("after_train")
            self.log.close()
        return self.out / "last.pth"

    def _call_hooks(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(*args)



def open_run_dir(out: Path, cfg: Config) -> None:
    """Create the run directory ``out`` with its config.yaml, and clear what writes killed
    mid-way left there (the main process, as a run starts)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / CONFIG, cfg.dump(), if_changed=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot write the run directory "
                        f"({exc.strerror or exc})") from None
    for partial in remove_partial_saves(out):
        print(f"removed {partial.name}: a write that was interrupted", flush=True)


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed precision of ``train.amp`` on ``device`` (none: full precision)."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` holding NaN or inf."""
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers())
             if t.is_floating_point()]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return []
    return [n for n, t in named if not bool(torch.isfinite(t).all())]


def running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """Running means and variances of the ordinary BatchNorm layers in ``module`` that update
    them in a training forward (the student's; BYOL's teacher's). Momentum BN is not one."""
    return [b for m in module.modules()
            if isinstance(m, BatchNorm) and m.training
            and m.track_running_stats for b in (m.running_mean, m.running_var)]
