"""The pretraining loop: one process per device, DDP on the student only (SPEC §1.6)."""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.rendezvous import rendezvous
from torch.nn.parallel import DistributedDataParallel

from ._private import BatchNorm, copy_all_
from .augment import TwoViews
from .checkpoint import FORMAT, VERSION, load_checkpoint, remove_partial_saves, save_atomic
from .config import Config, apply_overrides, config_from_dict
from .data import (
    TwoViewDataset,
    Unreadable,
    describe_unreadable,
    steps_per_epoch,
    total_steps_for,
)
from .errors import UserError, first_line
from .feed import Feed
from .hooks import HookBase, KnnMonitor, PeriodicCheckpoint, Profile, ProgressLog, RunLog
from .lars import LARS, split_bn_and_bias
from .methods import StudentTeacher, build_method
from .rundir import CONFIG, check_fresh, check_out, write_atomic
from .schedules import scaled_lr, warmup_cosine_lr


class TrainingError(UserError):
    """The run cannot go on (non-finite loss, too many bad images); the last checkpoint stays."""


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("GROUP_WORLD_SIZE") == "1":
            # torchrun keeps its store across worker restarts, with the addresses the workers
            # of a failed attempt left in it: restarted workers could read those and connect
            # to dead peers (a hang, or "Connection refused"). A prefix per attempt keeps
            # attempts apart; on one node every worker sees the same restart count.
            store, rank, world_size = next(rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"m2t/attempt{attempt}",
                                                                    store),
                                    rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def check_device(name: str, option: str = "train.device=") -> None:
    """Refuse, in one line and before anything starts, a device this machine does not have.

    ``option`` is how the user gave it (``"train.device="``, ``"--device "``).
    """
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{option}{name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UserError(f"{option}{name}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise UserError(f"{option}{name} but no CUDA device is available; use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{option}{name} but this machine has {torch.cuda.device_count()} "
                        f"CUDA device(s)")


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        check_device(name)
        if d.local_rank >= torch.cuda.device_count():
            raise UserError(f"process LOCAL_RANK={d.local_rank} but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s): start at most that "
                            f"many processes per node (--nproc_per_node)")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def build_optimizer(cfg: Config, student: nn.Module, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "lars":
        adapt, exclude = split_bn_and_bias(student)
        groups = [{"params": adapt}, {"params": exclude, "lars_exclude": True}]
        return LARS(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay,
                    trust_coefficient=o.lars_trust_coefficient)
    return torch.optim.SGD(student.parameters(), lr=lr, momentum=o.momentum,
                           weight_decay=o.weight_decay)


class Trainer:
    """Everything a pretraining run holds; ``run()`` trains until K steps or ``stop_after``.

    The loop (``run``) runs steps and ends epochs; logging, checkpoints, the kNN monitor and
    the profiler are hooks (``pretrain/hooks.py``), and ``register_hooks`` adds more.
    """

    def __init__(self, cfg: Config, data: str | Path, out: str | Path, val: str | None = None,
                 resume: bool = False, stop_after: int = 0, profile_steps: int = 0) -> None:
        self.out = Path(out)
        self.data, self.val = data, val
        self.stop_after = stop_after
        check_out(self.out, data, val)
        ckpt = self._checkpoint_to_resume(cfg) if resume else None
        if ckpt is None:
            check_fresh(self.out, cfg.dump())
        self.cfg = cfg
        check_device(cfg.train.device)
        self.dist = init_distributed("cuda" if cfg.train.device == "cuda" or (
            cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(cfg.train.device, self.dist)

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.dataset = TwoViewDataset(data, TwoViews(cfg.data.image_size, cfg.data.min_scale,
                                                     (cfg.data.view1_blur, cfg.data.view2_blur)),
                                      seed=cfg.train.seed)
        self.feed = Feed(cfg, self.dataset, self.device, self.dist.main)
        self.per_epoch = steps_per_epoch(self.feed.num_images, cfg.data.batch_size,
                                         self.dist.world_size)
        if self.per_epoch < 1:
            raise UserError(f"{data}: {self.feed.num_images} images are fewer than one batch of "
                            f"{cfg.data.batch_size} per process × {self.dist.world_size} processes")
        knn = (KnnMonitor(self.dataset.folder, data, val, cfg.data.image_size)
               if val is not None else None)  # --val checked now, before the model is built
        self.total_steps, self.epochs = total_steps_for(cfg.train.epochs, cfg.train.steps,
                                                        self.per_epoch)
        self.total_batch = cfg.data.batch_size * self.dist.world_size
        self.base_lr = scaled_lr(cfg.optim.base_lr, self.total_batch)
        self.warmup_steps = min(int(round(cfg.optim.warmup_epochs * self.per_epoch)),
                                self.total_steps)
        self._build_model(ckpt)
        self.bad_images = self.seen_images = self.skipped_steps = 0
        self.hooks: list[HookBase] = []
        self.register_hooks([*([Profile(profile_steps)] if profile_steps else []),
                             ProgressLog(), PeriodicCheckpoint(), *([knn] if knn else [])])

    def _checkpoint_to_resume(self, cfg: Config) -> dict[str, Any]:
        last = self.out / "last.pth"
        if not last.exists():
            raise UserError(f"{last}: nothing to resume (no last.pth in the run directory)")
        ckpt = load_checkpoint(last)
        if config_from_dict(ckpt["config"], str(last)).model != cfg.model:
            raise UserError(f"{last}: the model settings differ from the checkpoint's; "
                            f"resume with the saved config (see {self.out / 'config.yaml'})")
        return ckpt

    def _build_model(self, ckpt: dict[str, Any] | None) -> None:
        """The method, its optimiser and loss scaler, restored from ``ckpt`` when resuming;
        ``self.student`` is what the step runs: DDP-wrapped and compiled as configured."""
        cfg = self.cfg
        self.model: StudentTeacher = build_method(cfg, self.total_steps).to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model.student, self.base_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.step = 0
        self.saved_step: int | None = None  # the step last.pth holds, once known
        if ckpt is not None:
            self._restore(ckpt, self.out / "last.pth")
            self.saved_step = self.step
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

    # ----- checkpoints ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION,
            "method": self.cfg.model.method, "arch": self.cfg.model.arch,
            "export_branch": self.cfg.train.export_branch,
            "config": self.cfg.to_dict(),
            "student": self.model.student.state_dict(),
            "teacher": self.model.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.step // self.per_epoch,
            "total_steps": self.total_steps, "world_size": self.dist.world_size,
            "sampler": {"epoch": self.step // self.per_epoch,
                        "start_batch": self.step % self.per_epoch, "seed": self.cfg.train.seed},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

    def _teacher_buffers_by_rank(self) -> list[dict[str, torch.Tensor]] | None:
        """Every rank's teacher buffers, gathered on each rank (None on one process).

        Without SyncBN each process's teacher normalises with its own batches, so its BN
        statistics (m2t's momentum BN above all) differ from rank to rank; the checkpoint's
        ``teacher`` holds rank 0's, and an exact resume needs each rank's own.
        """
        if self.dist.world_size == 1:
            return None
        mine = {k: v.detach().cpu() for k, v in self.model.teacher.named_buffers()}
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def _restore(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt.get("total_steps") != self.total_steps:
            raise UserError(f"{path}: checkpoint was made for {ckpt.get('total_steps')} total "
                            f"steps, this run has {self.total_steps}; the schedules would not "
                            f"match (check data, batch size, epochs and world size)")
        try:
            self.model.student.load_state_dict(ckpt["student"])
            self.model.teacher.load_state_dict(ckpt["teacher"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as exc:
            first = first_line(exc, 200)
            raise UserError(f"{path}: checkpoint does not fit this model: {first}") from None
        try:
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(_as_random_state(ckpt["rng"]["python"]))
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            first = first_line(exc, 200)
            raise UserError(f"{path}: damaged checkpoint: its random-number state cannot be "
                            f"restored ({first})") from None
        per_rank = ckpt.get("teacher_buffers_by_rank")
        if isinstance(per_rank, list) and len(per_rank) == self.dist.world_size > 1:
            own = per_rank[self.dist.rank]
            try:
                with torch.no_grad():
                    for name, buf in self.model.teacher.named_buffers():
                        buf.copy_(own[name])
            except (KeyError, RuntimeError, TypeError) as exc:
                first = first_line(exc, 200)
                raise UserError(f"{path}: damaged checkpoint: rank {self.dist.rank}'s teacher "
                                f"statistics do not fit ({first})") from None
        self.step = int(ckpt["step"])
        if not 0 <= self.step <= self.total_steps:
            raise UserError(f"{path}: damaged checkpoint: step {self.step} is outside "
                            f"0..{self.total_steps}")

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
        per_rank = self._teacher_buffers_by_rank()  # a collective: every rank takes part
        if not self.dist.main:
            return
        state = self.state()
        if per_rank is not None:
            state["teacher_buffers_by_rank"] = per_rank
        save_atomic(state, self.out / "last.pth")
        self.saved_step = self.step
        if epoch is not None:
            save_atomic(state, self.out / f"epoch_{epoch:04d}.pth")

    # ----- the loop ---------------------------------------------------------------------
    def _autocast(self):
        amp = self.cfg.train.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, v1: torch.Tensor, v2: torch.Tensor) -> dict[str, torch.Tensor]:
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
        with self._autocast():
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
            self.step += 1  # the schedules stay aligned; weights and BN statistics untouched
            return {**out, "lr": lr, "m": float("nan"), "skipped": True}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        m = self.model.update_teacher(self.step)
        self.step += 1
        return {**out, "lr": lr, "m": m}

    def run(self) -> Path:
        """Train from ``self.step`` to the end of the run, or ``stop_after`` steps further."""
        self._open_run_dir()
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
                    self._count_bad(bad, len(v1) + len(bad))
                    if self._enough_images(len(v1)):
                        self.last_out, self.last_batch = self.train_step(v1, v2), len(v1)
                        self._call_hooks("after_step")
                    if self.step >= self.stop_at or self.step % self.per_epoch == 0:
                        break
                if self.step % self.per_epoch == 0 or self.step >= self.total_steps:
                    self._end_epoch()
            self.save()
        finally:
            self._call_hooks("after_train")
            self.log.close()
        return self.out / "last.pth"

    def _call_hooks(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(*args)

    def _open_run_dir(self) -> None:
        if not self.dist.main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out / CONFIG, self.cfg.dump().encode())
        except OSError as exc:
            raise UserError(f"{self.out}: cannot write the run directory "
                            f"({exc.strerror or exc})") from None
        for partial in remove_partial_saves(self.out):
            print(f"removed {partial.name}: a write that was interrupted", flush=True)

    def _end_epoch(self) -> None:
        if self.seen_images and self.bad_images == self.seen_images:
            raise TrainingError(f"{self.data}: none of the {self.seen_images} images "
                                f"of an epoch could be read; fix the dataset")
        self._call_hooks("after_epoch", math.ceil(self.step / self.per_epoch),
                         self.step >= self.total_steps)

    def _enough_images(self, readable: int) -> bool:
        """A step needs 2 readable images (BatchNorm); with fewer it is skipped, counted."""
        if readable >= 2:
            return True
        if self.dist.world_size > 1:
            raise TrainingError(f"a batch at step {self.step} had fewer than 2 readable images")
        self.log.print(f"warning: skipping step {self.step}: fewer than 2 readable images")
        self.step += 1
        return False

    def _count_bad(self, bad: list[Unreadable], total: int) -> None:
        self.seen_images += total
        if not bad:
            return
        self.bad_images += len(bad)
        self.log.print(f"warning: skipped {len(bad)} unreadable image(s) at step {self.step} "
                       f"({self.bad_images} so far): {describe_unreadable(bad)}")
        if self.bad_images > self.cfg.data.max_bad_fraction * max(self.seen_images, 1) and \
                self.seen_images >= 100:
            raise TrainingError(f"{self.data}: {self.bad_images} of {self.seen_images} images "
                                f"could not be read (more than data.max_bad_fraction="
                                f"{self.cfg.data.max_bad_fraction}); fix the dataset")


def resume_config(out: str | Path, overrides: list[str]) -> Config:
    """The config saved in ``out/last.pth``, with command-line overrides applied on top."""
    last = Path(out) / "last.pth"
    if not last.exists():
        raise UserError(f"{last}: nothing to resume (no last.pth in the run directory)")
    cfg = config_from_dict(load_checkpoint(last)["config"], str(last))
    return apply_overrides(cfg, overrides)


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


def _as_random_state(state: Any) -> tuple:
    """``random.getstate()`` comes back from a checkpoint with lists where tuples were."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
