"""What a pretraining run does around its steps, one hook each (Detectron2's ``HookBase`` idea).

The ``Trainer`` loop only runs steps and ends epochs; everything else is a hook that can be
read, tested and switched on its own: the bad-image accounting (``BadImages``), the progress
log (``ProgressLog``), checkpoints (``PeriodicCheckpoint``), the kNN monitor (``KnnMonitor``),
the profiler (``Profile``), and, from ``pretrain/slurm.py``, the stop on a preemption signal.
Hooks run in the order they were registered; ``after_step`` sees the step's output in
``trainer.last_out``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Subset

from .data.folder import (
    check_same_classes,
    collate_labelled,
    describe_unreadable,
    image_folder,
    with_transform,
)
from .data.loader import Loader, available_cpus
from .data.views import eval_transform
from .errors import UserError
from .knn import extract_features, sharded_knn_accuracy
from .momentum_bn import bn_alpha, momentum_bn_modules
from .rundir import METRICS, trim_metrics

if TYPE_CHECKING:
    from .data.folder import Unreadable
    from .train import Trainer

#: The readable images a step needs (BatchNorm normalises over the batch); a batch with
#: fewer is not trained on, its step skipped (``BadImages`` says so).
MIN_READABLE = 2


class TrainingError(UserError):
    """The run cannot go on (non-finite loss, too many bad images); the last checkpoint stays."""


class HookBase:
    """A hook of the pretraining loop. ``trainer`` is set when the hook is registered."""

    trainer: Trainer

    def before_train(self) -> None:
        """Once per ``Trainer.run()``, before its first step."""

    def before_step(self, readable: int, bad: list[Unreadable]) -> None:
        """Before step ``trainer.step``, with its batch: ``readable`` images, and the ``bad``
        ones that could not be read (left out of the batch)."""

    def after_step(self) -> None:
        """After every training step (``trainer.step`` already counts it); not after a step
        skipped for want of ``MIN_READABLE`` readable images."""

    def after_epoch(self, epoch: int, final: bool) -> None:
        """After epoch ``epoch`` (1-based) ends; ``final`` at the run's last step."""

    def after_train(self) -> None:
        """Once per ``run()``, also when it fails (release what ``before_train`` took)."""


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


class BadImages(HookBase):
    """Unreadable images: counted (``trainer.bad_images`` of ``trainer.seen_images``) and
    named in a warning. The run stops when more than ``data.max_bad_fraction`` of the images
    seen (once there are 100) or all of an epoch's could not be read; a batch with fewer
    than ``MIN_READABLE`` readable images is skipped, and stops a run of several processes.

    Registered before the hooks that save, so that a run it stops saves nothing more.
    """

    def before_step(self, readable: int, bad: list[Unreadable]) -> None:
        t = self.trainer
        t.seen_images += readable + len(bad)
        if bad:
            t.bad_images += len(bad)
            t.log.print(f"warning: skipped {len(bad)} unreadable image(s) at step {t.step} "
                        f"({t.bad_images} so far): {describe_unreadable(bad)}")
            if t.bad_images > t.cfg.data.max_bad_fraction * max(t.seen_images, 1) and \
                    t.seen_images >= 100:
                raise TrainingError(f"{t.data}: {t.bad_images} of {t.seen_images} images "
                                    f"could not be read (more than data.max_bad_fraction="
                                    f"{t.cfg.data.max_bad_fraction}); fix the dataset")
        if readable < MIN_READABLE:
            if t.dist.world_size > 1:
                raise TrainingError(f"a batch at step {t.step} had fewer than 2 readable "
                                    f"images")
            t.log.print(f"warning: skipping step {t.step}: fewer than 2 readable images")

    def after_epoch(self, epoch: int, final: bool) -> None:
        t = self.trainer
        if t.seen_images and t.bad_images == t.seen_images:
            raise TrainingError(f"{t.data}: none of the {t.seen_images} images "
                                f"of an epoch could be read; fix the dataset")


class ProgressLog(HookBase):
    """The run's header, a metrics record and a progress line (speed, ETA) every
    ``train.log_every`` steps and at the last step of the run."""

    def before_train(self) -> None:
        t, cfg = self.trainer, self.trainer.cfg
        t.log.print(f"momentum2 pretrain: {cfg.model.method} {cfg.model.arch}, "
                    f"{len(t.dataset)} images, {t.per_epoch} steps/epoch, "
                    f"{t.total_steps} steps, batch {cfg.data.batch_size}×{t.dist.world_size}, "
                    f"lr {t.base_lr:.4g}, device {t.device}"
                    + (f", resuming at step {t.step}" if t.step else ""))
        if cfg.data.workers > available_cpus():
            t.log.print(f"warning: data.workers={cfg.data.workers} is more than the "
                        f"{available_cpus()} CPUs this process may use; loading may be slower "
                        f"than with data.workers={available_cpus()}")
        if t.feed.unreadable_at_start:
            t.log.print(f"warning: left out {len(t.feed.unreadable_at_start)} unreadable "
                        f"image(s) of the resident copy: "
                        f"{describe_unreadable(t.feed.unreadable_at_start)}")
        self.start_step, self.t0 = t.step, time.perf_counter()
        self.window_t, self.window_images = self.t0, 0

    def after_step(self) -> None:
        t, out = self.trainer, self.trainer.last_out
        if out.get("skipped"):
            t.log.print(f"warning: non-finite loss at step {t.step - 1}: step skipped "
                        f"({t.skipped_steps} so far)")
        self.window_images += t.last_batch * t.dist.world_size
        if t.step % t.cfg.train.log_every == 0 or t.step == t.stop_at:
            self._write(out)

    def _write(self, out: dict[str, Any]) -> None:
        t = self.trainer
        now = time.perf_counter()
        speed = self.window_images / max(now - self.window_t, 1e-9)
        eta = (now - self.t0) / max(t.step - self.start_step, 1) * (t.total_steps - t.step)
        record = {
            "step": t.step, "epoch": t.step / t.per_epoch,
            "loss": float(out["loss"].detach()), "byol_loss": float(out["byol_loss"]),
            "lr": out["lr"], "m": out["m"], "gap": float(out["gap"]),
            "img_per_s": speed, "bad_images": t.bad_images, "skipped_steps": t.skipped_steps,
        }
        if "residual_loss" in out:
            record["residual_loss"] = float(out["residual_loss"])
        if momentum_bn_modules(t.model.teacher):  # the α this step mixed with
            record["alpha"] = bn_alpha(t.step - 1, t.total_steps)
        t.log.write(record)
        alpha = f" α {record['alpha']:.4f}" if "alpha" in record else ""
        t.log.print(f"step {t.step}/{t.total_steps} ({100 * t.step / t.total_steps:.0f}%) "
                    f"loss {record['loss']:.4f} lr {record['lr']:.4g} m {record['m']:.5f}{alpha} "
                    f"gap {record['gap']:.4f} {speed:.1f} img/s eta {_fmt_time(eta)}")
        self.window_t, self.window_images = now, 0


class PeriodicCheckpoint(HookBase):
    """last.pth every ``train.save_every_steps`` steps and at every epoch's end; also
    ``epoch_NNNN.pth`` every ``train.save_every_epochs`` epochs and at the end."""

    def after_step(self) -> None:
        every = self.trainer.cfg.train.save_every_steps
        if every and self.trainer.step % every == 0:
            self.trainer.save()

    def after_epoch(self, epoch: int, final: bool) -> None:
        keep = final or epoch % self.trainer.cfg.train.save_every_epochs == 0
        self.trainer.save(epoch=epoch if keep else None)


class KnnMonitor(HookBase):
    """kNN top-1 of the teacher's and the student's backbone on ``--val``, with the training
    images as the memory bank (or ``train.knn_bank_per_class`` of each class), every
    ``train.knn_every_epochs`` epochs and at the end.

    Each rank extracts the features of its own shard of the bank and of the queries, on its
    device, and the shards are searched where they are and their answers merged
    (``knn.sharded_knn_accuracy``): the time of one evaluation falls with the ranks, and no
    rank holds the whole bank nor any query × bank matrix larger than ``train.knn_chunk_mb``.
    Built before the model, so that a bad ``--val`` is refused at once.
    """

    def __init__(self, train_folder: Any, data: str | Path, val: str | Path,
                 image_size: int, bank_per_class: int = 0) -> None:
        t = eval_transform(image_size)
        val_set = image_folder(val, t, "--val folder")
        check_same_classes(train_folder.classes, val_set.classes, data, val)
        self.train_set, self.val_set = with_transform(train_folder, t), val_set
        self.bank = bank_indices(train_folder.targets, bank_per_class)

    def after_epoch(self, epoch: int, final: bool) -> None:
        if not (final or epoch % self.trainer.cfg.train.knn_every_epochs == 0):
            return
        result = self.evaluate()
        self.trainer.log.write({"step": self.trainer.step, "epoch": epoch, **result})
        self.trainer.log.print("kNN top-1 " + ", ".join(f"{k[9:]} {v:.2f}%"
                                                        for k, v in result.items()))

    def evaluate(self) -> dict[str, float]:
        t = self.trainer
        cfg = t.cfg
        rank, world = t.dist.rank, t.dist.world_size

        def loader(ds: Any, indices: Any) -> Loader:
            if world > 1 or len(indices) != len(ds):
                ds = Subset(ds, indices)
            return Loader(ds, batch_size=256, num_workers=cfg.data.workers,
                          collate_fn=collate_labelled)

        bank = loader(self.train_set, self.bank[rank::world])
        queries = loader(self.val_set, range(rank, len(self.val_set), world))
        result = {}
        for branch in ("teacher", "student"):
            backbone = t.model.export_backbone(branch)
            tf, tl = extract_features(backbone, bank, t.device, report=False, on_device=True)
            vf, vl = extract_features(backbone, queries, t.device,
                                      report=t.dist.main and branch == "teacher",
                                      on_device=True)
            result[f"knn_top1_{branch}"] = sharded_knn_accuracy(
                tf, tl, vf, vl, len(self.train_set.classes), cfg.train.knn_k,
                cfg.train.knn_temperature, cfg.train.knn_chunk_mb << 20)
        return result


def bank_indices(targets: Sequence[int], per_class: int) -> Sequence[int]:
    """The kNN bank: every training image (``per_class`` 0), or the first ``per_class`` of each
    class in the folder's order (fixed across evaluations and runs)."""
    if per_class <= 0:
        return range(len(targets))
    taken: dict[int, int] = {}
    keep = []
    for i, label in enumerate(targets):
        label = int(label)
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return keep


class StopHook(HookBase):
    """After each step (as the trainer's last hook): the ranks agree on a signalled stop
    (:class:`jobs.stop.StopRequest`: SIGTERM, or the preemption signal under SLURM), and the
    trainer stops there, saving last.pth."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop

    def after_step(self) -> None:
        if self.stop.check():
            self.trainer.request_stop()


class Profile(HookBase):
    """A Chrome/TensorBoard trace of ``steps`` steps (after 2 warm-up steps) in RUN/profile."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.profiler: torch.profiler.profile | None = None

    def before_train(self) -> None:
        t = self.trainer
        if not t.dist.main:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if t.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=2, active=self.steps, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(t.out / "profile")),
            record_shapes=False)
        self.profiler.start()

    def after_step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def after_train(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
