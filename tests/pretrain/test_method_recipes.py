"""Each baseline as its authors run it (issue 31; docs/methods.md, SPEC §1.2–1.5).

Hand-computed expectations: the m0 each method starts its teacher EMA at, which parameters are
weight-decayed and LARS-adapted (one SGD/LARS step on a two-layer module whose every number is
worked out below), the BN of projector_only's momentum projector, the residual term against
its equation, and the settings older checkpoints were trained with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import Config, config_from_dict, load_config
from pretrain.errors import UserError
from pretrain.methods import build_method, decays_bn_and_bias
from pretrain.momentum_bn import MomentumBatchNorm1d
from pretrain.train import Trainer, build_optimizer

from .conftest import TINY
from .test_device_move import (
    bn_statistics,
    default_dtype,
    inputs,
    one_step,
    stale_tensor_references,
    teacher_state,
)


def cfg_for(method: str, *extra: str) -> Config:
    return load_config(None, [f"model.method={method}", "model.arch=resnet18",
                              "model.proj_hidden_dim=32", "model.proj_dim=16", *extra])


# ----- m0 -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "epochs", "m0"), [
    ("m2t", 100, 0.99), ("m2t", 1000, 0.99),
    # BYOL: DeepMind's byol/configs/byol.py presets 0.99 at 100 and 300 epochs, 0.996 at 1000
    ("byol", 1, 0.99), ("byol", 300, 0.99), ("byol", 301, 0.996), ("byol", 1000, 0.996),
    ("eman", 200, 0.98), ("eman", 1000, 0.98),  # EMAN's README: main_byol.py --byol-m 0.98
    ("projector_only", 100, 0.99)])
def test_each_method_starts_its_teacher_ema_at_its_authors_m0(method: str, epochs: int,
                                                              m0: float) -> None:
    assert build_method(cfg_for(method), 10, epochs).base_momentum == m0
    # without a run length from the trainer, train.epochs is the run's length
    assert build_method(cfg_for(method, f"train.epochs={epochs}"), 10).base_momentum == m0
    # model.base_momentum, when set, wins
    assert build_method(cfg_for(method, "model.base_momentum=0.9"), 10, epochs).base_momentum == 0.9


def test_the_trainer_chooses_byols_m0_by_the_epochs_the_run_has(tiny_train: Path,
                                                               tmp_path: Path) -> None:
    """train.steps=2 is one epoch of the tiny set, whatever train.epochs says: 0.99, not the
    1000-epoch 0.996."""
    cfg = load_config(None, [*TINY, "model.method=byol", "train.epochs=1000", "train.steps=2",
                             "train.device=cpu"])
    trainer = Trainer(cfg, tiny_train, tmp_path / "run")
    assert trainer.epochs == 1 and trainer.model.base_momentum == 0.99
    cfg = load_config(None, [*TINY, "model.method=byol", "train.epochs=301", "train.device=cpu"])
    assert Trainer(cfg, tiny_train, tmp_path / "run2").model.base_momentum == 0.996


# ----- weight decay and LARS adaptation of BN parameters and biases ------------------------
def toy() -> nn.Sequential:
    """Linear(2, 1) then BN1d(1), with the values and gradients the hand computations use."""
    net = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
        net[0].bias.fill_(1.0)
        net[1].weight.fill_(2.0)
        net[1].bias.fill_(0.5)
    grads = [torch.tensor([[0.6, 0.8]]), torch.tensor([0.1]), torch.tensor([0.2]),
             torch.tensor([0.3])]
    for p, g in zip(net.parameters(), grads, strict=True):
        p.grad = g
    return net


def stepped(method: str, optimiser: str, *extra: str) -> list[list[float]]:
    """The toy's parameters after one step of lr 1, momentum 0.9, weight decay 0.5, η 1e-3."""
    cfg = load_config(None, [f"model.method={method}", f"optim.name={optimiser}",
                             "optim.weight_decay=0.5", *extra])
    net = toy()
    build_optimizer(cfg, net, lr=1.0).step()
    return [p.detach().flatten().tolist() for p in net.parameters()]


# One LARS step (the first: the momentum buffer is the step itself). The weight, adapted:
# d = g + λw = (0.6 + 1.5, 0.8 + 2.0) = (2.1, 2.8), ‖d‖ = 3.5, trust η‖w‖/‖d‖ = 1e-3 · 5 / 3.5,
# w − trust · d = (3 − 0.003, 4 − 0.004). The BN parameters and biases take plain steps:
# without decay p − g (1 − 0.1, 2 − 0.2, 0.5 − 0.3); with decay p − (g + λp)
# (1 − 0.6, 2 − 1.2, 0.5 − 0.55).
LARS_WEIGHT = [2.997, 3.996]
NOT_DECAYED = [[0.9], [1.8], [0.2]]
DECAYED = [[0.4], [0.8], [-0.05]]


@pytest.mark.parametrize(("method", "rest"), [("byol", NOT_DECAYED), ("eman", NOT_DECAYED),
                                              ("m2t", DECAYED), ("projector_only", DECAYED)])
def test_lars_adapts_only_weights_and_decays_bn_and_bias_as_each_method_s_authors(
        method: str, rest: list[list[float]]) -> None:
    got = stepped(method, "lars")
    assert got[0] == pytest.approx(LARS_WEIGHT, abs=1e-6)
    assert got[1:] == [pytest.approx(r, abs=1e-6) for r in rest]


@pytest.mark.parametrize(("method", "rest"), [("byol", NOT_DECAYED), ("eman", NOT_DECAYED),
                                              ("m2t", DECAYED), ("projector_only", DECAYED)])
def test_sgd_decays_bn_and_bias_as_each_method_s_authors(method: str,
                                                         rest: list[list[float]]) -> None:
    # the weight is decayed in every method: w − (g + λw) = (3 − 2.1, 4 − 2.8)
    got = stepped(method, "sgd")
    assert got[0] == pytest.approx([0.9, 1.2], abs=1e-6)
    assert got[1:] == [pytest.approx(r, abs=1e-6) for r in rest]


def test_bn_bias_weight_decay_overrides_the_method_s_choice() -> None:
    assert stepped("byol", "sgd", "optim.bn_bias_weight_decay=true")[1:] == \
        [pytest.approx(r, abs=1e-6) for r in DECAYED]
    assert stepped("m2t", "lars", "optim.bn_bias_weight_decay=false")[1:] == \
        [pytest.approx(r, abs=1e-6) for r in NOT_DECAYED]
    assert decays_bn_and_bias(cfg_for("byol")) is False
    assert decays_bn_and_bias(cfg_for("m2t")) is True


def test_byol_student_groups_hold_every_parameter_and_decay_only_weights() -> None:
    """ResNet-18 + two MLPs: 20 convs and 4 Linear weights decayed; the 20 backbone BNs' and
    the 2 BN1ds' weights and biases and the 4 Linear biases not (48)."""
    model = build_method(cfg_for("byol"), 4)
    opt = build_optimizer(model.cfg, model.student, 0.1)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    free = {id(p) for g in opt.param_groups if not g["weight_decay"] for p in g["params"]}
    assert (len(decay), len(free)) == (24, 48)
    for name, p in model.student.named_parameters():
        expected = not (name.endswith("bias") or p.ndim == 1)
        assert (id(p) in decay) == expected and (id(p) in free) != expected, name
    # m2t: one group, everything decayed, as before
    m2t = build_method(cfg_for("m2t"), 4)
    opt = build_optimizer(m2t.cfg, m2t.student, 0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4


# ----- projector_only's projector BN -------------------------------------------------------
def test_projector_only_uses_plain_bn_by_default_and_momentum_bn_on_request() -> None:
    plain = build_method(cfg_for("projector_only"), 4).train()
    kinds = {type(m) for m in plain.teacher.modules()}
    assert nn.BatchNorm1d in kinds and MomentumBatchNorm1d not in kinds
    momentum = build_method(cfg_for("projector_only", "model.projector_bn=momentum"), 4)
    assert MomentumBatchNorm1d in {type(m) for m in momentum.teacher.modules()}
    # plain BN in training normalises with the batch's own statistics, as BYOL's teacher
    torch.manual_seed(0)
    feats = torch.randn(6, plain.student.feature_dim)
    with torch.no_grad():
        h = plain.teacher["projector"][0](feats)
        expected = plain.teacher["projector"][3](F.relu(
            (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)))
        torch.testing.assert_close(plain.teacher_embed(None, feats), expected)


def test_projector_bn_is_refused_for_methods_without_a_momentum_projector() -> None:
    for method in ("m2t", "byol", "eman"):
        with pytest.raises(UserError, match="projector_only's momentum projector"):
            build_method(cfg_for(method, "model.projector_bn=momentum"), 4)


# ----- residual momentum: SPEC §1.5's equation, by hand -------------------------------------
def test_residual_term_pairs_student_and_teacher_projections_of_the_same_view() -> None:
    """λ · mean over views and samples of ‖ẑ_S(x) − ẑ_T(x)‖², ẑ the L2-normalised projector
    output, the teacher's of the *same* view (not the other view, as the BYOL term)."""
    torch.manual_seed(0)
    model = build_method(cfg_for("m2t", "model.residual=true", "model.residual_weight=0.5"), 4)
    with torch.no_grad():  # a teacher unlike the student, so that the term is not ~0
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model.train()
    # train-mode BN normalises with the batch and the momentum BN's history moves only at the
    # commit: these forwards give what the method's forward sees
    student = {k: v.detach() for k, v in model.student(x1, x2).items()}
    with torch.no_grad():
        k1, k2 = model.teacher(x1), model.teacher(x2)
    by_hand = 0.5 * sum(((F.normalize(z, dim=1) - F.normalize(k, dim=1)) ** 2).sum(1).mean()
                        for z, k in ((student["z1"], k1), (student["z2"], k2)))
    out = model(x1, x2)
    torch.testing.assert_close(out["residual_loss"], by_hand)
    torch.testing.assert_close(out["loss"], out["byol_loss"] + 0.5 * by_hand)


# ----- checkpoints from before issue 31 -----------------------------------------------------
def saved_before_issue_31(method: str) -> dict:
    saved = cfg_for(method).to_dict()
    del saved["model"]["projector_bn"], saved["optim"]["bn_bias_weight_decay"]
    return saved


@pytest.mark.parametrize(("method", "projector_bn", "m0"), [
    ("projector_only", "momentum", None), ("byol", "plain", 0.996), ("eman", "plain", 0.996),
    ("m2t", "plain", None)])
def test_a_config_saved_before_issue_31_is_read_as_that_run_was_trained(
        method: str, projector_bn: str, m0: float | None) -> None:
    cfg = config_from_dict(saved_before_issue_31(method), "old.pth")
    assert cfg.model.projector_bn == projector_bn and cfg.model.base_momentum == m0
    assert cfg.optim.bn_bias_weight_decay is True and decays_bn_and_bias(cfg)
    # a config saved today is read as it is
    assert config_from_dict(cfg_for(method).to_dict(), "new.pth") == cfg_for(method)


def test_an_old_projector_only_teacher_loads_into_the_model_its_config_rebuilds() -> None:
    old = build_method(cfg_for("projector_only", "model.projector_bn=momentum"), 4)
    rebuilt = build_method(config_from_dict(saved_before_issue_31("projector_only"), "old"), 4)
    rebuilt.teacher.load_state_dict(old.teacher.state_dict())  # strict: same module types


# ----- the new variant after .to() (tests/pretrain/test_device_move.py's checks) ------------
NEW_VARIANTS = {"projector_only+momentum_bn": ["model.method=projector_only",
                                               "model.projector_bn=momentum"],
                "projector_only": ["model.method=projector_only"]}


def build(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(cfg_for("m2t", *NEW_VARIANTS[variant]), total_steps=10).train()


@pytest.mark.parametrize("variant", list(NEW_VARIANTS))
def test_projector_variants_moved_to_float64_update_like_ones_never_moved(variant: str) -> None:
    moved = build(variant)
    initial = {k: v.clone() for k, v in moved.state_dict().items()}
    moved.to(torch.float64)
    with default_dtype(torch.float64):
        reference = build(variant, seed=123)
    reference.load_state_dict(initial)
    before = teacher_state(reference)
    x1, x2 = inputs(torch.float64)
    one_step(reference, x1, x2)
    one_step(moved, x1, x2)
    expected, got = teacher_state(reference), teacher_state(moved)
    assert bn_statistics(before) and all(not torch.equal(before[k], expected[k])
                                         for k in bn_statistics(before))
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{variant}: {key}"
    assert stale_tensor_references(moved) == []


@pytest.mark.parametrize("variant", list(NEW_VARIANTS))
def test_projector_variants_moved_to_channels_last_update_like_ones_never_moved(
        variant: str) -> None:
    moved, reference = build(variant), build(variant)
    before = teacher_state(reference)
    moved.to(memory_format=torch.channels_last)
    x1, x2 = inputs()
    one_step(reference, x1, x2)
    one_step(moved, x1.to(memory_format=torch.channels_last),
             x2.to(memory_format=torch.channels_last))
    expected, got = teacher_state(reference), teacher_state(moved)
    for key, value in expected.items():
        if not value.is_floating_point():
            assert torch.equal(got[key], value), key
            continue
        change = (value - before[key]).abs().max().item()
        assert (got[key] - value).abs().max().item() <= 2e-3 * change + 1e-7, f"{variant}: {key}"
    assert stale_tensor_references(moved) == []


@pytest.mark.parametrize("method", ["byol", "eman"])
def test_the_split_optimiser_holds_the_moved_parameters(method: str, tiny_train: Path,
                                                        tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, f"model.method={method}", "train.steps=2",
                             "train.channels_last=true", "train.device=cpu"])
    trainer = Trainer(cfg, tiny_train, tmp_path / "run")
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [cfg.optim.weight_decay, 0.0]
    in_optimiser = [id(p) for g in groups for p in g["params"]]
    assert sorted(in_optimiser) == sorted(id(p) for p in trainer.model.student.parameters())
    assert stale_tensor_references(trainer.model) == []
