"""LARS, kNN, shipped configs, mixed precision and channels_last on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.config import load_config
from pretrain.knn import knn_accuracy, knn_predict
from pretrain.lars import LARS, split_bn_and_bias
from pretrain.methods import build_method

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "pretrain").glob("*.yaml"))


def test_lars_scales_weights_by_trust_ratio_and_leaves_excluded_groups_plain_sgd() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0]))   # ‖w‖ = 5
    b = nn.Parameter(torch.tensor([1.0, 1.0]))
    w.grad = torch.tensor([0.6, 0.8])              # ‖g‖ = 1
    b.grad = torch.tensor([0.5, -0.5])
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True}], lr=0.1, momentum=0.0,
               trust_coefficient=0.01)
    opt.step()
    ratio = 0.01 * 5 / 1
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * ratio * torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.95, 1.05]))


def test_lars_excludes_batchnorm_and_biases() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    adapt, exclude = split_bn_and_bias(net)
    assert {id(p) for p in adapt} == {id(net[0].weight), id(net[2].weight)}
    assert len(exclude) == 4  # conv bias, BN weight and bias, linear bias


def test_knn_on_a_hand_checked_fixture() -> None:
    # memory bank: two class-0 points near +x, one class-1 point near +y
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 1.0]]), dim=1)
    # k = 1: nearest neighbour decides
    assert knn_predict(bank, labels, queries, 2, k=1).argmax(1).tolist() == [0, 1, 1]
    # k = 3, T = 1: query (0, 1) votes with weight e^cos; cosines are ±0.1/√1.01 for the
    # class-0 points and 1/√1.01 for the class-1 point
    scores = knn_predict(bank, labels, queries[1:2], 2, k=3, temperature=1.0)
    c = 0.1 / math.sqrt(1.01)
    expected = torch.tensor([[math.exp(c) + math.exp(-c), math.exp(1 / math.sqrt(1.01))]])
    torch.testing.assert_close(scores, expected)
    acc = knn_accuracy(bank, labels, queries, torch.tensor([0, 0, 1]), 2, k=1)
    assert acc == pytest.approx(100 * 2 / 3)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.method == "m2t"
    if "imagenet" in path.stem:
        assert cfg.model.arch == "resnet50" and cfg.data.batch_size == 128
        assert cfg.data.image_size == 224 and cfg.model.base_momentum is None  # m2t's 0.99
        epochs = {"100ep": 100, "200ep": 200, "300ep": 300}
        assert cfg.train.epochs == next(v for k, v in epochs.items() if k in path.stem)


def test_headline_recipes_follow_the_spec() -> None:
    sgd = load_config(CONFIGS[0].parent / "resnet50_imagenet_100ep.yaml")
    assert (sgd.optim.name, sgd.optim.base_lr, sgd.optim.weight_decay, sgd.optim.warmup_epochs) == \
        ("sgd", 0.05, 1e-4, 10)
    lars = load_config(CONFIGS[0].parent / "resnet50_imagenet_lars_300ep.yaml")
    assert (lars.optim.name, lars.optim.base_lr, lars.optim.weight_decay) == ("lars", 0.3, 1e-6)


@pytest.mark.parametrize("method,amp,channels_last", [
    ("m2t", "bf16", False), ("byol", "bf16", False), ("eman", "bf16", False),
    ("projector_only", "bf16", False), ("m2t+residual", "bf16", False), ("m2t", "none", True)])
def test_mixed_precision_and_channels_last_steps_run_on_cpu(method: str, amp: str,
                                                            channels_last: bool) -> None:
    name, _, residual = method.partition("+")
    cfg = load_config(None, ["model.arch=resnet18", "model.proj_hidden_dim=32",
                             "model.proj_dim=16", f"train.amp={amp}", f"model.method={name}",
                             f"model.residual={str(bool(residual)).lower()}"])
    model = build_method(cfg, total_steps=4).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    conv_dtypes: list[torch.dtype] = []
    model.student.backbone.conv1.register_forward_hook(
        lambda _m, _i, out: conv_dtypes.append(out.dtype))
    x = torch.randn(4, 3, 32, 32).to(memory_format=fmt)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(x, x.flip(-1))
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert set(conv_dtypes) == {torch.bfloat16 if amp == "bf16" else torch.float32}
    out["loss"].backward()
    assert model.student.backbone.conv1.weight.grad is not None
