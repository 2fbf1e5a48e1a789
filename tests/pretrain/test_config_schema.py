"""The config schema on OmegaConf (issue 17): dataclass defaults, strict types, ranges after the
merge, method names from the registry; and the one cosine schedule."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

from pretrain import bn_alpha, cosine_momentum, cosine_schedule, warmup_cosine_lr
from pretrain.config import (
    SECTIONS,
    Config,
    ModelConfig,
    apply_overrides,
    choices,
    config_from_dict,
    load_config,
)
from pretrain.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


# ----- the schema -------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_config_loads_into_plain_dataclasses_of_the_schema_types(path: Path) -> None:
    cfg = load_config(path)
    assert type(cfg) is Config
    for section in SECTIONS:
        values = getattr(cfg, section)
        assert dataclasses.is_dataclass(values) and type(values).__module__ == "pretrain.config"
        for name, hint in typing.get_type_hints(type(values)).items():
            kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            value = getattr(values, name)
            assert value is None or type(value) is kinds[0], (section, name, value)


def test_defaults_come_from_the_dataclasses_and_no_load_changes_them() -> None:
    assert load_config() == Config()
    load_config(None, ["train.epochs=3", "model.arch=resnet18"])
    assert load_config() == Config()


def test_yaml_then_overrides_and_the_types_today_gives(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim: {base_lr: 1e-4, momentum: 0}\ntrain: {epochs: 3}\n")
    cfg = load_config(path, ["train.epochs=5", "model.base_momentum=null"])
    assert cfg.optim.base_lr == 1e-4 and type(cfg.optim.base_lr) is float  # YAML 1.1: a string
    assert cfg.optim.momentum == 0.0 and type(cfg.optim.momentum) is float
    assert cfg.train.epochs == 5 and cfg.model.base_momentum is None


@pytest.mark.parametrize(("override", "says"), [
    # what OmegaConf alone would convert, and the project refuses
    ("train.compile=1", "command line: train.compile must be bool, got 1"),
    ("train.compile='yes'", "command line: train.compile must be bool, got 'yes'"),
    ("model.arch=5", "command line: model.arch must be str, got 5"),
    ("data.batch_size='64'", "command line: data.batch_size must be int, got '64'"),
    ("data.batch_size=64.0", "command line: data.batch_size must be int, got 64.0"),
    ("optim.base_lr=true", "command line: optim.base_lr must be float, got True"),
    ("model.arch=null", "command line: model.arch must be str, got None"),
    ("optim.base_lr=" + "9" * 400, "command line: optim.base_lr must be float, got 9"),
    # OmegaConf interpolations and its missing-value mark are not read as such
    ("model.arch=${model.stem}", "model.arch must be one of resnet18, resnet34"),
    ("optim.base_lr=${optim.momentum}", "optim.base_lr must be float, got '${optim.momentum}'"),
    ("train.device=???", "train.device must be one of auto, cpu, cuda, got '???'"),
    # keys
    ("train=5", "command line: unknown config key 'train'; valid keys: model.arch, "),
    ("model.arch.x=1", "unknown config key 'model.arch.x'; valid keys: model.arch, "),
    ("train.epoch=3", "unknown config key 'train.epoch'; valid keys in train: epochs, steps"),
])
def test_types_and_keys_are_refused_as_before(override: str, says: str) -> None:
    assert says in error([override])


def test_every_string_setting_has_choices() -> None:
    """So no string reaches OmegaConf that it would read as an interpolation."""
    for section in SECTIONS:
        for name, hint in typing.get_type_hints(type(getattr(Config(), section))).items():
            if hint is str:
                assert choices(f"{section}.{name}"), f"{section}.{name}"


def test_ranges_are_checked_after_the_merge_and_name_the_last_setter(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {knn_k: 0}\n")
    assert error([], path) == f"{path}: train.knn_k must be >= 1, got 0"
    assert load_config(path, ["train.knn_k=5"]).train.knn_k == 5
    assert error(["train.knn_k=-2"], path) == "command line: train.knn_k must be >= 1, got -2"
    assert error(["train.knn_k=5", "train.knn_k=0"]).startswith("command line: train.knn_k")


def test_config_from_dict_holds_only_the_named_sections_to_their_ranges() -> None:
    saved = Config().to_dict()
    saved["data"]["workers"] = 1000
    assert config_from_dict(saved, "ck", ranges=("model",)).data.workers == 1000
    with pytest.raises(UserError, match="ck: data.workers must be in"):
        config_from_dict(saved, "ck")


def test_apply_overrides_changes_the_config_in_place_or_not_at_all() -> None:
    cfg = load_config(None, ["train.steps=8"])
    model = cfg.model
    assert apply_overrides(cfg, ["model.proj_dim=16", "optim.base_lr=1"]) is cfg
    assert model.proj_dim == 16 and cfg.optim.base_lr == 1.0 and type(cfg.optim.base_lr) is float
    with pytest.raises(UserError, match="train.epochs or train.steps"):
        apply_overrides(cfg, ["model.proj_dim=32", "train.steps=0", "train.epochs=0"])
    assert cfg.model.proj_dim == 16 and cfg.train.steps == 8


def test_an_alias_bomb_is_refused_without_being_expanded() -> None:
    bomb: list = list(range(9))
    for _ in range(8):
        bomb = [bomb] * 9  # 9**9 numbers if expanded
    for data, says in [({"optim": {"base_lr": bomb}}, "optim.base_lr must be float, got [[["),
                       ({"trainer": {"x": bomb}}, "unknown config key 'trainer.x'"),
                       ({"model": {"method": bomb}}, "model.method must be str, got [[[")]:
        with pytest.raises(UserError) as info:
            config_from_dict(data, "ck")
        assert says in str(info.value) and len(str(info.value)) < 1000


# ----- method names: the registry ---------------------------------------------------------
def test_the_methods_are_the_registered_names_the_default_first() -> None:
    assert choices("model.method") == ("m2t", "byol", "eman", "projector_only")
    assert ModelConfig.method == "m2t"
    assert error(["model.method=toy"]) == ("command line: model.method must be one of m2t, byol, "
                                           "eman, projector_only, got 'toy'")


def test_registering_a_method_class_makes_it_selectable() -> None:
    from pretrain.methods import METHODS, StudentTeacher, register

    try:
        @register("toy_method")
        class ToyMethod(StudentTeacher):
            """Only registered: a name for ``model.method``."""

        cfg = load_config(None, ["model.method=toy_method"])
        assert cfg.model.method == "toy_method"
        assert "toy_method" in choices("model.method")
    finally:
        METHODS.pop("toy_method", None)
    assert "must be one of" in error(["model.method=toy_method"])


def test_a_method_name_is_registered_once() -> None:
    from pretrain.methods import METHODS, StudentTeacher, register

    with pytest.raises(ValueError, match="'m2t' is already registered"):
        register("m2t")(type("Again", (StudentTeacher,), {}))
    assert METHODS["m2t"].__name__ == "M2T"


def test_config_and_methods_do_not_import_each_other_at_load() -> None:
    """methods needs config for its annotations only; config imports methods when a method
    name is checked, not when it is loaded: neither module's top level imports the other."""
    import ast

    import pretrain.config
    import pretrain.methods

    def top_level_imports(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        return {node.module for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module}

    assert "config" not in top_level_imports(pretrain.methods)
    assert "methods" not in top_level_imports(pretrain.config)


# ----- the one cosine --------------------------------------------------------------------
def test_cosine_schedule_hand_computed_values() -> None:
    half = math.sqrt(0.5)  # cos(π/4)
    values = [cosine_schedule(k, 4, 2.0, 1.0) for k in (-3, 0, 1, 2, 3, 4, 9)]
    expected = [2.0, 2.0, 1.0 + (1.0 + half) / 2, 1.5, 1.0 + (1.0 - half) / 2, 1.0, 1.0]
    assert values == pytest.approx(expected, abs=1e-15)
    assert cosine_schedule(1, 3, 0.0, 6.0) == pytest.approx(6.0 - 6.0 * 0.75)  # cos(π/3) = 1/2
    assert cosine_schedule(5, 10, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_schedule(3, 1, 1.0, 0.0) == 0.0


def test_the_three_schedules_are_the_one_cosine() -> None:
    for total in (1, 7, 100):
        for k in range(-1, total + 2):
            assert cosine_momentum(k, total, 0.99) == cosine_schedule(k, total, 0.99, 1.0)
            assert bn_alpha(k, total) == round(cosine_schedule(k, total, 1.0, 0.0), 15)


def test_the_learning_rate_is_bit_identical_to_the_formula_it_replaced() -> None:
    def before(step: int, total: int, base: float, warmup: int, final: float) -> float:
        if warmup > 0 and step < warmup:
            return base * (step + 1) / warmup
        span = max(total - warmup, 1)
        progress = min(max(step - warmup, 0), span) / span
        return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    for total in range(1, 120):
        for warmup in {0, 1, total // 10, total // 2, total}:
            for base, final in ((0.2, 0.0), (1.0, 0.0), (0.3, 0.001)):
                for step in range(total + 2):
                    assert (warmup_cosine_lr(step, total, base, warmup, final)
                            == before(step, total, base, warmup, final))
