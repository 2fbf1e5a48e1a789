"""``data.pipeline`` and ``data.cache`` wired into the trainer (issue 14): every path trains,
resumes bit-exactly, and the tensor paths from files and from a resident copy are the same
run (the views are a function of seed, epoch and dataset index; the sampler order is shared).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.__main__ import main
from pretrain.checkpoint import load_checkpoint

from .conftest import TINY


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run / "last.pth")
    return {f"{b}.{k}": v for b in ("student", "teacher") for k, v in ckpt[b].items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("path", [["data.pipeline=tensor"], ["data.cache=device"],
                                  ["data.pipeline=pil"]])
def test_every_path_resumes_bit_exactly(path: list[str], tiny_train: Path,
                                         tmp_path: Path) -> None:
    args = [*TINY, *path, "train.steps=6", "train.device=cpu"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--data", str(tiny_train), "--out", str(full), *args]) == 0
    assert main(["train", "--data", str(tiny_train), "--out", str(split), *args,
                 "--stop-after", "3"]) == 0
    assert main(["train", "--data", str(tiny_train), "--out", str(split), "--resume"]) == 0
    _same(_weights(full), _weights(split))


def test_resident_copy_and_files_give_the_same_run(tiny_train: Path, tmp_path: Path) -> None:
    args = [*TINY, "train.steps=4", "train.device=cpu", "data.pipeline=tensor"]
    assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / "files"),
                 *args]) == 0
    assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / "resident"),
                 *args, "data.cache=device"]) == 0
    _same(_weights(tmp_path / "files"), _weights(tmp_path / "resident"))


def test_auto_is_the_tensor_path_on_the_cpu(tiny_train: Path, tmp_path: Path) -> None:
    """On the CPU too the tensor path is the faster (benchmarks/results/data_pipeline.md)."""
    args = [*TINY, "train.steps=2", "train.device=cpu"]
    for pipeline in ("auto", "tensor"):
        assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / pipeline),
                     *args, f"data.pipeline={pipeline}"]) == 0
    _same(_weights(tmp_path / "auto"), _weights(tmp_path / "tensor"))


def test_the_tensor_path_is_another_run_than_pil(tiny_train: Path, tmp_path: Path) -> None:
    """The switch is real: PIL and tensor views differ in rounding, so the weights do too."""
    args = [*TINY, "train.steps=2", "train.device=cpu"]
    assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / "pil"), *args,
                 "data.pipeline=pil"]) == 0
    assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / "tensor"), *args,
                 "data.pipeline=tensor"]) == 0
    a, b = _weights(tmp_path / "pil"), _weights(tmp_path / "tensor")
    assert not torch.equal(a["student.backbone.conv1.weight"], b["student.backbone.conv1.weight"])


@pytest.mark.parametrize("overrides,message", [
    (["data.cache=device", "data.pipeline=pil"], "data.cache=device"),
    (["data.pipeline=dali"], "data.pipeline must be one of auto, pil, tensor"),
    (["data.cache=gpu"], "data.cache must be one of none, device"),
])
def test_bad_pipeline_settings_are_one_line(overrides: list[str], message: str,
                                            tiny_train: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tiny_train), "--out", str(tmp_path / "run"), *TINY,
                 "train.steps=2", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
