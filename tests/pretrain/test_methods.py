"""The method family (SPEC §1.2–1.5): each trains, and each differs exactly as specified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pretrain.__main__ import main
from pretrain.config import load_config
from pretrain.loss import regression_loss
from pretrain.methods import build_method, method_names
from pretrain.momentum_bn import MomentumBatchNorm1d, MomentumBatchNorm2d
from pretrain.schedules import cosine_momentum

from .conftest import TINY


def cfg_for(method: str, *extra: str):
    return load_config(None, [f"model.method={method}", "model.arch=resnet18",
                              "model.proj_hidden_dim=32", "model.proj_dim=16", *extra])


def test_registry_holds_every_method() -> None:
    assert method_names() == ["byol", "eman", "m2t", "projector_only"]


@pytest.mark.parametrize("method,extra", [("byol", []), ("eman", []), ("projector_only", []),
                                          ("m2t", ["model.residual=true"])])
def test_each_method_trains_and_lowers_its_loss(method: str, extra: list[str], tiny_train: Path,
                                                tmp_path: Path) -> None:
    run = tmp_path / method
    assert main(["train", "--data", str(tiny_train), "--out", str(run), *TINY,
                 f"model.method={method}", "train.steps=12", "data.batch_size=16", *extra]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["byol_loss"] for r in records if "byol_loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert all("gap" in r for r in records if "loss" in r)
    if extra:
        assert all("residual_loss" in r for r in records if "loss" in r)


def count_resnet_forwards(model: nn.Module) -> dict[str, int]:
    calls = {"student": 0, "teacher": 0}
    for name in calls:
        part = getattr(model, name)
        for mod in part.modules():
            if isinstance(mod, torchvision.models.ResNet):
                mod.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    return calls


@pytest.mark.parametrize("method,teacher_passes", [("m2t", 2), ("projector_only", 0)])
def test_projector_only_runs_no_teacher_backbone(method: str, teacher_passes: int) -> None:
    model = build_method(cfg_for(method), total_steps=4).train()
    calls = count_resnet_forwards(model)
    x = torch.randn(4, 3, 32, 32)
    model(x, x.flip(-1))
    assert calls == {"student": 2, "teacher": teacher_passes}
    if method == "projector_only":
        assert not any(isinstance(m, MomentumBatchNorm2d) for m in model.teacher.modules())
        # the paper's plain BN in the momentum projector by default (model.projector_bn)
        assert not any(isinstance(m, MomentumBatchNorm1d) for m in model.teacher.modules())
        assert model.export_backbone("teacher") is model.student.backbone


def test_projector_only_teacher_embeds_the_detached_student_features() -> None:
    model = build_method(cfg_for("projector_only"), total_steps=4).eval()
    feats = torch.randn(3, model.student.feature_dim)
    torch.testing.assert_close(model.teacher_embed(None, feats), model.teacher["projector"](feats))
    with torch.no_grad():  # EMA over the projector only
        for p in model.student.projector.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.teacher.parameters()]
    m = model.update_teacher(0)
    for b, t, s in zip(before, model.teacher.parameters(), model.student.projector.parameters(),
                       strict=True):
        torch.testing.assert_close(t, m * b + (1 - m) * s)


def test_eman_teacher_bn_statistics_follow_the_ema_formula() -> None:
    model = build_method(cfg_for("eman"), total_steps=10).train()
    assert not model.teacher.training  # the teacher never uses batch statistics
    x = torch.randn(4, 3, 32, 32)
    model(x, x.flip(-1))  # student BNs update their running statistics
    t_bn, s_bn = model.teacher.backbone.bn1, model.student.backbone.bn1
    t_mean, t_var = t_bn.running_mean.clone(), t_bn.running_var.clone()
    assert not torch.equal(s_bn.running_mean, t_mean)
    m = model.update_teacher(step=2)
    assert m == pytest.approx(cosine_momentum(2, 10, 0.98))  # the authors' BYOL-EMAN m0
    torch.testing.assert_close(t_bn.running_mean, m * t_mean + (1 - m) * s_bn.running_mean)
    torch.testing.assert_close(t_bn.running_var, m * t_var + (1 - m) * s_bn.running_var)
    assert int(t_bn.num_batches_tracked) == int(s_bn.num_batches_tracked) == 2
    # the teacher's output in training is its eval-mode output: running statistics only
    with torch.no_grad():
        k = model.teacher_embed(x, None)
        assert torch.equal(k, model.teacher.eval()(x))


def test_residual_adds_exactly_lambda_times_its_term() -> None:
    torch.manual_seed(0)
    base = build_method(cfg_for("m2t"), total_steps=4)
    lam = build_method(cfg_for("m2t", "model.residual=true", "model.residual_weight=0.3"), 4)
    lam.load_state_dict(base.state_dict())
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out_base, out_res = base.train()(x1, x2), lam.train()(x1, x2)
    torch.testing.assert_close(out_res["byol_loss"], out_base["byol_loss"])
    term = out_res["residual_loss"]
    torch.testing.assert_close(out_res["loss"], out_base["loss"] + 0.3 * term)
    assert term.item() > 0


def test_linear_probe_separates_separable_features() -> None:
    from pretrain.evaluate import train_linear

    torch.manual_seed(0)
    centres = torch.eye(3) * 5
    y = torch.arange(3).repeat(20)
    x = centres[y] + 0.1 * torch.randn(60, 3)
    res = train_linear(x, y, x, y, 3, epochs=30, lr=0.5, batch_size=16)
    assert res == {"linear_top1": 100.0, "linear_top5": 100.0}
    # labels unrelated to the features: chance-level top-1, top-5 is trivially 100 with 3 classes
    shuffled = train_linear(x, y, x, y[torch.randperm(60)], 3, epochs=5, lr=0.5, batch_size=16)
    assert shuffled["linear_top1"] < 70.0


def test_residual_term_is_the_squared_distance_of_normalised_projections() -> None:
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, -3.0]])  # orthogonal
    na, nb = a / 5, b / 5
    assert regression_loss(a, b).item() == pytest.approx(((na - nb) ** 2).sum().item())


def test_sync_bn_is_a_byol_only_option() -> None:
    from pretrain.errors import UserError

    model = build_method(cfg_for("byol", "model.sync_bn=true"), total_steps=4)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.teacher.modules())
    with pytest.raises(UserError, match="BYOL-baseline option"):
        build_method(cfg_for("m2t", "model.sync_bn=true"), total_steps=4)


def test_knn_and_linear_commands_print_a_table_and_append_metrics(tiny_train: Path,
                                                                  tiny_val: Path, tmp_path: Path,
                                                                  capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_train), "--out", str(run), *TINY,
                 "train.steps=2"]) == 0
    capsys.readouterr()
    assert main(["knn", str(run), "--train", str(tiny_train), "--val", str(tiny_val)]) == 0
    table = capsys.readouterr().out
    assert "| branch | step | knn_top1 |" in table and "| teacher | 2 |" in table
    assert main(["linear", str(run), "--train", str(tiny_train), "--val", str(tiny_val),
                 "--epochs", "3", "--branch", "teacher"]) == 0
    assert "linear_top5" in capsys.readouterr().out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("eval") for r in records} >= {"knn", "linear"}
