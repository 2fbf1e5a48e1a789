"""``m2t-pretrain train --slurm``: submitit jobs, run here by its local executor (CPU, gloo).

A 2-task job preempted mid-run (SIGUSR2, as SLURM sends before a time limit) saves,
requeues itself, resumes, and ends with the weights of the same run made directly by 2
processes as torchrun starts them, bit for bit; bad options are one ``error:`` line.

The jobs train BYOL: an m2t teacher keeps momentum-BN statistics per rank, and a checkpoint
holds rank 0's, so a resumed multi-rank m2t run is close to, not bitwise equal to, an
uninterrupted one (the other ranks resume with rank 0's statistics).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from submitit.core.utils import DelayedSubmission

from pretrain.__main__ import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.arch=resnet18", "model.width=16", "model.proj_hidden_dim=32", "model.proj_dim=16",
        "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.log_every=1",
        "optim.base_lr=1.0", "optim.warmup_epochs=0", "train.steps=8", "model.method=byol"]
LOCAL_JOB = ["--slurm", "--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2"]


@pytest.fixture(autouse=True)
def one_thread_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's tasks inherit it


@pytest.fixture(scope="module")
def torchrun_last(tiny_train: Path, tmp_path_factory: pytest.TempPathFactory):
    """last.pth of the same run made directly: two processes given the variables torchrun
    sets (no launcher: one process less to start), started now and waited for when a test
    asks, so that it runs while the first job does."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pretrain", "train", "--data", str(tiny_train), "--out", str(run),
           *TINY, "train.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]

    def last() -> Path:
        for proc in procs:
            output = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, output[-3000:]
        return run / "last.pth"

    yield last
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_same_weights(a: Path, b: Path) -> None:
    ca, cb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert (ca["step"], ca["world_size"]) == (cb["step"], cb["world_size"])
    for branch in ("student", "teacher"):
        assert ca[branch].keys() == cb[branch].keys()
        for key, value in ca[branch].items():
            assert torch.equal(value, cb[branch][key]), f"{branch}.{key} differs"


def task_pids(controller: int) -> dict[int, int]:
    """The job's task processes (children of submitit's local controller), by global rank."""
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = dict(item.split("=", 1) for item in
                   Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        ranks[int(env["SUBMITIT_LOCAL_GLOBALID"])] = pid
    return ranks


@pytest.mark.slow
def test_a_two_task_job_preempted_mid_run_requeues_and_ends_as_torchrun_does(
        tiny_train: Path, tmp_path: Path, torchrun_last, capsys) -> None:
    """One job for both claims (each start of a task costs seconds of imports): its second
    attempt runs to the end unsignalled, and the weights it ends with are the direct run's.
    """
    run = tmp_path / "run"
    done: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: done.setdefault("rc", main(
        ["train", "--data", str(tiny_train), "--out", str(run), *TINY, *LOCAL_JOB, "--wait"])))
    waiter.start()
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # step 2 is done
        assert waiter.is_alive() and time.monotonic() < deadline, capsys.readouterr()
        time.sleep(0.05)
    job_id = next((run / "slurm").glob("*_submitted.pkl")).name.split("_")[0]
    # SLURM signals every task; one is enough (the ranks agree), and it is the harder case:
    # rank 0, which saves and requeues, did not get it
    os.kill(task_pids(int(job_id))[1], signal.SIGUSR2)
    waiter.join(timeout=300)
    out, err = capsys.readouterr()
    assert done.get("rc") == 0, out + err
    log = run / "slurm" / f"{job_id}_0_log.out"
    assert out.startswith(f"submitted job {job_id} to the local executor: 1 node(s) × 2 CPU "
                          f"task(s), time limit 1440 min\njob folder: {run / 'slurm'}\n"
                          f"follow the log: tail -f {log}\n"), out
    text = log.read_text()
    stopped = [line for line in text.splitlines() if line.startswith("SIGUSR2 ")]
    assert len(stopped) == 1, text
    step = int(stopped[0].split("stopped at step ")[1].split("/")[0])
    assert 2 <= step < 8, stopped
    assert "batch 8×2" in text and f"resuming at step {step}" in text  # 2 ranks, 1 group
    assert (f"job {job_id} finished: step 8/8, this attempt resumed at step {step}; "
            f"checkpoint: {run / 'last.pth'}\n") in out
    assert_same_weights(run / "last.pth", torchrun_last())


@pytest.mark.slow
def test_sigterm_stops_a_job_at_a_step_boundary_with_the_step_saved_and_no_requeue(
        tiny_train: Path, tmp_path: Path, capsys) -> None:
    """scancel, or a preemption without --signal, sends SIGTERM (submitit only logs it): the
    ranks agree to stop after one step, save it, and the job ends with an error, not requeued."""
    from pretrain.checkpoint import load_checkpoint

    run = tmp_path / "run"
    done: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: done.setdefault("rc", main(
        ["train", "--data", str(tiny_train), "--out", str(run),
         *[o for o in TINY if not o.startswith("train.steps=")], "train.steps=400", *LOCAL_JOB,
         "--wait"])))
    waiter.start()
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert waiter.is_alive() and time.monotonic() < deadline, capsys.readouterr()
        time.sleep(0.05)
    job_id = next((run / "slurm").glob("*_submitted.pkl")).name.split("_")[0]
    os.kill(task_pids(int(job_id))[1], signal.SIGTERM)
    waiter.join(timeout=300)
    out, err = capsys.readouterr()
    assert done.get("rc") not in (None, 0), out + err
    text = (run / "slurm" / f"{job_id}_0_log.err").read_text()
    stopped = re.search(r"terminated \(SIGTERM\): stopped at step (\d+)/400", text)
    assert stopped, text[-3000:]
    assert load_checkpoint(run / "last.pth")["step"] == int(stopped.group(1)) < 400
    assert "requeu" not in (run / "slurm" / f"{job_id}_0_log.out").read_text()


def test_a_signal_stops_the_trainer_after_the_step_it_came_in(tiny_train: Path,
                                                              tmp_path: Path) -> None:
    """The mechanism alone, in this process: the handler sets a flag, the stop hook asks it
    after each step and the Trainer stops there with last.pth saved."""
    from pretrain.checkpoint import load_checkpoint
    from pretrain.config import load_config
    from pretrain.hooks import HookBase
    from pretrain.slurm import StopRequest, attach
    from pretrain.train import Trainer

    class SignalDuringStep2(HookBase):
        def after_step(self) -> None:
            if self.trainer.step == 2:
                os.kill(os.getpid(), signal.SIGUSR2)

    trainer = Trainer(load_config(None, [*TINY, "train.device=cpu"]), tiny_train,
                      tmp_path / "run")
    stop = StopRequest(signal.SIGUSR2, in_loop=True).install()
    try:
        trainer.register_hooks([SignalDuringStep2()])
        attach(stop, trainer)
        last = trainer.run()
    finally:
        signal.signal(signal.SIGUSR2, stop.previous)
    assert (trainer.step, stop.agreed) == (2, True)
    assert load_checkpoint(last)["step"] == 2


# ----- options --------------------------------------------------------------------------
def cli(tmp_path: Path, *options: str) -> tuple[int, str, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY,
                   *options])
    return rc, out.getvalue(), err.getvalue()


def fake_slurm(tmp_path: Path, sbatch: str) -> str:
    """A PATH whose ``sbatch`` runs ``sbatch`` (a shell snippet), with an ``srun`` beside it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", sbatch), ("srun", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize("options, message", [
    (["--slurm", "--nodes", "0"], "error: --nodes must be >= 1, got 0\n"),
    (["--slurm", "--time", "-5"], "error: --time must be >= 1, got -5 (minutes)\n"),
    (["--slurm", "--gpus-per-node", "-1"], "error: --gpus-per-node must be >= 0, got -1"),
    (["--slurm", "--mem-gb", "0"], "error: --mem-gb must be > 0, got 0"),
    (["--nodes", "2", "--wait"], "error: --nodes, --wait: only with --slurm"),
    (["--slurm", "--tasks-per-node", "3"], "error: --tasks-per-node 3 with --gpus-per-node 8"),
    (["--slurm", "--cluster", "local", "--nodes", "2"], "error: --nodes 2 with --cluster local"),
    (["--slurm", "--gpus-per-node", "0", "--device", "cuda"],
     "error: train.device=cuda but --gpus-per-node 0"),
])
def test_bad_options_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  options: list[str], message: str) -> None:
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, "echo 'Submitted batch job 1'"))
    rc, out, err = cli(tmp_path, *options)
    assert (rc, err.count("\n")) == (2, 1) and err.startswith(message), err
    assert not (tmp_path / "run").exists()


def test_without_slurm_sbatch_is_not_found(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on it
    rc, out, err = cli(tmp_path, "--slurm", "--cluster", "slurm")
    assert (rc, err.count("\n")) == (2, 1) and err.startswith("error: sbatch not found"), err


def test_sbatch_refusal_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse = "echo 'sbatch: error: invalid partition specified: nope' >&2; exit 1"
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, refuse))
    rc, out, err = cli(tmp_path, "--slurm", "--partition", "nope")
    assert (rc, err) == (2, "error: sbatch refused the job: sbatch: error: invalid partition "
                            "specified: nope\n")


def test_sbatch_gets_the_resources_and_the_command_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", fake_slurm(tmp_path, "echo 'Submitted batch job 4242'"))
    rc, out, err = cli(tmp_path, "--slurm", "--nodes", "2", "--partition", "gpu", "--time", "90",
                       "--account", "vision", "--qos", "high", "--constraint", "h100",
                       "--cpus-per-task", "10", "--mem-gb", "480")
    assert (rc, err) == (0, ""), out + err
    folder = tmp_path / "run" / "slurm"
    assert out.splitlines() == [
        "submitted job 4242 to slurm: 2 node(s) × 8 task(s) with 8 GPU(s), time limit 90 min",
        f"job folder: {folder}",
        f"follow the log: tail -f {folder / '4242_0_log.out'}",
        "cancel: scancel 4242"]
    sbatch = (folder / "4242_submission.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--time=90", "--account=vision", "--qos=high", "--constraint=h100",
                 "--cpus-per-task=10", "--mem=480GB", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in sbatch
    assert "srun --unbuffered" in sbatch and "--kill-on-bad-exit=1" in sbatch
    spec = DelayedSubmission.load(folder / "4242_submitted.pkl").function.spec
    assert (spec.out, spec.config.train.device) == (str(tmp_path / "run"), "cuda")
