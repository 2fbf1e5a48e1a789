"""The pretraining loop's hooks (pretrain/hooks.py): when they run, and that each can be
switched off or added on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.checkpoint import load_checkpoint
from pretrain.config import load_config
from pretrain.hooks import HookBase, KnnMonitor, PeriodicCheckpoint, ProgressLog
from pretrain.train import Trainer

from .conftest import TINY

#: 64 images at batch 16: 4 steps per epoch, 2 epochs
TWO_EPOCHS = [*TINY, "data.batch_size=16", "train.epochs=2", "train.device=cpu"]


class Recorder(HookBase):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before_train(self) -> None:
        self.events.append(("before_train", self.trainer.step))

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
    expected = [("before_train", 0),
                *[("after_step", k) for k in (1, 2, 3, 4)], ("after_epoch", 1, False),
                *[("after_step", k) for k in (5, 6, 7, 8)], ("after_epoch", 2, True),
                ("after_train", 8)]
    assert recorder.events == expected
    assert [type(h).__name__ for h in trainer.hooks] == ["ProgressLog", "PeriodicCheckpoint",
                                                         "Recorder"]


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
    assert recorder.events == [("before_train", 0), ("after_step", 1), ("after_train", 2)]


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
