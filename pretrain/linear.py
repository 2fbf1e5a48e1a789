"""The standard linear evaluation (SPEC §2): the protocol the Momentum² Teacher authors ran.

Their ``exps/arxiv/linear_eval_exp.py`` with ``linear_eval_exp_byol.py`` (the BYOL setting) and
``tools/eval.py``, transcribed:

- the backbone is frozen: eval mode (its BatchNorm normalises with its running statistics),
  no gradients; only the head trains;
- the head is ``Linear(d, classes)`` (weights N(0, 0.01), bias 0) **then** ``BatchNorm1d(classes)``
  (affine, batch statistics while training, per process);
- SGD, momentum 0.9, no weight decay, learning rate 0.2 × total batch / 256, half cosine to 0
  set per iteration (step k of K trains at lr · (1 + cos πk/K) / 2), 80 epochs;
- a total batch of 256 split over the ranks, each epoch's order a ``DistributedSampler``'s
  (shuffled, the last incomplete batch dropped);
- training images: RandomResizedCrop(s) (scale 0.08–1, bilinear) + horizontal flip; test
  images: Resize(round(s · 256/224)) + CenterCrop(s) (256 / 224 at s = 224), bilinear;
- scored on the test images after every epoch; **the best epoch's top-1** (and its top-5) is
  the number they report. Both the last and the best epoch are reported here.

Their files were read in the Spatial Ensemble repository (``tengteng95/Spatial_Ensemble``),
which carries them unchanged under the same author; the momentum2-teacher README runs the
same ``linear_eval_exp_byol.py``. Where this differs from their code, on purpose: every test
image is scored exactly once over the ranks and the counts summed (their
``DistributedSampler`` pads the test set and the ranks' mean accuracies are averaged); the
head has as many outputs as the folder has classes (theirs: 1000); at sizes other than 224
the resize is rounded (theirs truncates, in a later version; the same 256 at 224).

The run folder (``--out``) is self-describing as a pretraining run's is: ``config.yaml`` (the
recipe and the backbone it scores), ``metrics.jsonl`` and TensorBoard events, ``last.pth``
(saved at every epoch's end and when stopped, atomically) and ``results.json``. A resumed run
continues bit for bit: the head, the optimiser and the best epoch are in ``last.pth``, the
learning rate is a pure function of the step, each epoch's order a pure function of (seed,
epoch), and each image's augmentation is drawn from RNGs seeded by (seed, epoch, index).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision.transforms as T
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from jobs.atomic import write_json, write_text

from .checkpoint import save_atomic
from .data.folder import (
    LabelledImages,
    check_same_classes,
    collate_labelled,
    describe_unreadable,
    image_folder,
    quiet_decoding,
)
from .data.loader import Loader, ResumableDistributedSampler
from .data.views import IMAGENET_MEAN, IMAGENET_STD
from .distributed import Dist, check_same_listing
from .errors import UserError, first_line
from .hooks import RunLog
from .rundir import CONFIG, check_fresh
from .schedules import cosine_schedule, scaled_lr

FORMAT = "momentum2-linear"
VERSION = 1
#: Which epoch the Momentum² Teacher paper and its code report: the best one.
PAPER_REPORTS = "best"
PAPER_NOTE = ("the Momentum² Teacher paper reports the best epoch (its tools/eval.py keeps "
              "the best evaluation's top-1 and that epoch's top-5)")


@dataclass(frozen=True)
class Recipe:
    """The settings of a standard linear evaluation; the defaults are the authors'.

    ``workers`` and ``log_every`` change no number and may differ when a run resumes.
    """

    epochs: int = 80
    base_lr: float = 0.2  # per 256 images: lr = base_lr × batch_size / 256
    batch_size: int = 256  # the total over every rank
    momentum: float = 0.9
    weight_decay: float = 0.0
    head_bn: bool = True  # BatchNorm1d after the Linear layer
    image_size: int = 224
    seed: int = 0
    workers: int = 4
    log_every: int = 50

    #: what may change when a run resumes
    RESUMABLE = ("workers", "log_every")

    @property
    def lr(self) -> float:
        """The rate at step 0: ``base_lr`` scaled by the total batch (linear scaling rule)."""
        return scaled_lr(self.base_lr, self.batch_size)

    def per_rank_batch(self, world_size: int) -> int:
        if self.batch_size % world_size:
            raise UserError(f"--batch-size {self.batch_size} is not divisible by the "
                            f"{world_size} processes; the total batch is split evenly over them")
        return self.batch_size // world_size


def format_duration(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def lr_at(step: int, total_steps: int, lr: float) -> float:
    """The rate of step ``step`` (0-based) of ``total_steps``: ``lr · (1 + cos π step/K) / 2``,
    the authors' ``adjust_learning_rate_iter`` ("cos"), set per iteration.

    >>> [lr_at(k, 4, 0.2) for k in (0, 2, 4)]
    [0.2, 0.1, 0.0]
    """
    return cosine_schedule(step, total_steps, lr, 0.0)


def train_transform(image_size: int) -> T.Compose:
    """RandomResizedCrop (scale 0.08–1, bilinear) → horizontal flip → normalise."""
    return T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0),
                                          interpolation=T.InterpolationMode.BILINEAR),
                      T.RandomHorizontalFlip(p=0.5), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def val_short_side(image_size: int) -> int:
    """The short side test images are resized to: 256 for 224, in that ratio for others."""
    return int(round(image_size * 256 / 224))


def val_transform(image_size: int) -> T.Compose:
    """Resize the short side to :func:`val_short_side` → centre crop → normalise (bilinear)."""
    return T.Compose([T.Resize(val_short_side(image_size),
                               interpolation=T.InterpolationMode.BILINEAR),
                      T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class LinearHead(nn.Sequential):
    """``Linear(dim, classes)`` then ``BatchNorm1d(classes)`` (affine), as the authors' head;
    ``bn=False``: the Linear layer alone. Linear weights N(0, 0.01), bias 0."""

    def __init__(self, dim: int, classes: int, bn: bool = True) -> None:
        linear = nn.Linear(dim, classes)
        nn.init.normal_(linear.weight, 0.0, 0.01)
        nn.init.zeros_(linear.bias)
        super().__init__(linear, *([nn.BatchNorm1d(classes)] if bn else []))


@dataclass
class Score:
    """Top-1 / top-5 (percent) of one epoch."""

    epoch: int
    top1: float
    top5: float


def better(best: Score | None, score: Score) -> Score:
    """The best epoch so far after ``score``: a higher top-1 replaces it, a tie keeps the
    earlier epoch (the authors' ``eval_top1 > best_top1``); its top-5 is the same epoch's."""
    return score if best is None or score.top1 > best.top1 else best


class SeededImages(Dataset):
    """``(image, label)`` of a labelled folder, each image's random transform drawn from RNGs
    seeded by (seed, epoch, index): the same crop whatever the worker count, the rank count or
    where a run resumed. Unreadable images come back as :class:`~.data.folder.Unreadable`."""

    def __init__(self, folder: LabelledImages, seed: int) -> None:
        self.folder, self.seed, self.epoch = folder, seed, 0

    def __len__(self) -> int:
        return len(self.folder)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> Any:
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        random.seed(sample_seed)
        torch.manual_seed(sample_seed % (2**63))
        with quiet_decoding():
            return self.folder[index]


@dataclass
class Source:
    """The backbone a linear evaluation scores, as ``config.yaml`` records it."""

    checkpoint: str  # a path, or "random"
    branch: str
    step: int
    arch: str = ""


@dataclass
class Outcome:
    """How a run of :meth:`LinearEval.run` ended."""

    step: int
    total_steps: int
    last: Score | None
    best: Score | None
    history: list[Score] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def as_dict(self) -> dict[str, Any]:
        return {"protocol": "standard", "step": self.step, "total_steps": self.total_steps,
                "last": asdict(self.last) if self.last else None,
                "best": asdict(self.best) if self.best else None,
                "reported": PAPER_REPORTS, "note": PAPER_NOTE}


class LinearEval:
    """One standard linear evaluation of a frozen ``backbone``, in the run folder ``out``.

    ``dist``/``device``: this process's (``distributed.start_process``). ``resume``: continue
    ``out/last.pth`` (a fresh start when there is none). ``stop_after`` N: stop after N steps
    of this invocation, with last.pth saved; ``should_stop``: asked after every step (a
    collective under several ranks: every rank asks), e.g. a preemption signal.
    """

    def __init__(self, backbone: nn.Module, train_dir: str | Path, val_dir: str | Path,
                 out: str | Path, recipe: Recipe, source: Source, dist_: Dist,
                 device: torch.device, resume: bool = False, stop_after: int = 0,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.recipe, self.source, self.dist, self.device = recipe, source, dist_, device
        self.out = Path(out)
        self.stop_after, self.should_stop = stop_after, should_stop
        self.per_rank = recipe.per_rank_batch(dist_.world_size)
        train = image_folder(train_dir, train_transform(recipe.image_size), "--train")
        val = image_folder(val_dir, val_transform(recipe.image_size), "--val")
        check_same_classes(train.classes, val.classes, train_dir, val_dir)
        check_same_listing(train.samples, train_dir, device)
        check_same_listing(val.samples, val_dir, device)
        self.train_dir, self.classes = train_dir, len(train.classes)
        self.train_set = SeededImages(train, recipe.seed)
        self.val_set = val
        self.per_epoch = len(train) // dist_.world_size // self.per_rank
        if self.per_epoch < 1:
            raise UserError(f"{train_dir}: {len(train)} images are fewer than one batch of "
                            f"{self.per_rank} per process × {dist_.world_size} processes "
                            f"(--batch-size {recipe.batch_size})")
        self.total_steps = recipe.epochs * self.per_epoch
        self.config_text = OmegaConf.to_yaml({"recipe": asdict(recipe),
                                              "backbone": asdict(source)})
        ckpt = self._load(resume)
        if ckpt is None:
            check_fresh(self.out, self.config_text)

        self.backbone = backbone.to(device).eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        torch.manual_seed(recipe.seed)
        self.head = LinearHead(self.feature_dim(), self.classes, recipe.head_bn).to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=recipe.lr,
                                         momentum=recipe.momentum,
                                         weight_decay=recipe.weight_decay)
        self.step, self.best, self.history = 0, None, []
        if ckpt is not None:
            self._restore(ckpt)
        self.ddp: nn.Module = self.head
        if dist_.world_size > 1:
            self.ddp = DistributedDataParallel(
                self.head, device_ids=[device.index] if device.type == "cuda" else None)

    # ----- state ----------------------------------------------------------------------------
    def feature_dim(self) -> int:
        size = self.recipe.image_size
        with torch.no_grad():
            return int(self.backbone(torch.zeros(1, 3, size, size, device=self.device)).shape[1])

    def _load(self, resume: bool) -> dict[str, Any] | None:
        path = self.out / "last.pth"
        if not (resume and path.exists()):
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} checkpoint")
        except (OSError, RuntimeError, ValueError, AttributeError, EOFError) as exc:
            raise UserError(f"{path}: cannot resume from it ({first_line(exc, 200)}); remove "
                            f"it to start afresh") from None
        saved = dict(ckpt["recipe"])
        now = asdict(self.recipe)
        differ = [f"{k} {saved.get(k)} → {now[k]}" for k in now
                  if k not in Recipe.RESUMABLE and saved.get(k) != now[k]]
        if differ or ckpt["source"] != asdict(self.source):
            what = "; ".join(differ) or f"backbone {ckpt['source']} → {asdict(self.source)}"
            raise UserError(f"{path}: --resume with other settings than the run's ({what}); "
                            f"give the same, or another --out")
        return ckpt

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.head.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.history = [Score(**s) for s in ckpt["history"]]
        self.best = Score(**ckpt["best"]) if ckpt["best"] else None

    def save(self) -> None:
        """last.pth: the head, the optimiser, the step and the scores so far (rank 0)."""
        if not self.dist.main:
            return
        save_atomic({"format": FORMAT, "version": VERSION, "recipe": asdict(self.recipe),
                     "source": asdict(self.source), "step": self.step,
                     "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "history": [asdict(s) for s in self.history],
                     "best": asdict(self.best) if self.best else None}, self.out / "last.pth")

    # ----- the loop ---------------------------------------------------------------------
    def run(self) -> Outcome:
        """Train from ``self.step`` to the end, or ``stop_after`` steps further."""
        r = self.recipe
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / CONFIG, self.config_text, if_changed=True)
        self.log = RunLog(self.out, self.dist.main, self.step)
        stop_at = min(self.total_steps, self.step + self.stop_after) if self.stop_after \
            else self.total_steps
        self.log.print(f"momentum2 linear (standard protocol): {self.source.branch} backbone of "
                       f"{self.source.checkpoint}, {len(self.train_set)} training images, "
                       f"{self.classes} classes, {self.per_epoch} steps/epoch, "
                       f"{self.total_steps} steps, batch {self.per_rank}×{self.dist.world_size}, "
                       f"lr {r.lr:.4g}, head Linear{' → BN1d' if r.head_bn else ''}, "
                       f"device {self.device}"
                       + (f", resuming at step {self.step}" if self.step else ""))
        t0, start = time.perf_counter(), self.step
        window_t, window_n = t0, 0
        try:
            while self.step < stop_at:
                epoch, first = divmod(self.step, self.per_epoch)
                stopped = False
                self.head.train()
                for images, labels in self._batches(epoch, first):
                    loss, lr = self.train_step(images, labels)
                    self.step += 1
                    window_n += len(images) * self.dist.world_size
                    end = self.step % self.per_epoch == 0
                    if self.step % r.log_every == 0 or end or self.step == stop_at:
                        now = time.perf_counter()
                        speed = window_n / max(now - window_t, 1e-9)
                        eta = (now - t0) / (self.step - start) * (self.total_steps - self.step)
                        self._log_step(epoch, float(loss), lr, speed, eta)
                        window_t, window_n = now, 0
                    stopped = self.should_stop is not None and self.should_stop()
                    if end or self.step >= stop_at or stopped:
                        break
                if self.step % self.per_epoch == 0:
                    self.end_epoch(self.step // self.per_epoch)
                if stopped:
                    break
            if self.step % self.per_epoch:
                self.save()  # stopped mid-epoch (an epoch's end saves at once)
        finally:
            self.log.close()
        outcome = Outcome(self.step, self.total_steps, self.history[-1] if self.history else None,
                          self.best, list(self.history))
        if self.dist.main and outcome.finished:
            write_json(self.out / "results.json", outcome.as_dict())
        return outcome

    def _log_step(self, epoch: int, loss: float, lr: float, speed: float, eta: float) -> None:
        self.log.write({"step": self.step, "epoch": self.step / self.per_epoch, "loss": loss,
                        "lr": lr, "img_per_s": speed})
        self.log.print(f"linear step {self.step}/{self.total_steps} "
                       f"({100 * self.step / self.total_steps:.0f}%) epoch {epoch + 1}/"
                       f"{self.recipe.epochs} loss {loss:.4f} lr {lr:.4g} {speed:.1f} img/s "
                       f"eta {format_duration(eta)}")

    def _batches(self, epoch: int, first: int) -> Any:
        """This rank's batches of ``epoch`` after ``first`` of them: (images, labels)."""
        sampler = ResumableDistributedSampler(self.train_set, num_replicas=self.dist.world_size,
                                              rank=self.dist.rank, shuffle=True,
                                              seed=self.recipe.seed, drop_last=True)
        sampler.set_epoch(epoch)
        sampler.start_index = first * self.per_rank
        self.train_set.set_epoch(epoch)
        loader = Loader(self.train_set, batch_size=self.per_rank, sampler=sampler,
                        num_workers=self.recipe.workers, collate_fn=collate_labelled,
                        drop_last=True, pin_memory=self.device.type == "cuda")
        for images, labels, bad in loader:
            if bad:
                self.log.print(f"warning: skipped {len(bad)} unreadable image(s) at step "
                               f"{self.step}: {describe_unreadable(bad)}")
            if len(images) < 2 and self.recipe.head_bn:
                raise UserError(f"{self.train_dir}: a batch at step {self.step} had fewer than 2 "
                                f"readable images (BatchNorm needs 2); fix the dataset")
            yield images, labels

    def train_step(self, images: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One SGD step of the head at ``lr_at(self.step)``; the loss and the rate."""
        lr = lr_at(self.step, self.total_steps, self.recipe.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            feats = self.backbone(images.to(self.device, non_blocking=True)).float()
        loss = nn.functional.cross_entropy(self.ddp(feats), labels.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), lr

    def end_epoch(self, epoch: int) -> None:
        """Score the test images, keep the best epoch, log, save last.pth."""
        if self.dist.world_size > 1:  # every rank scores with rank 0's BN statistics (DDP's
            for buffer in self.head.buffers():  # at each forward), as saved in last.pth
                dist.broadcast(buffer, 0)
        top1, top5 = self.evaluate()
        score = Score(epoch, top1, top5)
        self.history.append(score)
        self.best = better(self.best, score)
        self.log.write({"step": self.step, "epoch": epoch, "linear_top1": top1,
                        "linear_top5": top5, "best_top1": self.best.top1,
                        "best_top5": self.best.top5, "best_epoch": self.best.epoch})
        self.log.print(f"linear epoch {epoch}/{self.recipe.epochs}: top-1 {top1:.2f} top-5 "
                       f"{top5:.2f} (best: top-1 {self.best.top1:.2f} at epoch "
                       f"{self.best.epoch})")
        self.save()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Top-1 and top-5 (percent) over every readable test image; each rank scores every
        world-th image and the counts are summed."""
        self.head.eval()
        rank, world = self.dist.rank, self.dist.world_size
        shard = Subset(self.val_set, range(rank, len(self.val_set), world))
        loader = Loader(shard, batch_size=256, num_workers=self.recipe.workers,
                        collate_fn=collate_labelled)
        counts = torch.zeros(3, dtype=torch.float64)
        unreadable = []
        for images, labels, bad in loader:
            unreadable += bad
            if len(images) == 0:
                continue
            logits = self.head(self.backbone(images.to(self.device)).float()).cpu()
            top = logits.topk(min(5, self.classes), dim=1).indices
            counts += torch.tensor([(top[:, 0] == labels).sum().item(),
                                    (top == labels[:, None]).any(1).sum().item(), len(labels)],
                                   dtype=torch.float64)
        self.head.train()
        if unreadable and self.dist.main:
            self.log.print(f"warning: left out {len(unreadable)} unreadable test image(s): "
                           f"{describe_unreadable(unreadable)}")
        if world > 1:
            counts = counts.to(self.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        if counts[2] == 0:
            raise UserError("none of the --val images could be read")
        return (100.0 * counts[0] / counts[2]).item(), (100.0 * counts[1] / counts[2]).item()


def summary(outcome: Outcome) -> dict[str, Any]:
    """The row ``m2t-pretrain linear`` prints and appends to the pretraining run's metrics."""
    row: dict[str, Any] = {"linear_top1_last": None, "linear_top5_last": None}
    if outcome.last:
        row.update(linear_top1_last=outcome.last.top1, linear_top5_last=outcome.last.top5)
    if outcome.best:
        row.update(linear_top1_best=outcome.best.top1, linear_top5_best=outcome.best.top5,
                   best_epoch=outcome.best.epoch)
    row["reported"] = PAPER_REPORTS
    return row


# ----- the command ------------------------------------------------------------------------
def out_dirs(run: str, branches: list[str], out: str | None) -> list[Path]:
    """Each branch's run folder: ``--out`` (``--out/BRANCH`` for several branches), or
    ``RUN/linear_BRANCH`` beside a pretraining run's checkpoint."""
    if out is not None:
        return [Path(out)] if len(branches) == 1 else [Path(out) / b for b in branches]
    if run == "random":
        raise UserError("--out is needed to evaluate 'random' with --protocol standard (the "
                        "folder for its config, metrics and checkpoint)")
    from .evaluate import checkpoint_path

    return [checkpoint_path(run).parent / f"linear_{b}" for b in branches]


def evaluate_backbones(run: str, branches: list[str], train: str, val: str,
                       outs: list[Path], recipe: Recipe, device: str, arch: str = "resnet18",
                       resume: bool = False, stop_after: int = 0,
                       should_stop: Callable[[], bool] | None = None
                       ) -> tuple[list[dict[str, Any]], Dist]:
    """The standard linear evaluation of each branch of ``run`` (a run folder, a checkpoint or
    "random"), one after another, each in its folder of ``outs``; one row per branch (the
    pretraining run's step, the last and the best epoch's scores) and this process's Dist.

    ``recipe.image_size`` 0: the pretraining run's ``data.image_size`` (32 for "random")."""
    from .distributed import check_device, start_process
    from .evaluate import load_backbone, random_backbone
    from .rundir import check_out

    check_device(device, "--device ")
    for out in outs:
        check_out(out, train, val)
    d, dev = start_process(device)
    rows = []
    for branch, out in zip(branches, outs, strict=True):
        if run == "random":
            backbone, source = random_backbone(arch), Source("random", "random", 0, arch)
            size = recipe.image_size or 32
        else:
            backbone, info = load_backbone(run, branch)
            source = Source(os.path.abspath(info["path"]), branch, info["step"])
            size = recipe.image_size or info["config"].data.image_size
        ev = LinearEval(backbone, train, val, out, replace(recipe, image_size=size), source,
                        d, dev, resume=resume, stop_after=stop_after, should_stop=should_stop)
        outcome = ev.run()
        rows.append({"eval": "linear", "protocol": "standard", "branch": source.branch,
                     "step": source.step, "out": str(out), "finished": outcome.finished,
                     "linear_step": outcome.step, "linear_steps": outcome.total_steps,
                     **summary(outcome)})
        if not outcome.finished:
            break  # stopped: the next branch waits for the resume
    return rows, d


COLUMNS = ["branch", "step", "linear_top1_last", "linear_top5_last", "linear_top1_best",
           "linear_top5_best", "best_epoch"]


def recipe_of(args: Any) -> Recipe:
    """The recipe the ``linear --protocol standard`` flags ask for (unset: the authors')."""
    d = Recipe()
    return Recipe(epochs=args.epochs or d.epochs, base_lr=args.lr or d.base_lr,
                  batch_size=args.batch_size, head_bn=not args.no_bn,
                  image_size=args.image_size or 0, seed=args.seed, workers=args.workers,
                  log_every=args.log_every)


def report(run: str, rows: list[dict[str, Any]]) -> None:
    """Print the table and the epoch the paper reports; append finished rows to the
    pretraining run's metrics.jsonl."""
    from .evaluate import append_metrics, format_table

    print(format_table(rows, COLUMNS))
    print(f"reported: {PAPER_NOTE}; the last epoch is beside it")
    for row in rows:
        if not row["finished"]:
            print(f"{row['branch']}: stopped at step {row['linear_step']}/{row['linear_steps']}"
                  f"; continue with --resume (--out {row['out']})")
        elif run != "random":
            append_metrics(run, {k: v for k, v in row.items() if k != "finished"})
