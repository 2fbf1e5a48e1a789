"""The standard linear evaluation over several ranks: torchrun, and ``--slurm`` (submitit's
local executor, CPU, gloo).

Two processes with half the batch each train the head as one process with the whole batch
does where BatchNorm permits: the head without its BN1d (``--no-bn``) is the same up to the
order of floating-point sums (the gradients are averaged over the ranks). With the authors'
BN1d each rank normalises with the statistics of its own half (as on their 8 GPUs: per
process, no SyncBN), so the runs differ; SyncBatchNorm would remove that, but it needs GPUs.
A 2-task job preempted mid-run requeues itself, resumes and ends with the torchrun run's head.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pretrain.__main__ import main

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]
#: 64 images at a total batch of 16: 4 steps per epoch (2 per rank of 8 images each)
STANDARD = ["--protocol", "standard", "--batch-size", "16", "--workers", "0", "--log-every",
            "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the processes started inherit it


@pytest.fixture(scope="module")
def run(tiny_train: Path, module_tmp) -> Path:
    out = module_tmp("linear_dist") / "run"
    assert main(["train", "--data", str(tiny_train), "--out", str(out), *TINY,
                 "train.steps=2"]) == 0
    return out


def torchrun(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "pretrain", "linear", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def head_of(out: Path) -> dict:
    return torch.load(out / "last.pth", weights_only=True)


@pytest.mark.slow
def test_two_processes_without_bn_train_the_head_as_one_process_with_the_whole_batch(
        run: Path, tiny_train: Path, tiny_val: Path, tmp_path: Path) -> None:
    args = [str(run), "--train", str(tiny_train), "--val", str(tiny_val), *STANDARD,
            "--epochs", "2", "--no-bn"]
    assert main(["linear", *args, "--out", str(tmp_path / "one")]) == 0
    out = torchrun(*args, "--out", str(tmp_path / "two"))
    assert "batch 8×2" in out and "reported: the Momentum² Teacher paper" in out
    one, two = head_of(tmp_path / "one"), head_of(tmp_path / "two")
    assert one["step"] == two["step"] == 8
    for key, value in one["head"].items():
        torch.testing.assert_close(two["head"][key], value, rtol=1e-5, atol=1e-6)
    # every test image scored once over the two ranks: the same accuracies
    assert [s["top1"] for s in one["history"]] == [s["top1"] for s in two["history"]]


@pytest.mark.slow
def test_with_the_authors_bn_two_processes_normalise_each_half_on_its_own(
        run: Path, tiny_train: Path, tiny_val: Path, tmp_path: Path) -> None:
    args = [str(run), "--train", str(tiny_train), "--val", str(tiny_val), *STANDARD,
            "--epochs", "1"]
    assert main(["linear", *args, "--out", str(tmp_path / "one")]) == 0
    torchrun(*args, "--out", str(tmp_path / "two"))
    one, two = head_of(tmp_path / "one"), head_of(tmp_path / "two")
    # the BN1d's running mean is rank 0's: statistics of its own half of each batch
    assert not torch.allclose(one["head"]["1.running_mean"], two["head"]["1.running_mean"],
                              atol=1e-4)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["last"]["epoch"] == 1


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
        run: Path, tiny_train: Path, tiny_val: Path, tmp_path: Path, capsys) -> None:
    args = [str(run), "--train", str(tiny_train), "--val", str(tiny_val), *STANDARD,
            "--epochs", "12", "--no-bn"]
    torchrun(*args, "--out", str(tmp_path / "torchrun"))
    out = tmp_path / "job"
    done: dict[str, int] = {}
    job = ["--slurm", "--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--wait"]
    waiter = threading.Thread(target=lambda: done.setdefault("rc", main(
        ["linear", *args, "--out", str(out), *job])))
    waiter.start()
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert waiter.is_alive() and time.monotonic() < deadline, capsys.readouterr()
        time.sleep(0.02)
    job_id = next((out / "slurm").glob("*_submitted.pkl")).name.split("_")[0]
    os.kill(task_pids(int(job_id))[1], signal.SIGUSR2)  # one rank signalled: they agree
    waiter.join(timeout=300)
    printed, err = capsys.readouterr()
    assert done.get("rc") == 0, printed + err
    assert printed.startswith(f"submitted job {job_id} to the local executor: 1 node(s) × 2 "
                              f"CPU task(s)"), printed
    assert f"job {job_id} ended: teacher step 48/48" in printed
    log = (out / "slurm" / f"{job_id}_0_log.out").read_text()
    stopped = [line for line in log.splitlines() if line.startswith("SIGUSR2 ")]
    assert len(stopped) == 1 and "requeuing" in stopped[0], log
    assert "resuming at step" in log
    a, b = head_of(tmp_path / "torchrun"), head_of(out)
    assert a["step"] == b["step"] == 48
    for key, value in a["head"].items():
        assert torch.equal(value, b["head"][key]), key
    assert a["history"] == b["history"]
