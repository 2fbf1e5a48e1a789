"""``m2t-transfer train --slurm`` and ``--seeds``: submitit jobs run here by its local executor.

A fine-tuning job (Mask R-CNN, ResNet-18 body, 128 px shapes, CPU) ends with the weights and
metrics of the same command run directly; a job preempted mid-run (SIGUSR2, as SLURM sends
before a time limit) saves Detectron2's checkpoint, requeues itself, resumes and ends with the
same weights, bit for bit; a 2-seed sweep writes both runs and the report of their mean and
std, and a rerun skips them; bad options are one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

from transfer.__main__ import main
from transfer.shapes import make_shapes
from transfer.sweep import own_logging

pytestmark = pytest.mark.slow

#: Mask R-CNN R50-FPN made tiny: a ResNet-18 body, narrow FPN and heads, 128 px, batch 2,
#: 4 iterations (a checkpoint after the second), few proposals; tests/transfer's TINY.
TINY = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
    "SOLVER.WARMUP_ITERS", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "TEST.PRECISE_BN.NUM_ITER", "1",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "30", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10",
]
LOCAL_JOB = ["--slurm", "--cluster", "local", "--gpus-per-node", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One OpenMP thread here and in the jobs' tasks (they inherit the environment).

    Module-scoped, so that it is in force before the module-scoped reference run is made:
    a reference trained with another thread count differs in the last bits.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    """6 + 1 generated shapes images, and a torchvision ResNet-18 converted by ``convert``."""
    from convert import convert_checkpoint

    folder = module_tmp("transfer_slurm_data")
    shapes = make_shapes(folder / "shapes", n_train=6, n_val=1, size=128, max_shapes=2)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / "r18.pth")
    convert_checkpoint(str(folder / "r18.pth"), str(folder / "r18.pkl"), force=True)
    return {"weights": folder / "r18.pkl", "train": shapes["train_json"],
            "test": shapes["val_json"]}


def _train(data: dict[str, Path], out: Path, *extra: str, weights: bool = True) -> list[str]:
    return ["train", "--config", "mask_rcnn_R_50_FPN_1x",
            *(["--weights", str(data["weights"])] if weights else []),
            "--train-dataset", str(data["train"]), "--test-dataset", str(data["test"]),
            "--output-dir", str(out), *extra]


def _run(argv: list[str]) -> int:
    with own_logging():  # this run's log.txt handlers go with it
        return main(argv)


@pytest.fixture(scope="module")
def direct(data: dict[str, Path], module_tmp: Callable[[str], Path]) -> Path:
    """The fine-tuning run directly (the reference of the jobs)."""
    out = module_tmp("direct") / "run"
    assert _run(_train(data, out, *TINY, "SEED", "0")) == 0
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def _assert_same_run(run: Path, reference: Path) -> None:
    mine, theirs = _weights(run), _weights(reference)
    assert mine.keys() == theirs.keys()
    different = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    a, b = (json.loads((r / "results.json").read_text()) for r in (run, reference))
    assert a["bbox"] == b["bbox"] and a["segm"] == b["segm"]


def test_a_local_job_ends_with_the_weights_and_metrics_of_the_direct_command(
        data: dict[str, Path], direct: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _run(_train(data, run, *LOCAL_JOB, "--wait", *TINY, "SEED", "0")) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"^submitted job (\d+) to the local executor: 1 node\(s\) × 1 CPU "
                       r"task\(s\), time limit 1440 min$", out, re.M).group(1)
    assert f"job folder: {run / 'slurm'}\n" in out
    assert f"follow the log: tail -f {run / 'slurm' / f'{job_id}_0_log.out'}\n" in out
    assert "| segm | 0.0 |" in out and f"wrote {run}/results.json" in out
    _assert_same_run(run, direct)
    assert "Starting training from iteration 0" in (run / "log.txt").read_text()


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_for_exit(pid: int, deadline: float) -> None:
    """Reap the job's controller (a child of this process, started by submitit)."""
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGTERM)  # the controller forwards it to the task
    raise AssertionError(f"job {pid} still running")


def test_a_preempted_job_saves_requeues_and_ends_as_if_uninterrupted(
        data: dict[str, Path], direct: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert _run(_train(data, run, *LOCAL_JOB, *TINY, "SEED", "0")) == 0  # returns at once
    out = capsys.readouterr().out
    job = int(re.search(r"submitted job (\d+)", out).group(1))
    assert f"results: {run / 'results.json'} when the job ends" in out
    deadline = time.monotonic() + 300
    try:
        # SIGUSR2 to the task, as SLURM sends it (the controller would die of it): once the
        # first checkpoint is there, so that the job stops with iterations still to go
        while not (run / "model_0000001.pth").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (task,) = _children(job)
        os.kill(task, signal.SIGUSR2)
        result = run / "slurm" / f"{job}_0_result.pkl"
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        _wait_for_exit(job, deadline + 30)
    log = (run / "slurm" / f"{job}_0_log.out").read_text()
    stopped = re.search(r"SIGUSR2 \(time limit or preemption\): stopped after iteration (\d) of "
                        r"4, (\S+) saved; requeuing with --resume", log)
    assert stopped, log[-3000:]
    done = int(stopped.group(1))
    assert done < 3 and stopped.group(2) == str(run / f"model_{done:07d}.pth")
    err = (run / "slurm" / f"{job}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in err and "Traceback" not in err, err[-3000:]
    starts = re.findall(r"Starting training from iteration (\d+)", log)
    assert starts == ["0", str(done + 1)]  # the requeued task resumed after the saved one
    assert f"replaying the data stream of SEED 0 past the {done + 1} batches" in log
    _assert_same_run(run, direct)


def test_sigterm_ends_a_job_at_an_iterations_end_saved_and_not_requeued(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """scancel, or a preemption without --signal, sends SIGTERM (submitit only logs it): the
    job stops after an iteration with it saved, and fails with one error line, no requeue."""
    run = tmp_path / "run"
    tiny = [*TINY[:TINY.index("SOLVER.MAX_ITER") + 1], "400",
            *TINY[TINY.index("SOLVER.MAX_ITER") + 2:]]
    assert _run(_train(data, run, *LOCAL_JOB, *tiny, "SEED", "0")) == 0  # returns at once
    job = int(re.search(r"submitted job (\d+)", capsys.readouterr().out).group(1))
    deadline = time.monotonic() + 300
    try:
        while not (run / "model_0000001.pth").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        (task,) = _children(job)
        os.kill(task, signal.SIGTERM)
        result = run / "slurm" / f"{job}_0_result.pkl"
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        _wait_for_exit(job, deadline + 30)
    err = (run / "slurm" / f"{job}_0_log.err").read_text()
    stopped = re.search(r"terminated \(SIGTERM\): stopped after iteration (\d+) of 400", err)
    assert stopped, err[-3000:]
    name = (run / "last_checkpoint").read_text().strip()
    assert name == f"model_{int(stopped.group(1)):07d}.pth"
    log = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert "requeuing" not in log and len(re.findall("Starting training", log)) == 1


def test_a_two_seed_sweep_writes_both_runs_and_their_report_and_a_rerun_skips_them(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = _train(data, out, "--seeds", "0", "1", *TINY, "SOLVER.MAX_ITER", "2")
    # a cell that fails (its folder is a file): reported, the other one still runs
    out.mkdir()
    (out / "seed_1").write_text("in the way")
    assert _run(argv) == 1
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines()[-1] == (
        f"error: 1 of 2 runs failed: r18 seed 1 ({out / 'seed_1'}: --output-dir is a file, "
        f"not a run directory)")
    assert (out / "seed_0" / "results.json").is_file() and "| r18 | 1 |" in printed.out

    # the rerun: seed 0 is skipped, seed 1 runs; the report has both
    (out / "seed_1").unlink()
    seed_0 = (out / "seed_0" / "log.txt").stat().st_mtime_ns
    assert _run(argv) == 0
    printed = capsys.readouterr().out
    assert "[1/2] r18 seed 0: finished before, skipped" in printed
    assert f"[2/2] r18 seed 1: fine-tuning into {out / 'seed_1'}" in printed
    assert (out / "seed_0" / "log.txt").stat().st_mtime_ns == seed_0
    runs = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1] and {r["method"] for r in runs} == {"r18"}
    assert not torch.equal(*(_weights(out / f"seed_{s}")["roi_heads.box_predictor.cls_score"
                                                         ".weight"] for s in (0, 1)))
    report = (out / "report.md").read_text()
    assert printed.endswith(f"wrote {out / 'report.md'}, {out / 'report.png'} and "
                            f"{out / 'report.json'}\n") and report in printed
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (group,) = json.loads((out / "report.json").read_text())
    row = group["methods"]["r18"]
    assert row["runs"] == 2 and row["seeds"] == [0, 1]
    def row_of(start: str) -> list[str]:  # the cells of the table row that starts so
        line = next(line for line in report.splitlines() if line.startswith(start))
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    header, mean_row = row_of("| method | runs |"), row_of("| r18 | 2 |")
    seed_rows = [row_of(f"| r18 | {s} |") for s in (0, 1)]
    for task, label in (("bbox", "box"), ("segm", "mask")):
        for name in ("AP", "AP50", "AP75"):
            values = [r[task][name] for r in runs]  # by hand, from the runs' results.json
            mean, std = statistics.fmean(values), statistics.stdev(values)
            cell = row["metrics"][task][name]
            assert cell["values"] == values
            assert cell["mean"] == pytest.approx(mean) and cell["std"] == pytest.approx(std)
            column = header.index(f"{name}<sup>{label}</sup>")
            assert mean_row[column] == f"{mean:.1f} ± {std:.1f}"
            assert [r[column] for r in seed_rows] == [f"{v:.1f}" for v in values]
    # the two seeds scored differently here, so mean and std are not trivially 0
    assert runs[0]["bbox"] != runs[1]["bbox"]

    logs = {s: (out / f"seed_{s}" / "log.txt").stat().st_mtime_ns for s in (0, 1)}
    assert _run(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished before, skipped") == 2
    assert "fine-tuning into" not in printed and "| r18 | 2 |" in printed
    assert logs == {s: (out / f"seed_{s}" / "log.txt").stat().st_mtime_ns for s in (0, 1)}


def _fake_slurm(tmp_path: Path) -> str:
    """A PATH whose ``sbatch`` accepts every job (as number 4242), with an ``srun`` beside it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", "echo 'Submitted batch job 4242'"), ("srun", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_a_slurm_job_whose_rank_fails_ends_its_other_ranks(
        data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """srun ends every task once one exits with an error (``--kill-on-bad-exit=1``), as
    torchrun does, instead of leaving the others waiting in a collective until its timeout."""
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path))
    run = tmp_path / "run"
    argv = _train(data, run, "--slurm", "--gpus-per-node", "0", "--tasks-per-node", "2", *TINY)
    assert main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "submitted job 4242 to slurm: 1 node(s) × 2 CPU task(s)" in out
    script = (run / "slurm" / "4242_submission.sh").read_text()
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert "--kill-on-bad-exit=1" in srun.split(), srun


#: Fault injection into the tasks of a local job (they inherit the environment): the task of
#: rank $FAIL_RANK cannot open a training image (it skips them, then has none left, and fails).
FAIL_ONE_RANK = """\
import os, sys
if os.environ.get("SUBMITIT_LOCAL_GLOBALID") == os.environ.get("FAIL_RANK"):
    def _refuse(event, args):
        if event == "open" and "/train/" in str(args[0]) and str(args[0]).endswith(".jpg"):
            raise OSError(5, f"injected: rank {os.environ['FAIL_RANK']} cannot read", args[0])
    sys.addaudithook(_refuse)
"""


def test_a_local_job_whose_rank_fails_ends_its_other_ranks(
        data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Rank 1 fails at its first batch while rank 0 waits for it in the gradients' all-reduce:
    the job ends (both tasks) within seconds, and the command says it failed. (Here gloo
    notices the closed connection; on SLURM, srun ends the others whatever they wait in.)"""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAIL_ONE_RANK)
    monkeypatch.setenv("PYTHONPATH", str(inject))
    monkeypatch.setenv("FAIL_RANK", "1")
    run = tmp_path / "run"
    start = time.monotonic()
    rc = _run(_train(data, run, *LOCAL_JOB, "--tasks-per-node", "2", "--time", "10", "--wait",
                     *TINY, "SEED", "0"))
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"^error: job \d+: failed: ", err, re.M), err
    assert took < 300  # not the 30 minutes of a collective's timeout
    results = sorted(p.name for p in (run / "slurm").glob("*_result.pkl"))
    assert len(results) == 2, results  # both tasks ended
    failed = next((run / "slurm").glob("*_1_log.err")).read_text()
    assert "Submitted job triggered an exception" in failed, failed[-3000:]
    assert not (run / "results.json").exists()


def _no_sbatch(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "bin"
    empty.mkdir()
    return {"PATH": str(empty)}


BAD = {
    "nodes 0": (["--slurm", "--cluster", "local", "--nodes", "0"], "--nodes: must be >= 1, got 0"),
    "negative time": (["--slurm", "--time", "-5"], "--time: must be >= 1, got -5 (minutes)"),
    "tasks != GPUs": (["--slurm", "--gpus-per-node", "2", "--tasks-per-node", "3"],
                      "--tasks-per-node: 3 with --gpus-per-node 2: one task per GPU"),
    "job option without --slurm": (["--nodes", "2"], "--nodes: only with --slurm"),
    "seed twice": (["--seeds", "0", "1", "1"], "--seeds: 1 is given twice"),
    "negative seed": (["--seeds", "0", "-1"], "--seeds: -1 is out of range"),
    "seed not a number": (["--seeds", "0", "one"], "--seeds: 'one' is not a whole number"),
    "SEED and --seeds": (["--seeds", "0", "SEED", "3"], "SEED: set by --seeds"),
    "method without =": (["--methods", "m2t"], "--methods: 'm2t' is not NAME=WEIGHTS"),
    "method name": (["--methods", "a/b=x.pkl"], "--methods: 'a/b': a method name is"),
    "no sbatch": (["--slurm", "--cluster", "slurm"], "sbatch: not found"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_options_are_one_error_line(case: str, data: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    extra, expected = BAD[case]
    if case == "no sbatch":
        monkeypatch.setenv("PATH", _no_sbatch(tmp_path)["PATH"])
    weights = not any(a == "--methods" for a in extra)
    assert main(_train(data, tmp_path / "run", *extra, weights=weights)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing trained


def test_a_missing_weights_file_of_a_method_is_one_error_line(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "byol.pkl"
    argv = _train(data, tmp_path / "run", "--methods", f"m2t={data['weights']}",
                  f"byol={missing}", "--seeds", "0", "1", weights=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: weights file not found (--methods byol=...)\n"
