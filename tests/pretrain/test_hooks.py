"""The pretraining loop's hooks (pretrain/hooks.py): when they run, and that each can be
switched off or added on its own."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain.checkpoint import load_checkpoint
from pretrain.config import load_config
from pretrain.data.folder import Unreadable
from pretrain.distributed import Dist
from pretrain.hooks import (
    BadImages,
    HookBase,
    KnnMonitor,
    PeriodicCheckpoint,
    ProgressLog,
    TrainingError,
)
from pretrain.train import Trainer

from .conftest import TINY

#: 64 images at batch 16: 4 steps per epoch, 2 epochs
TWO_EPOCHS = [*TINY, "data.batch_size=16", "train.epochs=2", "train.device=cpu"]


class Recorder(HookBase):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before_train(self) -> None:
        self.events.append(("before_train", self.trainer.step))

    def before_step(self, readable: int, bad: list) -> None:
        self.events.append(("before_step", self.trainer.step, readable, len(bad)))

    def after_step(self) -> None:
        self.events.append(("after_step", self.trainer.step))

    def after_epoch(self, epoch: int, final: bool) -> None:
        self.events.append(("after_epoch", epoch, final))

    def after_train(self) -> None:
        self.events.append(("after_train", self.trainer.step))


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_hooks_see_every_step_and_epoch_in_order(tiny_train: Path, tmp_path: Path) -> None:
    trainer = Trainer(load_config(None, TWO_EPOCHS), tiny_train, tmp_path / "run")
    recorder = Recorder()
    trainer.register_hooks([recorder])
    trainer.run()
    def step(k: int) -> list[tuple]:  # the step counted once, between the two events
        return [("before_step", k - 1, 16, 0), ("after_step", k)]

    expected = [("before_train", 0),
                *[e for k in (1, 2, 3, 4) for e in step(k)], ("after_epoch", 1, False),
                *[e for k in (5, 6, 7, 8) for e in step(k)], ("after_epoch", 2, True),
                ("after_train", 8)]
    assert recorder.events == expected
    assert [type(h).__name__ for h in trainer.hooks] == ["BadImages", "ProgressLog",
                                                         "PeriodicCheckpoint", "Recorder"]


def test_without_the_checkpoint_hook_only_the_final_last_pth_is_written(
        tiny_train: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, [*TWO_EPOCHS, "train.save_every_steps=1"]), tiny_train,
                      run)
    trainer.hooks = [h for h in trainer.hooks if not isinstance(h, PeriodicCheckpoint)]
    saved: list[int] = []
    save = trainer.save
    trainer.save = lambda epoch=None: (saved.append(trainer.step), save(epoch))  # type: ignore
    trainer.run()
    assert saved == [8]  # the run's own save at its end; none per step or epoch
    assert sorted(p.name for p in run.glob("*.pth")) == ["last.pth"]
    assert [r["step"] for r in records(run)] == list(range(1, 9))  # logging still on


def test_without_the_progress_log_no_metrics_are_written(tiny_train: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, [*TWO_EPOCHS, "train.save_every_epochs=1"]), tiny_train,
                      run)
    trainer.hooks = [h for h in trainer.hooks if not isinstance(h, ProgressLog)]
    trainer.run()
    assert records(run) == []
    assert sorted(p.name for p in run.glob("*.pth")) == ["epoch_0001.pth", "epoch_0002.pth",
                                                         "last.pth"]


def test_a_hook_that_requests_a_stop_ends_the_run_there_with_last_pth_saved(
        tiny_train: Path, tmp_path: Path) -> None:
    class StopAt3(HookBase):
        def after_step(self) -> None:
            if self.trainer.step == 3:
                self.trainer.request_stop()

    run = tmp_path / "run"
    trainer = Trainer(load_config(None, TWO_EPOCHS), tiny_train, run)
    trainer.register_hooks([StopAt3()])
    trainer.run()
    assert trainer.step == 3 and load_checkpoint(run / "last.pth")["step"] == 3
    assert records(run)[-1]["step"] == 3


def test_after_train_runs_when_a_step_fails(tiny_train: Path, tmp_path: Path) -> None:
    class FailAt2(HookBase):
        def after_step(self) -> None:
            if self.trainer.step == 2:
                raise RuntimeError("step 2 failed")

    trainer = Trainer(load_config(None, TWO_EPOCHS), tiny_train, tmp_path / "run")
    recorder = Recorder()
    trainer.register_hooks([FailAt2(), recorder])
    with pytest.raises(RuntimeError, match="step 2 failed"):
        trainer.run()
    assert recorder.events == [("before_train", 0), ("before_step", 0, 16, 0), ("after_step", 1),
                               ("before_step", 1, 16, 0), ("after_train", 2)]


def test_the_knn_monitor_is_a_hook_that_runs_at_the_epochs_asked_for(
        tiny_train: Path, tiny_val: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = load_config(None, [*TWO_EPOCHS, "train.knn_every_epochs=5"])
    trainer = Trainer(cfg, tiny_train, run, val=str(tiny_val))
    assert isinstance(trainer.hooks[-1], KnnMonitor)
    trainer.run()
    knn = [r for r in records(run) if "knn_top1_teacher" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(8, 2)]  # not epoch 1: only the final
    assert all(0.0 <= r[f"knn_top1_{b}"] <= 100.0 for r in knn for b in ("teacher", "student"))


# ----- the bad-image accounting, on its own ----------------------------------------------
class _Lines:
    def __init__(self) -> None:
        self.printed: list[str] = []

    def print(self, text: str) -> None:
        self.printed.append(text)


def bad_images_hook(world_size: int = 1, fraction: float = 0.25) -> BadImages:
    """A ``BadImages`` on a stand-in for the Trainer: the attributes the hook reads."""
    hook = BadImages()
    hook.trainer = SimpleNamespace(  # type: ignore[assignment]
        step=7, seen_images=0, bad_images=0, data="DATA", log=_Lines(),
        dist=Dist(world_size=world_size),
        cfg=load_config(None, [f"data.max_bad_fraction={fraction}"]))
    return hook


def unreadable(n: int) -> list[Unreadable]:
    return [Unreadable(f"c/{i}.jpg", "cannot identify image file") for i in range(n)]


def test_bad_images_are_counted_and_named_at_their_step() -> None:
    hook = bad_images_hook()
    hook.before_step(6, unreadable(2))
    hook.before_step(8, [])
    t = hook.trainer
    assert (t.seen_images, t.bad_images) == (16, 2)
    assert t.log.printed == ["warning: skipped 2 unreadable image(s) at step 7 (2 so far): "
                             "c/0.jpg (cannot identify image file), "
                             "c/1.jpg (cannot identify image file)"]


def test_more_bad_images_than_the_fraction_stop_the_run_once_100_were_seen() -> None:
    hook = bad_images_hook(fraction=0.25)
    hook.before_step(60, unreadable(30))  # 33% of 90: too few seen to judge yet
    with pytest.raises(TrainingError, match=r"DATA: 40 of 100 images could not be read "
                                            r"\(more than data.max_bad_fraction=0.25\)"):
        hook.before_step(0, unreadable(10))


def test_a_batch_of_fewer_than_two_readable_images_is_skipped_with_a_warning() -> None:
    hook = bad_images_hook()
    hook.before_step(1, unreadable(1))
    assert hook.trainer.log.printed[-1] == ("warning: skipping step 7: fewer than 2 readable "
                                            "images")
    with pytest.raises(TrainingError, match="a batch at step 7 had fewer than 2 readable"):
        bad_images_hook(world_size=2).before_step(1, [])  # the ranks would disagree


def test_an_epoch_of_only_unreadable_images_stops_the_run() -> None:
    hook = bad_images_hook(fraction=1.0)
    hook.before_step(0, unreadable(8))
    with pytest.raises(TrainingError, match="none of the 8 images of an epoch could be read"):
        hook.after_epoch(1, False)
    fine = bad_images_hook()
    fine.before_step(8, [])
    fine.after_epoch(1, False)  # no error
