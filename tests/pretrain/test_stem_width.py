"""model.stem (imagenet | cifar) and model.width: the small-image networks of issue 15."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms as T
from torch import nn

from pretrain.config import load_config
from pretrain.evaluate import load_backbone
from pretrain.model import build_backbone
from pretrain.train import Trainer

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def test_standard_network_is_torchvisions_with_the_same_initialisation() -> None:
    torch.manual_seed(3)
    ours, dim = build_backbone("resnet18")
    torch.manual_seed(3)
    theirs = torchvision.models.resnet18()
    theirs.fc = nn.Identity()
    assert dim == 512
    for (k1, a), (k2, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(a, b)


def test_cifar_stem_is_one_3x3_stride_1_conv_and_no_pool() -> None:
    net, dim = build_backbone("resnet18", stem="cifar")
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert net.conv1.padding == (1, 1) and net.conv1.bias is None
    assert isinstance(net.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    stages = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(net, name).register_forward_hook(lambda m, i, o: stages.append(o.shape[-1]))
    assert net(x).shape == (2, dim)
    assert stages == [32, 16, 8, 4]  # the ImageNet stem would leave 8, 4, 2, 1
    imagenet, _ = build_backbone("resnet18")
    assert list(net.state_dict()) == list(imagenet.state_dict())  # torchvision's keys


@pytest.mark.parametrize("arch, width, dim", [("resnet18", 16, 128), ("resnet50", 32, 1024)])
def test_width_scales_every_channel_count(arch: str, width: int, dim: int) -> None:
    net, got = build_backbone(arch, width=width)
    standard, _ = build_backbone(arch)
    assert got == dim
    assert list(net.state_dict()) == list(standard.state_dict())
    for key, tensor in net.state_dict().items():
        expected = standard.state_dict()[key].shape
        scaled = tuple(d if (i >= 2 or d == 3 and key == "conv1.weight" and i == 1)
                       else d * width // 64 for i, d in enumerate(expected))
        if tensor.dim() == 0:
            scaled = ()
        assert tuple(tensor.shape) == scaled, key
    # torchvision's initialisation: BN weight 1, bias 0; conv std sqrt(2 / fan_out)
    conv = net.layer3[0].conv1.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    assert torch.equal(net.bn1.weight, torch.ones(width))


def test_unknown_stem_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="model.stem must be one of imagenet, cifar"):
        load_config(None, ["model.stem=tiny"])
    with pytest.raises(Exception, match=r"model.width must be in \[8, 1024\], got 4"):
        load_config(None, ["model.width=4"])


def test_cifar_stem_trains_exports_and_evaluates(tiny_train: Path, tiny_val: Path,
                                                 tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "model.stem=cifar", "model.width=16", "train.steps=3",
                             "train.device=cpu"])
    run = tmp_path / "run"
    before = build_backbone("resnet18", "cifar", 16)[0]
    trainer = Trainer(cfg, tiny_train, run, val=str(tiny_val))
    trainer.run()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1_teacher" in r for r in records)
    backbone, info = load_backbone(run, "teacher")
    assert info["config"].model.stem == "cifar" and info["config"].model.width == 16
    assert backbone.conv1.weight.shape == (16, 3, 3, 3)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert set(before.state_dict()) <= set(backbone.state_dict())  # + momentum-BN counters


def test_shipped_cpu_recipe_loads_and_says_what_it_is() -> None:
    cfg = load_config(str(REPO / "configs" / "pretrain" / "resnet18_cifar_cpu.yaml"), [])
    assert (cfg.model.arch, cfg.model.stem) == ("resnet18", "cifar")
    assert cfg.data.cache == "device" and cfg.data.pipeline == "tensor"
    assert cfg.data.image_size == 32


@pytest.mark.parametrize("bad", [["--config", "missing.yaml"], ["--set", "optim.name=adam"]])
def test_learning_curve_script_refuses_a_bad_config_in_one_line(bad: list[str], tiny_train: Path,
                                                                tiny_val: Path,
                                                                tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "learning_curve.py"), "--train",
           str(tiny_train), "--val", str(tiny_val), "--quick", "--out", str(tmp_path), *bad]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("learning_curve.py: error: ") and bad[1].split("=")[0] in last, last
    assert not (tmp_path / "learning_curve.jsonl").exists()


@pytest.mark.slow
def test_learning_curve_script_runs_on_a_tiny_budget(tiny_train: Path, tiny_val: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "learning_curve.py"), "--train",
           str(tiny_train), "--val", str(tiny_val), "--quick", "--batches", "8",
           "--methods", "m2t", "byol", "--out", str(out),
           "--set", "model.proj_hidden_dim=64", "model.proj_dim=32", "optim.warmup_epochs=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "learning_curve.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"m2t", "byol"}
    for method in ("m2t", "byol"):
        steps = [r["step"] for r in rows if r["method"] == method]
        assert steps == [0, 1, 2]  # --quick: 2 batches, scored at 0, 1 and 2 steps
        first = next(r for r in rows if r["method"] == method and r["step"] == 0)
        assert first["knn_teacher"] == first["knn_student"]  # step 0: teacher = student
        assert [r["final"] for r in rows if r["method"] == method] == [False, False, True]
    md = (out / "learning_curve.md").read_text()
    assert "| m2t | 8 | 16 | 1 |" in md and (out / "learning_curve.png").stat().st_size > 0
    # a rerun skips the finished cells
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0
    assert len((out / "learning_curve.jsonl").read_text().splitlines()) == len(rows)


def test_learning_curve_report_pairs_m2t_and_byol_by_seed(tmp_path: Path) -> None:
    """The small-batch study's verdict: m2t − byol per batch, paired seed by seed, only over
    finished cells (hand-computed here)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.learning_curve import paired_differences, write_report

    def row(method, batch, seed, teacher, student, final=True):
        return {"method": method, "batch": batch, "seed": seed, "images_budget": 64,
                "steps_total": 64 // batch, "step": 64 // batch if final else 1,
                "images_seen": 64 if final else batch, "train_seconds": 6.0,
                "knn_teacher": teacher, "knn_student": student, "gap": 0.01, "final": final,
                "arch": "resnet18/cifar/w16", "image_size": 32, "optim": "sgd 0.5",
                "threads": 1, "load1": 1.0}

    rows = [row("m2t", 32, 0, 30.0, 31.0), row("byol", 32, 0, 27.0, 29.0),
            row("m2t", 32, 1, 29.0, 30.0), row("byol", 32, 1, 28.0, 30.5),
            row("m2t", 16, 0, 26.0, 26.0),  # byol never ran at batch 16: no pair
            row("byol", 16, 0, 20.0, 20.0, final=False),  # a killed cell does not count
            row("m2t", 8, 2, 25.0, 25.0), row("byol", 8, 3, 24.0, 24.0)]  # other seeds
    pairs = paired_differences(rows)
    assert [(p["batch"], p["seeds"]) for p in pairs] == [(32, [0, 1])]
    assert pairs[0]["teacher"] == [3.0, 1.0] and pairs[0]["student"] == [2.0, -0.5]
    md = write_report(rows, tmp_path, "cmd", {"cpu": "x", "cores": 2, "torch": "t"}).read_text()
    # mean +2.0, sample std of (3, 1) = 1.414; student mean +0.75, std 1.77
    assert "| 32 | 64 | 2 | +2.0 ± 1.4 | +0.8 ± 1.8 | +3.0, +1.0 |" in md


@pytest.mark.parametrize("pipeline", ["pil", "tensor"])
def test_blur_settings_reach_the_views_the_trainer_draws(pipeline: str, tiny_train: Path,
                                                         tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, f"data.pipeline={pipeline}", "data.view1_blur=0.25",
                             "data.view2_blur=0", "train.device=cpu"])
    trainer = Trainer(cfg, tiny_train, tmp_path / "run")
    if pipeline == "tensor":
        probabilities = [r.blur_p for r in trainer.feed.augment.recipes]
    else:
        views = trainer.dataset.transform
        probabilities = [next(t.p for t in v.transforms if isinstance(t, T.RandomApply)
                              and isinstance(t.transforms[0], T.GaussianBlur))
                         for v in (views.view1, views.view2)]
    assert probabilities == [0.25, 0.0]
