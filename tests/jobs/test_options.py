"""``jobs.options`` and ``jobs.executor``: the job flags defined once, checked once, and the
executor both stages submit through."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from jobs import JobError
from jobs.options import check_job_options, given_options

JOB_FLAGS = ["--slurm", "--cluster", "local", "--nodes", "1", "--gpus-per-node", "0",
             "--tasks-per-node", "2", "--cpus-per-task", "3", "--mem-gb", "1.5", "--time", "9",
             "--partition", "p", "--account", "a", "--qos", "q", "--constraint", "c", "--wait"]


def _train_parser(build_parser) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    train.format_help()  # m2t-transfer adds a sub-command's options when it is first used
    return train


def _job_group(parser: argparse.ArgumentParser) -> list[tuple]:
    (group,) = [g for g in parser._action_groups if g.title == "SLURM"]
    return [(a.option_strings, a.default, a.type, a.choices, a.metavar, a.help)
            for a in group._group_actions]


def test_the_two_clis_expose_the_same_job_flags() -> None:
    from pretrain.__main__ import build_parser as pretrain_parser
    from transfer.__main__ import build_parser as transfer_parser

    pretrain, transfer = _train_parser(pretrain_parser), _train_parser(transfer_parser)
    assert _job_group(pretrain) == _job_group(transfer)
    flags = {s for action in _job_group(pretrain) for s in action[0]}
    assert flags == {"--slurm", "--cluster", "--nodes", "--gpus-per-node", "--tasks-per-node",
                     "--cpus-per-task", "--mem-gb", "--time", "--partition", "--account",
                     "--qos", "--constraint", "--wait"}
    a = pretrain.parse_args(["--data", "D", "--out", "O", *JOB_FLAGS])
    b = transfer.parse_args(["--config", "C", "--weights", "W", *JOB_FLAGS])
    assert given_options(a) == given_options(b) == {
        "--cluster": "local", "--nodes": 1, "--gpus-per-node": 0, "--tasks-per-node": 2,
        "--cpus-per-task": 3, "--mem-gb": 1.5, "--time": 9, "--partition": "p",
        "--account": "a", "--qos": "q", "--constraint": "c", "--wait": True}
    assert a.slurm and b.slurm
    nothing = pretrain.parse_args(["--data", "D", "--out", "O"])
    assert set(given_options(nothing).values()) == {None}


def _given(**flags) -> dict:
    given = {f: None for f in ("--cluster", "--nodes", "--gpus-per-node", "--tasks-per-node",
                               "--cpus-per-task", "--mem-gb", "--time", "--partition",
                               "--account", "--qos", "--constraint", "--wait")}
    given.update({f"--{k.replace('_', '-')}": v for k, v in flags.items()})
    return given


def test_the_defaults_are_one_node_of_eight_gpus_for_a_day(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", _fake_slurm(tmp_path))
    opts = check_job_options(True, _given())
    assert (opts.cluster, opts.nodes, opts.gpus_per_node, opts.tasks_per_node, opts.time,
            opts.wait, opts.world_size, opts.device) == ("slurm", 1, 8, 8, 1440, False, 8, "cuda")
    cpu = check_job_options(True, _given(cluster="local", gpus_per_node=0, wait=True))
    assert (cpu.tasks_per_node, cpu.device, cpu.wait) == (1, "cpu", True)
    assert cpu.describe() == "the local executor: 1 node(s) × 1 CPU task(s), time limit 1440 min"
    assert check_job_options(False, _given()) is None


@pytest.mark.parametrize("slurm, flags, text, subject", [
    (False, {"nodes": 2, "wait": True}, "--nodes, --wait: only with --slurm (which submits the "
     "run as a job instead of running it here)", "--nodes, --wait"),
    (True, {"nodes": 0}, "--nodes must be >= 1, got 0", "--nodes"),
    (True, {"time": -5}, "--time must be >= 1, got -5 (minutes)", "--time"),
    (True, {"mem_gb": 0.0}, "--mem-gb must be > 0, got 0.0", "--mem-gb"),
    (True, {"tasks_per_node": 3}, "--tasks-per-node 3 with --gpus-per-node 8: one task per GPU "
     "(leave --tasks-per-node out, or ask for 3 GPU(s))", "--tasks-per-node"),
    (True, {"cluster": "local", "nodes": 2, "gpus_per_node": 0}, "--nodes 2 with --cluster "
     "local: the local executor runs on this machine only (--nodes 1)", "--nodes"),
])
def test_bad_job_options_are_one_sentence_each(slurm: bool, flags: dict, text: str,
                                               subject: str) -> None:
    with pytest.raises(JobError) as caught:
        check_job_options(slurm, _given(**flags))
    assert str(caught.value) == text and caught.value.subject == subject
    assert text.startswith(subject) and text.endswith(caught.value.detail)


def test_without_sbatch_slurm_is_refused(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(JobError, match=r"^sbatch not found: SLURM is not installed here"):
        check_job_options(True, _given())


def _fake_slurm(tmp_path: Path) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("sbatch", "srun"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_a_slurm_job_of_either_stage_ends_all_its_tasks_when_one_fails(
        monkeypatch, tmp_path: Path) -> None:
    """``srun --kill-on-bad-exit=1``, whichever stage builds the executor."""
    from pretrain.slurm import make_executor as pretrain_executor
    from transfer.slurm import make_executor as transfer_executor

    monkeypatch.setenv("PATH", _fake_slurm(tmp_path))
    opts = check_job_options(True, _given(nodes=2, mem_gb=1.5))
    for make in (pretrain_executor, transfer_executor):
        executor = make(opts, tmp_path / "slurm", "job")
        assert executor.parameters["srun_args"] == ["--kill-on-bad-exit=1"]
        assert (executor.parameters["nodes"], executor.parameters["mem"]) == (2, "1536MB")


def test_jobs_is_a_leaf_that_imports_no_stage() -> None:
    import ast

    stages = {"pretrain", "convert", "transfer"}
    for path in sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            assert not {n.split(".")[0] for n in names} & stages, (path.name, names)


def test_a_signal_is_noted_in_the_loop_and_requeues_outside_it() -> None:
    import signal

    from jobs.stop import StopRequest

    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    stop = StopRequest(signal.SIGUSR2, in_loop=True).install()
    try:
        assert not stop.check()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.check() and stop.agreed and calls == []  # noted, agreed (one rank)
        stop.in_loop = False
        with pytest.raises(SystemExit) as caught:  # nothing unsaved: submitit's handler now
            os.kill(os.getpid(), signal.SIGUSR2)
        assert caught.value.code == 0 and calls == [signal.SIGUSR2]
    finally:
        stop.uninstall()
        signal.signal(signal.SIGUSR2, previous)
