"""Bad input: one clear ``error:`` line, exit code ≠ 0, nothing overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.__main__ import main

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def run_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_data_folder(tmp_path: Path, capsys) -> None:
    line = run_error(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                      *TINY], capsys)
    assert "nope" in line and "not found" in line


def test_empty_data_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    line = run_error(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r"),
                      *TINY], capsys)
    assert "empty" in line and "no images" in line


def test_unknown_architecture(tiny_train: Path, tmp_path: Path, capsys) -> None:
    line = run_error(["train", "--data", str(tiny_train), "--out", str(tmp_path / "r"),
                      *TINY, "model.arch=resnet7"], capsys)
    assert "model.arch" in line and "resnet50" in line


def test_unknown_config_key_lists_the_valid_ones(tiny_train: Path, tmp_path: Path, capsys) -> None:
    line = run_error(["train", "--data", str(tiny_train), "--out", str(tmp_path / "r"),
                      "train.epoch=3"], capsys)
    assert "train.epoch" in line and "epochs" in line


def test_wrong_type_and_unknown_config_name(tiny_train: Path, tmp_path: Path, capsys) -> None:
    line = run_error(["train", "--data", str(tiny_train), "--out", str(tmp_path / "r"),
                      "data.batch_size=many"], capsys)
    assert "data.batch_size must be int" in line
    line = run_error(["train", "--config", "no_such_recipe", "--data", str(tiny_train),
                      "--out", str(tmp_path / "r")], capsys)
    assert "no_such_recipe" in line and "resnet18_cifar" in line


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_resume_from_a_corrupt_checkpoint_fails_and_keeps_it(tiny_train: Path, tmp_path: Path,
                                                            capsys, content: bytes) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.pth").write_bytes(content)
    line = run_error(["train", "--data", str(tiny_train), "--out", str(run), "--resume"], capsys)
    assert "last.pth" in line and "not a readable checkpoint" in line
    assert (run / "last.pth").read_bytes() == content


def test_resume_from_a_foreign_checkpoint_fails_and_keeps_it(tiny_train: Path, tmp_path: Path,
                                                            capsys) -> None:
    run = tmp_path / "r"
    run.mkdir()
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, run / "last.pth")
    before = (run / "last.pth").read_bytes()
    line = run_error(["train", "--data", str(tiny_train), "--out", str(run), "--resume"], capsys)
    assert "not a momentum2 pretraining checkpoint" in line and "state_dict" in line
    assert (run / "last.pth").read_bytes() == before


def test_existing_run_is_not_overwritten_without_resume(tiny_train: Path, tmp_path: Path,
                                                        capsys) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.pth").write_bytes(b"precious")
    line = run_error(["train", "--data", str(tiny_train), "--out", str(run), *TINY], capsys)
    assert "--resume" in line
    assert (run / "last.pth").read_bytes() == b"precious"


def test_unreadable_images_are_skipped_and_counted(tiny_train: Path, tmp_path: Path,
                                                   capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_train, data, symlinks=True)
    first_class = sorted(data.iterdir())[0]
    (first_class / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    run = tmp_path / "r"
    # 65 images, batch 13: 5 steps cover every image of the epoch, the broken one included
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "data.batch_size=13",
                 "train.steps=5", "data.max_bad_fraction=0.1"]) == 0
    warned = [x for x in capsys.readouterr().out.splitlines() if "unreadable image(s)" in x]
    assert len(warned) == 1 and "skipped 1 unreadable image(s)" in warned[0]
    assert str(first_class / "broken.jpg") in warned[0]  # the file is named
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["bad_images"] == 1


def test_cli_error_is_one_line_without_traceback_in_a_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", "--data",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_checkpoint(
        tiny_train: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    args = ["train", "--data", str(tiny_train), "--out", str(run), *TINY, "train.steps=8"]
    assert main([*args, "--stop-after", "2"]) == 0
    good = (run / "last.pth").read_bytes()
    capsys.readouterr()
    # resume with an absurd learning rate: the weights blow up and the loss turns NaN
    line = run_error(["train", "--data", str(tiny_train), "--out", str(run), "--resume",
                      "optim.base_lr=1e30"], capsys)
    assert "at step" in line and "nan" in line.lower()
    assert (run / "last.pth").read_bytes() == good


def test_nonfinite_skip_policy_counts_skipped_steps(tiny_train: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert main(["train", "--data", str(tiny_train), "--out", str(run), *TINY, "train.steps=4",
                 "optim.base_lr=1e30", "train.nonfinite=skip"]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["skipped_steps"] >= 1


def test_resume_flag_starts_afresh_when_there_is_no_checkpoint_yet(tiny_train: Path,
                                                                   tmp_path: Path) -> None:
    # what a restarted torchrun job relies on: the same command line works the first time
    run = tmp_path / "r"
    assert main(["train", "--data", str(tiny_train), "--out", str(run), *TINY, "train.steps=2",
                 "--resume"]) == 0
    assert (run / "last.pth").exists()


def test_profile_writes_a_trace(tiny_train: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert main(["train", "--data", str(tiny_train), "--out", str(run), *TINY, "train.steps=4",
                 "--profile", "2"]) == 0
    assert list((run / "profile").glob("*.json*")), "no profiler trace written"


def test_a_broken_configs_link_is_named_not_an_empty_list(tmp_path: Path, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pretrain.__main__ as cli

    monkeypatch.setattr(cli, "CONFIG_DIR", tmp_path / "configs")  # as a checkout without links
    line = run_error(["train", "--config", "resnet18_cifar", "--data", str(tmp_path),
                      "--out", str(tmp_path / "r")], capsys)
    assert str(tmp_path / "configs") in line and "link" in line
