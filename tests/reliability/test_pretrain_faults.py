"""Faults during pretraining: kill -9, NaN/inf losses, diverged weights, a full disk.

Whatever happens, the last complete checkpoint stays intact and ``--resume`` continues from
it; a partially written file is never taken for a checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.__main__ import main
from pretrain.checkpoint import load_checkpoint, save_atomic
from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.momentum_bn import momentum_bn_modules
from pretrain.train import Trainer

from .conftest import ENV, REPO, TINY, checkpoint_files, copy_run, error_line

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partial_saves(run: Path, pid: int | None = None) -> list[Path]:
    """Temporary files of interrupted or ongoing saves (of process ``pid`` if given)."""
    pattern = f".*.tmp-{pid}" if pid is not None else ".*.tmp-*"
    return sorted(run.glob(pattern)) if run.is_dir() else []


# ----- kill -9 ---------------------------------------------------------------------------
KILL_STEPS = 4


def _train_args(data: Path, run: Path) -> list[str]:
    # torchvision's width (not TINY's 16): a checkpoint of ~130 MB takes long enough to write
    # that a kill can land inside the save
    return ["train", "--data", str(data), "--out", str(run), "--resume", *TINY, "model.width=64",
            f"train.steps={KILL_STEPS}", "train.save_every_steps=1"]


def _train_command(data: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "pretrain", *_train_args(data, run)]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["step"] == KILL_STEPS
    return {f"{net}.{k}": v for net in ("student", "teacher") for k, v in ckpt[net].items()}


def test_kill_9_at_random_moments_and_during_saves_loses_nothing(tiny_train: Path,
                                                                tmp_path: Path, ledger) -> None:
    """SIGKILL a run again and again (at seeded random times, and while a save is being
    written); after every kill each checkpoint file loads and last.pth never goes back in
    steps; restarting the same command (``--resume``) finishes the run with exactly the
    weights of a run that was never interrupted."""
    rng = random.Random(8)
    run = tmp_path / "killed"
    plan = ["during_save", "random", "during_save"]
    kills = {"during_save": 0, "random": 0}
    last_step = -1
    partial_seen = 0
    for attempt, mode in enumerate(plan):
        log = tmp_path / f"attempt{attempt}.err"
        with open(log, "w") as err:
            proc = subprocess.Popen(_train_command(tiny_train, run), cwd=REPO, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + (rng.uniform(1.0, 6.0) if mode == "random" else 300.0)
        grace = rng.uniform(0.0, 0.1)  # how far into the write a save is killed
        caught_in_save = False
        while proc.poll() is None and time.monotonic() < deadline:
            if mode == "during_save" and partial_saves(run, proc.pid):
                time.sleep(grace)
                if partial_saves(run, proc.pid):
                    caught_in_save = True
                    break
                grace /= 4  # that save ended first (a fast host): catch a later one sooner
            time.sleep(0.002)
        if proc.poll() is not None:  # finished before the kill came
            assert proc.returncode == 0, log.read_text()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ledger.fault("pretrain: kill -9 " + ("during a checkpoint save" if caught_in_save
                                             else "at a random moment"))
        kills["during_save" if caught_in_save else "random"] += 1
        partial_seen += bool(partial_saves(run, proc.pid))
        for ckpt in checkpoint_files(run):  # every file named like a checkpoint is whole
            try:
                load_checkpoint(ckpt)
            except UserError:
                ledger.checkpoint_lost(f"kill -9: {ckpt.name} unreadable")
                raise
        if (run / "last.pth").exists():
            step = load_checkpoint(run / "last.pth")["step"]
            if step < last_step:
                ledger.checkpoint_lost("kill -9: last.pth went back in steps")
            assert step >= last_step
            last_step = step
        elif last_step >= 0:
            ledger.checkpoint_lost("kill -9: last.pth disappeared")
            pytest.fail("last.pth disappeared after a kill")
    assert kills["during_save"] >= 1 and sum(kills.values()) >= 2, kills
    assert partial_seen >= 1  # a half-written temporary file really was left behind

    finish = subprocess.run(_train_command(tiny_train, run), cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert partial_saves(run) == []  # the restart cleared what the kills left behind
    reference = tmp_path / "uninterrupted"  # run the same way: a fresh process, one thread
    ref = subprocess.run(_train_command(tiny_train, reference), cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=ENV)
    assert ref.returncode == 0, ref.stderr[-3000:]
    resumed, expected = _final_weights(run), _final_weights(reference)
    assert resumed.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(resumed[k], expected[k])]
    if different:
        ledger.checkpoint_lost("kill -9: resumed run differs from an uninterrupted one")
    assert not different, different[:5]


def test_a_restart_removes_what_a_kill_left_of_any_write_and_nothing_else(
        tiny_train: Path, tmp_path: Path) -> None:
    """A kill while config.yaml was written at start (CI saw this one) or while a checkpoint
    was saved leaves ``.NAME.tmp-PID``; the next start removes both, and only those."""
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [run / ".config.yaml.tmp-4242", run / ".last.pth.tmp-4243"]
    for path in leftovers:
        path.write_bytes(b"half a fi")
    kept = [run / ".notes.tmp", run / "notes.tmp-12", run / ".last.pth.tmp-x"]
    for path in kept:
        path.write_text("the user's")
    _trainer(tiny_train, run, "train.steps=1").run()
    assert not any(path.exists() for path in leftovers)
    assert all(path.read_text() == "the user's" for path in kept)


# ----- non-finite losses and weights -------------------------------------------------------
def _trainer(data: Path, run: Path, *extra: str) -> Trainer:
    cfg = load_config(None, [*TINY, "train.steps=4", "train.save_every_steps=1", *extra])
    return Trainer(cfg, data, run)


def _poison_loss(trainer: Trainer, steps: dict[int, float]) -> None:
    """Make the loss of the given steps NaN or inf (the model itself is not touched)."""
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step in steps:
            out["loss"] = out["loss"] * steps[trainer.step]
        return out

    trainer.model.forward = poisoned


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
        tiny_train: Path, tmp_path: Path, ledger, value: float) -> None:
    run = tmp_path / "run"
    trainer = _trainer(tiny_train, run)
    _poison_loss(trainer, {2: value})
    with pytest.raises(UserError) as err:
        trainer.run()
    ledger.fault(f"pretrain: {value} loss (train.nonfinite=stop)")
    message = str(err.value)
    assert "at step 2" in message and str(value) in message and "\n" not in message
    ckpt = load_checkpoint(run / "last.pth")
    if ckpt["step"] != 2:
        ledger.checkpoint_lost("non-finite loss: last.pth is not the last good step")
    assert ckpt["step"] == 2  # saved after steps 1 and 2; step 3 never happened


def test_the_skip_policy_skips_and_counts_steps_and_leaves_the_model_untouched(
        tiny_train: Path, tmp_path: Path, ledger) -> None:
    run = tmp_path / "run"
    trainer = _trainer(tiny_train, run, "train.nonfinite=skip")
    _poison_loss(trainer, {1: float("nan"), 2: float("inf")})
    snapshots = {}
    step = trainer.train_step

    def recording_step(v1, v2):
        at = trainer.step  # the step this is (the loop counts it once it returns)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()
                  if v.is_floating_point()}
        out = step(v1, v2)
        if out.get("skipped"):
            snapshots[at] = before
        return out

    trainer.train_step = recording_step
    trainer.run()
    ledger.fault("pretrain: NaN loss (train.nonfinite=skip)")
    ledger.fault("pretrain: inf loss (train.nonfinite=skip)")
    assert sorted(snapshots) == [1, 2]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 1, 2, 2]
    # steps 1 and 2 were skipped: step 3 started from exactly the state before step 1,
    # BatchNorm running statistics included (only step counters moved on)
    after_skips = {k: v for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["step"] == 4
    after_first_skip = snapshots[2]  # the state step 2 started from
    for name, tensor in snapshots[1].items():
        assert torch.equal(tensor, after_first_skip[name]), name
    assert all(torch.isfinite(t).all() for t in after_skips.values())
    # m2t's momentum BNs dropped the skipped steps' statistics (above) and still counted the
    # steps, so their α follows the run's schedule: 4 steps, 2 of them skipped
    bns = momentum_bn_modules(trainer.model.teacher)
    assert bns and {int(bn.step) for bn in bns} == {4}


def test_weights_that_turn_non_finite_are_never_saved_over_the_last_good_checkpoint(
        tiny_train: Path, tmp_path: Path, ledger) -> None:
    """An optimiser step that produces inf weights (finite loss, overflowing gradients)."""
    run = tmp_path / "run"
    trainer = _trainer(tiny_train, run)
    optimizer_step = trainer.optimizer.step

    def overflowing_step(*args, **kwargs):
        result = optimizer_step(*args, **kwargs)
        if trainer.step == 2:  # the step counter advances after the optimiser step
            with torch.no_grad():
                next(trainer.model.student.parameters()).view(-1)[0] = float("inf")
        return result

    trainer.optimizer.step = overflowing_step
    with pytest.raises(UserError) as err:
        trainer.run()
    ledger.fault("pretrain: weights turn inf after an optimiser step")
    assert "not finite after step 3" in str(err.value) and "step 2" in str(err.value)
    ckpt = load_checkpoint(run / "last.pth")
    finite = all(torch.isfinite(t).all() for t in ckpt["student"].values()
                 if t.is_floating_point())
    if ckpt["step"] != 2 or not finite:
        ledger.checkpoint_lost("diverged weights saved over last.pth")
    assert ckpt["step"] == 2 and finite


# ----- full disk / unwritable run directory ------------------------------------------------
def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_full_disk_when_saving_gives_one_error_line_and_keeps_the_previous_checkpoint(
        started_run: Path, tiny_train: Path, tmp_path: Path, ledger) -> None:
    run = copy_run(started_run, tmp_path / "run")
    before = digest(run / "last.pth")
    limit = (run / "last.pth").stat().st_size // 2
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", "--data", str(tiny_train),
                           "--out", str(run), "--resume", "train.save_every_steps=1"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=ENV, preexec_fn=_limit_file_size(limit))
    ledger.fault("pretrain: file-size limit (disk full) while saving")
    if "Traceback" in proc.stderr:
        ledger.traceback("pretrain: full disk")
    assert proc.returncode == 2
    line = error_line(proc.stderr, run / "last.pth")
    assert "could not save checkpoint (File too large)" in line and "untouched" in line
    if digest(run / "last.pth") != before:
        ledger.checkpoint_lost("full disk")
    assert digest(run / "last.pth") == before
    assert partial_saves(run) == []


def test_no_space_left_at_fsync_keeps_the_previous_file_and_cleans_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger) -> None:
    """ENOSPC surfacing only at fsync (as on NFS and many full disks)."""
    target = tmp_path / "last.pth"
    save_atomic({"step": 1, "w": torch.ones(4)}, target)
    before = digest(target)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pretrain.checkpoint.os.fsync", no_space)
    with pytest.raises(UserError, match="No space left on device") as err:
        save_atomic({"step": 2, "w": torch.zeros(4)}, target)
    ledger.fault("pretrain: ENOSPC at fsync while saving")
    assert str(target) in str(err.value)
    assert digest(target) == before and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("where", ["file_as_run_dir", "file_as_parent"])
def test_an_unwritable_run_directory_is_one_error_line(tiny_train: Path, tmp_path: Path,
                                                       capsys, ledger, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    out = blocker if where == "file_as_run_dir" else blocker / "run"
    code = main(["train", "--data", str(tiny_train), "--out", str(out), *TINY,
                 "train.steps=2"])
    ledger.fault(f"pretrain: unwritable run directory ({where.replace('_', ' ')})")
    assert code == 2
    error_line(capsys.readouterr().err, out)
    assert blocker.read_text() == "a file where a folder should be"
