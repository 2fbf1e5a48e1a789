"""The run request: read once from the command line, frozen, derived (never changed) by sweeps;
the command line itself without torch, Detectron2 or submitit."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from transfer.__main__ import build_parser
from transfer.errors import TransferError
from transfer.request import RunRequest, request_from_args

REPO = Path(__file__).resolve().parents[2]
MAX_PARAMETERS = 8


def request_of(*argv: str) -> RunRequest:
    return request_from_args(build_parser().parse_args(list(argv)))


def test_no_function_in_transfer_takes_more_than_8_parameters() -> None:
    too_many = []
    for path in sorted((REPO / "transfer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                a = node.args
                count = (len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
                         + (a.vararg is not None) + (a.kwarg is not None))
                if count > MAX_PARAMETERS:
                    too_many.append(f"{path.name}:{node.lineno} "
                                    f"{getattr(node, 'name', 'lambda')} ({count})")
    assert not too_many, "more than 8 parameters: " + ", ".join(too_many)


def test_the_command_line_becomes_one_frozen_request() -> None:
    request = request_of("train", "--config", "fcos_R_50_FPN_1x", "--weights", "w.pkl",
                         "--test-dataset", "val.json", "--num-gpus", "2", "--resume",
                         "--evaluator", "official", "SOLVER.MAX_ITER", "10")
    assert request == RunRequest(
        "train", "fcos_R_50_FPN_1x", "w.pkl", overrides=("SOLVER.MAX_ITER", "10"),
        test_dataset="val.json", num_gpus=2, resume=True, evaluator="official")
    assert request.world_size == 2 and not request.is_sweep
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.resume = False  # type: ignore[misc]
    assert request_of("eval", "--config", "c", "--weights", "m.pth") == RunRequest(
        "eval", "c", "m.pth")


def test_seeds_and_methods_end_where_the_config_overrides_begin() -> None:
    request = request_of("train", "--config", "c", "--methods", "a=x.pkl", "SOLVER.X", "1",
                         "--seeds", "0", "1", "SEED", "2", "MODEL.Y", "3")
    assert request.methods == ("a=x.pkl",)
    assert request.seeds == ("0", "1")
    # the seeds' overrides in front of the methods', as given
    assert request.overrides == ("SEED", "2", "MODEL.Y", "3", "SOLVER.X", "1")
    assert request.is_sweep


def test_the_launch_options_are_checked_when_the_request_is_read() -> None:
    with pytest.raises(TransferError, match="--num-gpus: must be >= 1"):
        request_of("eval", "--config", "c", "--weights", "w", "--num-gpus", "0")
    with pytest.raises(TransferError, match="--machine-rank: must be between 0 and"):
        request_of("train", "--config", "c", "--weights", "w", "--num-machines", "2",
                   "--machine-rank", "2")
    with pytest.raises(TransferError, match="--weights: required"):
        request_of("train", "--config", "c")


def test_an_eval_request_has_no_training_options() -> None:
    with pytest.raises(ValueError, match="train_dataset"):
        RunRequest("eval", "c", "w", train_dataset="train.json")
    with pytest.raises(ValueError, match="task"):
        RunRequest("test", "c", "w")


def test_a_job_request_runs_on_the_jobs_processes_and_device() -> None:
    request = RunRequest("train", "c", "w", overrides=["SEED", "1"])
    job = request.for_job(nodes=2, tasks_per_node=4, device="cuda")
    assert (job.world_size, job.device, job.overrides) == (8, "cuda", ("SEED", "1"))
    assert (request.world_size, request.device) == (1, None)


def test_a_sweep_derives_each_cells_request_and_leaves_the_commands_alone(
        r18_pkl: Path, tmp_path: Path) -> None:
    from transfer.sweep import plan

    request = request_of("train", "--config", "fcos_R_50_FPN_1x", "--output-dir",
                         str(tmp_path), "--methods", f"a={r18_pkl}", f"b={r18_pkl}",
                         "SEED", "3", "SOLVER.MAX_ITER", "2")
    before = dataclasses.replace(request)
    root, cells = plan(request)
    assert request == before
    assert root == tmp_path
    assert [(cell.method, cell.seed, cell.output_dir) for cell in cells] == [
        ("a", 3, tmp_path / "a" / "seed_3"), ("b", 3, tmp_path / "b" / "seed_3")]
    for cell in cells:
        assert cell.request == dataclasses.replace(
            request, weights=str(r18_pkl), method=cell.method, resume=True, seeds=None,
            methods=None, output_dir=str(cell.output_dir),
            overrides=("SOLVER.MAX_ITER", "2", "SEED", "3"))


def test_nothing_in_transfer_imports_the_command_module() -> None:
    """``transfer.__main__`` is the entry point: a module importing it (as the SLURM job once
    did, for ``quiet_libraries``) closes an import cycle through it."""
    importers = []
    for path in sorted((REPO / "transfer").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (
                    (node.level == 1 and node.module == "__main__")
                    or node.module == "transfer.__main__"):
                importers.append(f"{path.name}:{node.lineno}")
    assert not importers


def test_help_and_evaluate_import_no_training_stack(capsys: pytest.CaptureFixture[str]) -> None:
    """``m2t-transfer --help`` imports none of torch, Detectron2, submitit; parsing
    ``evaluate``/``report``/``configs`` neither (``train``'s options are added when it is
    parsed: its SLURM options come from a module importing submitit)."""
    code = (
        "import sys\n"
        "from transfer.__main__ import build_parser\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "parser.parse_args(['evaluate', '--dataset', 'd.json', '--predictions', 'p.json'])\n"
        "parser.parse_args(['report', 'run'])\n"
        "parser.parse_args(['configs'])\n"
        "heavy = ('torch', 'detectron2', 'submitit', 'fvcore', 'transfer.slurm')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--slurm", "--seeds", "--resume", "KEY VALUE"):  # added when used
        assert flag in help_text


def test_scoring_a_results_file_imports_no_detectron2_nor_torch(tmp_path: Path) -> None:
    """``m2t-transfer evaluate`` on a COCO-format file: the scoring libraries only."""
    gt = {"images": [{"id": 1, "width": 64, "height": 48, "file_name": "a.jpg"}],
          "categories": [{"id": 3, "name": "cat"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 10],
                           "area": 200, "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "p.json").write_text(json.dumps(
        [{"image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 10], "score": 0.9}]))
    code = (
        "import sys\n"
        "from transfer.__main__ import main\n"
        f"assert main(['evaluate', '--dataset', {str(tmp_path / 'gt.json')!r}, "
        f"'--predictions', {str(tmp_path / 'p.json')!r}]) == 0\n"
        "heavy = ('torch', 'torchvision', 'detectron2', 'submitit', 'fvcore')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert "100.0" in proc.stdout  # the one box found: AP 100
