"""The pretraining loop: one process per device, DDP on the student only (SPEC §1.6)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.rendezvous import rendezvous
from torch.nn.parallel import DistributedDataParallel

from .augment import TwoViews, eval_transform
from .checkpoint import FORMAT, VERSION, load_checkpoint, remove_partial_saves, save_atomic
from .config import Config, apply_overrides, config_from_dict
from .data import (
    Loader,
    TwoViewDataset,
    Unreadable,
    available_cpus,
    check_same_classes,
    collate_labelled,
    describe_unreadable,
    image_folder,
    steps_per_epoch,
    total_steps_for,
    with_transform,
)
from .errors import UserError
from .feed import Feed
from .knn import extract_features, knn_accuracy
from .lars import LARS, split_bn_and_bias
from .methods import StudentTeacher, build_method
from .momentum_bn import bn_alpha, momentum_bn_modules
from .rundir import CONFIG, METRICS, check_fresh, check_out, trim_metrics, write_atomic
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


class RunLog:
    """metrics.jsonl + TensorBoard events + progress lines, written by rank 0 only.

    A run that starts at ``step`` (resumed, or restarted before its first checkpoint) first
    drops what an earlier attempt logged after that step: it logs those steps again.
    """

    def __init__(self, out: Path, enabled: bool, step: int = 0) -> None:
        self.enabled = enabled
        self.tb = None
        if enabled:
            dropped = trim_metrics(out / METRICS, step)
            if dropped:
                print(f"{out / METRICS}: dropped {dropped} record(s) logged after step {step} "
                      f"by the attempt that stopped; this run logs those steps again",
                      flush=True)
            self.metrics = open(out / METRICS, "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter
                again = (out / "tb").exists()  # hide the events of the steps logged again
                self.tb = SummaryWriter(str(out / "tb"), purge_step=step + 1 if again else None)
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            if self.tb is not None:
                self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Everything a pretraining run holds; ``run()`` trains until K steps or ``stop_after``."""

    def __init__(self, cfg: Config, data: str | Path, out: str | Path, val: str | None = None,
                 resume: bool = False, stop_after: int = 0, profile_steps: int = 0) -> None:
        self.out = Path(out)
        self.data, self.val = data, val
        self.stop_after = stop_after
        self.profile_steps = profile_steps
        # asked after every step (by every rank, in step): True ends the run there, with
        # last.pth saved, as stop_after does (pretrain/slurm.py: preemption, time limit)
        self.stop_requested: Callable[[], bool] | None = None
        check_out(self.out, data, val)
        ckpt = None
        last = self.out / "last.pth"
        if resume:
            if not last.exists():
                raise UserError(f"{last}: nothing to resume (no last.pth in the run directory)")
            ckpt = load_checkpoint(last)
            saved = config_from_dict(ckpt["config"], str(last))
            if saved.model != cfg.model:
                raise UserError(f"{last}: the model settings differ from the checkpoint's; "
                                f"resume with the saved config (see {self.out / 'config.yaml'})")
        else:
            check_fresh(self.out, cfg.dump())
        self.cfg = cfg
        check_device(cfg.train.device)
        self.dist = init_distributed("cuda" if cfg.train.device == "cuda" or (
            cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.device = resolve_device(cfg.train.device, self.dist)

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.dataset = TwoViewDataset(data, TwoViews(cfg.data.image_size, cfg.data.min_scale),
                                      seed=cfg.train.seed)
        self.feed = Feed(cfg, self.dataset, self.device, self.dist.main)
        self.per_epoch = steps_per_epoch(self.feed.num_images, cfg.data.batch_size,
                                         self.dist.world_size)
        if self.per_epoch < 1:
            raise UserError(f"{data}: {self.feed.num_images} images are fewer than one batch of "
                            f"{cfg.data.batch_size} per process × {self.dist.world_size} processes")
        self.knn_sets = self._knn_sets() if val is not None else None  # --val checked now
        self.total_steps, self.epochs = total_steps_for(cfg.train.epochs, cfg.train.steps,
                                                        self.per_epoch)
        self.total_batch = cfg.data.batch_size * self.dist.world_size
        self.base_lr = scaled_lr(cfg.optim.base_lr, self.total_batch)
        self.warmup_steps = min(int(round(cfg.optim.warmup_epochs * self.per_epoch)),
                                self.total_steps)

        self.model: StudentTeacher = build_method(cfg, self.total_steps).to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model.student, self.base_lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.amp == "fp16")
        self.step = 0
        self.saved_step: int | None = None  # the step last.pth holds, once known
        if ckpt is not None:
            self._restore(ckpt, last)
            self.saved_step = self.step
        self.student: nn.Module = self.model.student
        if self.dist.world_size > 1:
            self.student = DistributedDataParallel(
                self.model.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.student = torch.compile(self.student)
        self.bad_images = 0
        self.seen_images = 0
        self.skipped_steps = 0

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
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"{path}: checkpoint does not fit this model: {first}") from None
        try:
            torch.set_rng_state(ckpt["rng"]["torch"])
            random.setstate(_as_random_state(ckpt["rng"]["python"]))
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
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
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
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

    # ----- monitoring -------------------------------------------------------------------
    def _knn_sets(self) -> tuple[Any, Any]:
        """The kNN monitor's memory bank (the training images) and ``--val``, checked."""
        t = eval_transform(self.cfg.data.image_size)
        val_set = image_folder(self.val, t, "--val folder")
        check_same_classes(self.dataset.folder.classes, val_set.classes, self.data, self.val)
        return with_transform(self.dataset.folder, t), val_set

    def knn(self) -> dict[str, float]:
        if self.knn_sets is None:
            return {}
        train_set, val_set = self.knn_sets

        def loader(ds):
            return Loader(ds, batch_size=256, num_workers=self.cfg.data.workers,
                          collate_fn=collate_labelled)

        result = {}
        for branch in ("teacher", "student"):
            backbone = self.model.export_backbone(branch)
            tf, tl = extract_features(backbone, loader(train_set), self.device, report=False)
            vf, vl = extract_features(backbone, loader(val_set), self.device,
                                      report=self.dist.main and branch == "teacher")
            result[f"knn_top1_{branch}"] = knn_accuracy(
                tf, tl, vf, vl, len(train_set.classes), self.cfg.train.knn_k,
                self.cfg.train.knn_temperature)
        return result

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
        statistics: list[torch.Tensor] = []
        if self.cfg.train.nonfinite == "skip":  # a skipped step must leave no BN statistics
            statistics = [b for b in self.model.buffers() if b.is_floating_point()]
            before = [b.detach().clone() for b in statistics]
        with self._autocast():
            out = self.model(v1, v2, student=self.student)
        loss = out["loss"]
        if not torch.isfinite(loss):
            if self.cfg.train.nonfinite == "stop":
                raise TrainingError(f"loss is {loss.item()} at step {self.step}; stopping. The "
                                    f"last checkpoint in {self.out} is from before this step "
                                    f"(train.nonfinite=skip skips such steps instead)")
            with torch.no_grad():
                torch._foreach_copy_(statistics, before)
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
        cfg = self.cfg
        if self.dist.main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                write_atomic(self.out / CONFIG, cfg.dump().encode())
            except OSError as exc:
                raise UserError(f"{self.out}: cannot write the run directory "
                                f"({exc.strerror or exc})") from None
            for partial in remove_partial_saves(self.out):
                print(f"removed {partial.name}: a checkpoint save that was interrupted",
                      flush=True)
        log = RunLog(self.out, self.dist.main, self.step)
        log.print(f"momentum2 pretrain: {cfg.model.method} {cfg.model.arch}, "
                  f"{len(self.dataset)} images, {self.per_epoch} steps/epoch, "
                  f"{self.total_steps} steps, batch {cfg.data.batch_size}×{self.dist.world_size}, "
                  f"lr {self.base_lr:.4g}, device {self.device}"
                  + (f", resuming at step {self.step}" if self.step else ""))
        if cfg.data.workers > available_cpus():
            log.print(f"warning: data.workers={cfg.data.workers} is more than the "
                      f"{available_cpus()} CPUs this process may use; loading may be slower "
                      f"than with data.workers={available_cpus()}")
        if self.feed.unreadable_at_start:
            log.print(f"warning: left out {len(self.feed.unreadable_at_start)} unreadable "
                      f"image(s) of the resident copy: "
                      f"{describe_unreadable(self.feed.unreadable_at_start)}")
        self.model.train()
        start_step, t0 = self.step, time.perf_counter()
        window_t, window_images = t0, 0
        stop_at = min(self.total_steps, self.step + self.stop_after) if self.stop_after else self.total_steps
        profiler = self._profiler()
        try:
            while self.step < stop_at:
                epoch = self.step // self.per_epoch
                loader = self.feed.batches(self.dist.rank, self.dist.world_size, epoch,
                                           self.step % self.per_epoch)
                for v1, v2, bad in loader:
                    self._count_bad(bad, len(v1) + len(bad), log)
                    if len(v1) < 2:
                        if self.dist.world_size > 1:
                            raise TrainingError(f"a batch at step {self.step} had fewer than 2 "
                                                f"readable images")
                        log.print(f"warning: skipping step {self.step}: fewer than 2 readable images")
                        self.step += 1
                        continue
                    out = self.train_step(v1, v2)
                    if out.get("skipped"):
                        log.print(f"warning: non-finite loss at step {self.step - 1}: step "
                                  f"skipped ({self.skipped_steps} so far)")
                    if profiler is not None:
                        profiler.step()
                    window_images += len(v1) * self.dist.world_size
                    if self.step % cfg.train.log_every == 0 or self.step == stop_at:
                        window_t, window_images = self._log(out, log, window_t, window_images,
                                                            start_step, t0)
                    if cfg.train.save_every_steps and self.step % cfg.train.save_every_steps == 0:
                        self.save()
                    if self.stop_requested is not None and self.stop_requested():
                        stop_at = self.step
                    if self.step >= stop_at or self.step % self.per_epoch == 0:
                        break
                if self.step % self.per_epoch == 0 or self.step >= self.total_steps:
                    if self.seen_images and self.bad_images == self.seen_images:
                        raise TrainingError(f"{self.data}: none of the {self.seen_images} images "
                                            f"of an epoch could be read; fix the dataset")
                    done_epoch = math.ceil(self.step / self.per_epoch)
                    final = self.step >= self.total_steps
                    keep = final or done_epoch % cfg.train.save_every_epochs == 0
                    self.save(epoch=done_epoch if keep else None)
                    if self.val and (final or done_epoch % cfg.train.knn_every_epochs == 0):
                        res = self.knn()
                        log.write({"step": self.step, "epoch": done_epoch, **res})
                        log.print("kNN top-1 " + ", ".join(f"{k[9:]} {v:.2f}%" for k, v in res.items()))
            self.save()
        finally:
            if profiler is not None:
                profiler.stop()
            log.close()
        return self.out / "last.pth"

    def _profiler(self) -> torch.profiler.profile | None:
        """A profiler that writes a Chrome/TensorBoard trace of ``profile_steps`` steps."""
        if not self.profile_steps or not self.dist.main:
            return None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        trace_dir = self.out / "profile"
        prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=2, active=self.profile_steps, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
            record_shapes=False)
        prof.start()
        return prof

    def _count_bad(self, bad: list[Unreadable], total: int, log: RunLog) -> None:
        self.seen_images += total
        if not bad:
            return
        self.bad_images += len(bad)
        log.print(f"warning: skipped {len(bad)} unreadable image(s) at step {self.step} "
                  f"({self.bad_images} so far): {describe_unreadable(bad)}")
        if self.bad_images > self.cfg.data.max_bad_fraction * max(self.seen_images, 1) and \
                self.seen_images >= 100:
            raise TrainingError(f"{self.data}: {self.bad_images} of {self.seen_images} images "
                                f"could not be read (more than data.max_bad_fraction="
                                f"{self.cfg.data.max_bad_fraction}); fix the dataset")

    def _log(self, out: dict[str, Any], log: RunLog, window_t: float, window_images: int,
             start_step: int, t0: float) -> tuple[float, int]:
        now = time.perf_counter()
        speed = window_images / max(now - window_t, 1e-9)
        per_step = (now - t0) / max(self.step - start_step, 1)
        eta = per_step * (self.total_steps - self.step)
        record = {
            "step": self.step, "epoch": self.step / self.per_epoch,
            "loss": float(out["loss"].detach()), "byol_loss": float(out["byol_loss"]),
            "lr": out["lr"], "m": out["m"], "gap": float(out["gap"]),
            "img_per_s": speed, "bad_images": self.bad_images,
            "skipped_steps": self.skipped_steps,
        }
        if "residual_loss" in out:
            record["residual_loss"] = float(out["residual_loss"])
        if momentum_bn_modules(self.model.teacher):  # the α this step mixed with
            record["alpha"] = bn_alpha(self.step - 1, self.total_steps)
        log.write(record)
        alpha = f" α {record['alpha']:.4f}" if "alpha" in record else ""
        log.print(f"step {self.step}/{self.total_steps} ({100 * self.step / self.total_steps:.0f}%) "
                  f"loss {record['loss']:.4f} lr {record['lr']:.4g} m {record['m']:.5f}{alpha} "
                  f"gap {record['gap']:.4f} {speed:.1f} img/s eta {_fmt_time(eta)}")
        return now, 0


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


def _as_random_state(state: Any) -> tuple:
    """``random.getstate()`` comes back from a checkpoint with lists where tuples were."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
