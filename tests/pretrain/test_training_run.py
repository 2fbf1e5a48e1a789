"""Short real training runs on CIFAR-10 images: loss, run directory, exact resume, kNN."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pretrain import bn_alpha, cosine_momentum
from pretrain.__main__ import main
from pretrain.checkpoint import load_checkpoint

from .conftest import TINY


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_the_loss_and_writes_the_run_directory(tiny_train: Path, tiny_val: Path,
                                                                tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code = main(["train", "--data", str(tiny_train), "--val", str(tiny_val), "--out", str(run),
                 *TINY, "train.steps=16", "data.batch_size=16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "resolved config:" in printed and "eta" in printed and "img/s" in printed
    assert {"config.yaml", "metrics.jsonl", "last.pth", "tb"} <= {p.name for p in run.iterdir()}
    assert list((run / "tb").iterdir()), "no TensorBoard events written"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["arch"] == "resnet18" and saved["train"]["steps"] == 16
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 17))
    for key in ("loss", "lr", "m", "alpha", "img_per_s", "gap"):
        assert key in records[0]
    first = sum(r["loss"] for r in records[:4]) / 4
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < first, f"loss did not go down: {first:.3f} -> {last:.3f}"
    # the last step (k = 15 of K = 16) mixes with α_15 and averages with m_15
    assert records[-1]["alpha"] == pytest.approx(bn_alpha(15, 16))
    assert records[-1]["m"] == pytest.approx(cosine_momentum(15, 16, 0.99))
    knn = [r for r in read_metrics(run) if "knn_top1_teacher" in r]
    assert knn and 0.0 <= knn[-1]["knn_top1_teacher"] <= 100.0
    ckpt = load_checkpoint(run / "last.pth")
    assert ckpt["step"] == 16 and ckpt["method"] == "m2t" and ckpt["arch"] == "resnet18"
    assert int(ckpt["teacher"]["backbone.bn1.step"]) == 16


@pytest.mark.slow
def test_resume_is_exact_two_n_steps_equal_n_plus_resume_plus_n(tiny_train: Path,
                                                                tmp_path: Path) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    # 8 images a step, 64 images: 8 steps per epoch; 12 steps cross an epoch boundary
    args = [*TINY, "train.steps=12"]
    assert main(["train", "--data", str(tiny_train), "--out", str(full), *args,
                 "data.workers=2"]) == 0
    assert main(["train", "--data", str(tiny_train), "--out", str(split), *args,
                 "--stop-after", "5"]) == 0
    assert load_checkpoint(split / "last.pth")["step"] == 5
    assert main(["train", "--data", str(tiny_train), "--out", str(split), "--resume"]) == 0
    a, b = load_checkpoint(full / "last.pth"), load_checkpoint(split / "last.pth")
    assert a["step"] == b["step"] == 12
    for branch in ("student", "teacher"):
        for key, value in a[branch].items():
            assert torch.equal(value, b[branch][key]), f"{branch}.{key} differs after resume"
    losses_a = [r["loss"] for r in read_metrics(full) if "loss" in r]
    losses_b = [r["loss"] for r in read_metrics(split) if "loss" in r]
    assert losses_a == losses_b


def test_a_resume_reads_the_checkpoint_once(tiny_train: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    """last.pth gives the resumed run both its config and its state, from one read."""
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_train), "--out", str(run), *TINY, "train.steps=3",
            "train.device=cpu"]
    assert main([*args, "--stop-after", "2"]) == 0
    reads: list[object] = []
    load = torch.load

    def counting_load(f, *a, **kw):
        reads.append(getattr(f, "name", f))
        return load(f, *a, **kw)

    monkeypatch.setattr(torch, "load", counting_load)
    assert main(["train", "--data", str(tiny_train), "--out", str(run), "--resume"]) == 0
    assert len(reads) == 1 and str(reads[0]).endswith("last.pth"), reads
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pth")["step"] == 3
