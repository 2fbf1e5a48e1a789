"""The standard linear evaluation (``linear --protocol standard``, SPEC §2) and the fast probe.

The recipe's pieces against hand-computed values (LR scaling, the per-step cosine, the
transforms, the head's layers, the best epoch), the backbone left untouched, a run stopped and
resumed equal bit for bit to an uninterrupted one, and what the command prints and writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

from pretrain.__main__ import main
from pretrain.data.folder import image_folder
from pretrain.distributed import Dist
from pretrain.evaluate import load_backbone
from pretrain.linear import (
    PAPER_REPORTS,
    LinearEval,
    LinearHead,
    Recipe,
    Score,
    SeededImages,
    Source,
    better,
    lr_at,
    train_transform,
    val_short_side,
    val_transform,
)

from .conftest import TINY

#: 64 images at a total batch of 16: 4 steps per epoch, 12 in 3 epochs
STANDARD = ["--protocol", "standard", "--epochs", "3", "--batch-size", "16", "--workers", "0",
            "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tiny_train: Path, module_tmp) -> Path:
    """A tiny pretraining run (2 steps) whose backbones the evaluations score."""
    out = module_tmp("linear") / "run"
    assert main(["train", "--data", str(tiny_train), "--out", str(out), *TINY,
                 "train.steps=2"]) == 0
    return out


# ----- the recipe -------------------------------------------------------------------------
def test_lr_is_0_2_times_the_total_batch_over_256() -> None:
    assert Recipe().lr == pytest.approx(0.2)  # the authors' 256 images
    assert Recipe(batch_size=1024).lr == pytest.approx(0.8)
    assert Recipe(batch_size=16).lr == pytest.approx(0.0125)
    assert Recipe(base_lr=0.1, batch_size=512).lr == pytest.approx(0.2)


def test_the_authors_defaults() -> None:
    r = Recipe()
    assert (r.epochs, r.batch_size, r.momentum, r.weight_decay, r.head_bn) == \
        (80, 256, 0.9, 0.0, True)
    assert PAPER_REPORTS == "best"


def test_lr_follows_a_half_cosine_per_step_to_zero() -> None:
    # step k of K trains at lr · (1 + cos πk/K) / 2
    assert lr_at(0, 8, 0.2) == pytest.approx(0.2)
    assert lr_at(2, 8, 0.2) == pytest.approx(0.2 * (1 + math.sqrt(0.5)) / 2)  # 0.170711
    assert lr_at(4, 8, 0.2) == pytest.approx(0.1)
    assert lr_at(6, 8, 0.2) == pytest.approx(0.2 * (1 - math.sqrt(0.5)) / 2)  # 0.029289
    assert lr_at(8, 8, 0.2) == pytest.approx(0.0)


def test_the_batch_is_split_evenly_over_the_ranks() -> None:
    from pretrain.errors import UserError

    assert Recipe(batch_size=256).per_rank_batch(8) == 32
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        Recipe(batch_size=256).per_rank_batch(3)


def test_training_images_are_random_resized_crops_flipped() -> None:
    crop, flip, _, norm = train_transform(32).transforms
    assert isinstance(crop, T.RandomResizedCrop) and crop.size == (32, 32)
    assert crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BILINEAR
    assert isinstance(flip, T.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(norm, T.Normalize) and tuple(norm.mean) == (0.485, 0.456, 0.406)


def test_test_images_are_resized_by_256_over_224_and_centre_cropped() -> None:
    assert val_short_side(224) == 256  # the authors' Resize(256) + CenterCrop(224)
    assert val_short_side(32) == 37  # round(32 · 256 / 224) = round(36.57)
    resize, crop, _, _ = val_transform(32).transforms
    assert isinstance(resize, T.Resize) and resize.size == 37
    assert resize.interpolation == T.InterpolationMode.BILINEAR
    assert isinstance(crop, T.CenterCrop) and crop.size == (32, 32)
    # a 74 × 37 image (short side already 37): the crop is its middle 32 × 32
    pixels = torch.arange(74, dtype=torch.uint8).repeat(37, 1)  # column index as value
    img = Image.fromarray(torch.stack([pixels] * 3, -1).numpy())
    out = val_transform(32)(img)
    std = torch.tensor(0.229)
    first_column = out[0, 0, 0] * std + torch.tensor(0.485)  # back to [0, 1]
    assert first_column * 255 == pytest.approx(21, abs=1e-3)  # (74 − 32) / 2 = 21


def test_each_image_crop_depends_on_seed_epoch_and_index_only(tiny_train: Path) -> None:
    folder = image_folder(tiny_train, train_transform(32))
    a, b = SeededImages(folder, seed=0), SeededImages(folder, seed=0)
    torch.manual_seed(123)  # the global RNG state does not matter
    first = a[5][0]
    torch.manual_seed(456)
    assert torch.equal(first, b[5][0])
    b.set_epoch(1)
    assert not torch.equal(first, b[5][0])


def test_the_head_is_linear_then_batchnorm() -> None:
    torch.manual_seed(0)
    head = LinearHead(128, 10)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d]
    linear, bn = head
    assert (linear.in_features, linear.out_features, bn.num_features) == (128, 10, 10)
    assert bn.affine and bn.track_running_stats  # the authors' BatchNorm1d(1000)
    assert torch.equal(linear.bias, torch.zeros(10))
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)  # N(0, 0.01)
    assert [type(m) for m in LinearHead(128, 10, bn=False)] == [nn.Linear]


def test_the_best_epoch_is_the_first_with_the_highest_top1() -> None:
    best = None
    for score in [Score(1, 10.0, 50.0), Score(2, 30.0, 60.0), Score(3, 30.0, 90.0),
                  Score(4, 20.0, 95.0)]:
        best = better(best, score)
    assert best == Score(2, 30.0, 60.0)  # a tie keeps the earlier epoch, and its own top-5


# ----- a run ------------------------------------------------------------------------------
def test_the_backbone_is_frozen_and_only_the_head_trains(run: Path, tiny_train: Path,
                                                         tiny_val: Path, tmp_path: Path) -> None:
    backbone, info = load_backbone(run, "teacher")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    ev = LinearEval(backbone, tiny_train, tiny_val, tmp_path / "lin",
                    Recipe(epochs=1, batch_size=16, image_size=32, workers=0),
                    Source(str(info["path"]), "teacher", info["step"]), Dist(),
                    torch.device("cpu"))
    head = {k: v.clone() for k, v in ev.head.state_dict().items()}
    outcome = ev.run()
    assert outcome.finished and outcome.step == 4
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    for key, value in backbone.state_dict().items():  # BN running statistics included
        assert torch.equal(value, before[key]), key
    assert not torch.equal(ev.head[0].weight, head["0.weight"])
    assert ev.head[1].num_batches_tracked.item() == 4


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_stopped_and_resumed_equals_an_uninterrupted_one(run: Path, tiny_train: Path,
                                                               tiny_val: Path, tmp_path: Path,
                                                               capsys) -> None:
    args = [str(run), "--train", str(tiny_train), "--val", str(tiny_val), *STANDARD]
    assert main(["linear", *args, "--out", str(tmp_path / "straight")]) == 0
    straight = capsys.readouterr().out
    # stopped mid-epoch 2 (step 6 of 12), resumed to the end
    assert main(["linear", *args, "--out", str(tmp_path / "resumed"), "--stop-after", "6"]) == 0
    assert "stopped at step 6/12; continue with --resume" in capsys.readouterr().out
    assert main(["linear", *args, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "resuming at step 6" in resumed
    a = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert a["step"] == b["step"] == 12
    for key, value in a["head"].items():
        assert torch.equal(value, b["head"][key]), key
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"],
                           b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["history"] == b["history"] and a["best"] == b["best"]
    drop = {"img_per_s"}
    same = [[{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / o)]
            for o in ("straight", "resumed")]
    assert same[0] == same[1]
    assert straight.splitlines()[-4:] == resumed.splitlines()[-4:]  # the table, the note


def test_the_lr_of_each_step_is_the_recipes(run: Path, tiny_train: Path, tiny_val: Path,
                                            tmp_path: Path) -> None:
    assert main(["linear", str(run), "--train", str(tiny_train), "--val", str(tiny_val),
                 *STANDARD, "--epochs", "1", "--out", str(tmp_path / "lin")]) == 0
    steps = [r for r in records(tmp_path / "lin") if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    lr = 0.2 * 16 / 256
    for r in steps:  # the rate the step trained at
        assert r["lr"] == pytest.approx(lr * (1 + math.cos(math.pi * (r["step"] - 1) / 4)) / 2)


def test_the_command_reports_the_last_and_the_best_epoch(run: Path, tiny_train: Path,
                                                         tiny_val: Path, capsys) -> None:
    assert main(["linear", str(run), "--train", str(tiny_train), "--val", str(tiny_val),
                 *STANDARD, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "| branch | step | linear_top1_last | linear_top5_last | linear_top1_best | " \
           "linear_top5_best | best_epoch |" in out
    assert "reported: the Momentum² Teacher paper reports the best epoch" in out
    folder = run / "linear_teacher"  # the default --out, the authors' branch
    result = json.loads((folder / "results.json").read_text())
    assert result["reported"] == "best" and result["last"]["epoch"] == 2
    epochs = [r for r in records(folder) if "linear_top1" in r]
    assert max(r["linear_top1"] for r in epochs) == result["best"]["top1"]
    assert (folder / "config.yaml").read_text().startswith("recipe:\n  epochs: 2\n")
    row = [r for r in records(run) if r.get("protocol") == "standard"][-1]
    assert row["linear_top1_best"] == result["best"]["top1"] and row["reported"] == "best"
    # started again without --resume: refused, the results kept
    assert main(["linear", str(run), "--train", str(tiny_train), "--val", str(tiny_val),
                 *STANDARD, "--epochs", "2"]) == 2
    assert "already holds last.pth; pass --resume" in capsys.readouterr().err


def test_resume_with_another_recipe_is_refused(run: Path, tiny_train: Path, tiny_val: Path,
                                               tmp_path: Path, capsys) -> None:
    args = [str(run), "--train", str(tiny_train), "--val", str(tiny_val), *STANDARD,
            "--out", str(tmp_path / "lin")]
    assert main(["linear", *args, "--stop-after", "1"]) == 0
    assert main(["linear", *args, "--resume", "--lr", "0.5"]) == 2
    assert "base_lr 0.2 → 0.5" in capsys.readouterr().err


# ----- the fast probe ---------------------------------------------------------------------
def test_the_probe_normalises_its_features_only_when_asked(run: Path, tiny_train: Path,
                                                           tiny_val: Path, capsys) -> None:
    from pretrain import evaluate

    seen = []
    real = evaluate.train_linear

    def spy(train_x, *args, **kwargs):
        seen.append(train_x.norm(dim=1))
        return real(train_x, *args, **kwargs)

    evaluate.train_linear = spy
    try:
        for extra in ([], ["--normalize"]):
            assert main(["linear", str(run), "--train", str(tiny_train), "--val",
                         str(tiny_val), "--epochs", "2", "--branch", "teacher", *extra]) == 0
    finally:
        evaluate.train_linear = real
    assert not torch.allclose(seen[0], torch.ones_like(seen[0]))  # the default: as they are
    torch.testing.assert_close(seen[1], torch.ones_like(seen[1]))
    rows = [r for r in records(run) if r.get("protocol") == "probe"]
    assert [r["normalize"] for r in rows[-2:]] == [False, True]


@pytest.mark.parametrize("flags, culprit", [
    (["--out", "x"], "--out"), (["--resume"], "--resume"), (["--stop-after", "2"], "--stop-after"),
    (["--slurm"], "--slurm"), (["--batch-size", "32"], "--batch-size")])
def test_standard_only_flags_are_refused_by_the_probe(flags: list[str], culprit: str,
                                                      tiny_train: Path, tiny_val: Path,
                                                      capsys) -> None:
    assert main(["linear", "random", "--train", str(tiny_train), "--val", str(tiny_val),
                 *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {culprit}") and "only with --protocol standard" in err


def test_normalize_is_refused_by_the_standard_protocol(tiny_train: Path, tiny_val: Path,
                                                       tmp_path: Path, capsys) -> None:
    assert main(["linear", "random", "--train", str(tiny_train), "--val", str(tiny_val),
                 *STANDARD, "--normalize", "--out", str(tmp_path / "x")]) == 2
    assert "--normalize: only with --protocol probe" in capsys.readouterr().err


def test_the_standard_protocol_takes_the_branch_each_methods_authors_evaluate() -> None:
    from convert.layouts import OUR_METHODS
    from pretrain.checkpoint import EVALUATED_BRANCH, evaluated_branch
    from pretrain.methods import METHODS

    # one rule for the converter and the linear evaluation (SPEC §3), for every method we have
    assert {m: OUR_METHODS[m][0] for m in METHODS} == {m: EVALUATED_BRANCH[m] for m in METHODS}
    assert evaluated_branch({"model": {"method": "byol"}, "train": {"export_branch": "auto"}}) \
        == "student"
    assert evaluated_branch({"model": {"method": "m2t"}, "train": {"export_branch": "auto"}}) \
        == "teacher"
    # an explicit choice in the run's config wins
    assert evaluated_branch({"model": {"method": "byol"},
                             "train": {"export_branch": "teacher"}}) == "teacher"


def test_a_byol_run_is_evaluated_on_its_online_network(tiny_train: Path, tiny_val: Path,
                                                       tmp_path: Path) -> None:
    run = tmp_path / "byol"
    assert main(["train", "--data", str(tiny_train), "--out", str(run), *TINY,
                 "model.method=byol", "train.steps=1"]) == 0
    assert main(["linear", str(run), "--train", str(tiny_train), "--val", str(tiny_val),
                 *STANDARD, "--epochs", "1", "--stop-after", "1"]) == 0
    assert (run / "linear_student" / "last.pth").is_file()
    assert not (run / "linear_teacher").exists()
