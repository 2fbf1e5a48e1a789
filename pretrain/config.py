"""Pretraining configuration: typed dataclasses, loaded from YAML, overridden by ``key=value``.

Defaults live here and only here: the dataclasses are the OmegaConf structured schema. A YAML
file in ``configs/pretrain/`` sets what differs from them; command-line overrides like
``train.epochs=5`` or ``optim.name=lars`` come last. OmegaConf merges the layers and builds the
dataclass instances; ranges (``setting``) are checked after the merge. The resolved config is
printed at start and saved as ``config.yaml`` in the run directory.

Each value is checked before OmegaConf sees it, as strictly as the schema's Python types: left
alone, OmegaConf would turn ``1`` into ``True``, ``5`` into ``"5"`` and ``"64"`` into ``64``,
resolve ``${...}`` interpolations, and expand a YAML alias bomb that ``yaml.safe_load`` keeps
as shared references.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jobs.ranges import INT64, Range

from .errors import UserError


def setting(default: Any, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, why: str = "") -> Any:
    """A numeric config field with its allowed range, e.g. ``setting(20, ge=1)``."""
    allowed = Range(low=gt if gt is not None else ge, high=lt if lt is not None else le,
                    low_open=gt is not None, high_open=lt is not None, why=why)
    return field(default=default, metadata={"range": allowed})


@dataclass
class ModelConfig:
    arch: str = "resnet50"               # torchvision ResNet: resnet18/34/50/101/152
    stem: str = "imagenet"               # imagenet (7×7/2 + max-pool) | cifar (3×3/1, no pool)
    width: int = setting(64, ge=8, le=1024, why="64 is torchvision's ResNet")  # stage-1 channels
    method: str = "m2t"                  # any name registered in pretrain.methods (@register)
    proj_hidden_dim: int = setting(4096, ge=1, le=65536)
    proj_dim: int = setting(256, ge=1, le=65536)
    # teacher EMA m0; None → the method's authors' (docs/methods.md): m2t 0.99, byol 0.99 up to
    # 300 epochs and 0.996 beyond, eman 0.98, projector_only 0.99
    base_momentum: float | None = setting(None, ge=0.0, lt=1.0, why="1 would freeze the teacher")
    double_variance_correction: bool = False  # the authors' extra n/(n-1) on the variance
    residual: bool = False               # residual-momentum add-on (SPEC §1.5)
    residual_weight: float = setting(1.0, ge=0.0)  # its weight λ
    sync_bn: bool = False                # SyncBN in student and teacher (byol only)
    # projector_only: its momentum projector's BN; plain (the paper's) | momentum (M2T's α mix)
    projector_bn: str = "plain"


@dataclass
class DataConfig:
    batch_size: int = setting(128, ge=2, why="BatchNorm needs a batch")  # per process
    image_size: int = setting(224, ge=16, le=8192)
    workers: int = setting(8, ge=0, le=256)  # loader processes per training process
    max_bad_fraction: float = setting(0.01, ge=0.0, le=1.0)  # abort when more images fail
    min_scale: float = setting(0.08, gt=0.0, le=1.0)  # RandomResizedCrop lower bound
    view1_blur: float = setting(1.0, ge=0.0, le=1.0)  # Gaussian-blur probability, view 1
    view2_blur: float = setting(0.1, ge=0.0, le=1.0)  # and view 2 (SPEC §1.1: 1.0 and 0.1)
    pipeline: str = "auto"  # auto | pil | tensor (auto: tensor, the faster on CUDA and CPU)
    cache: str = "none"     # none | device: decode a small dataset once, keep it on the device


@dataclass
class OptimConfig:
    name: str = "sgd"                    # sgd | lars
    base_lr: float = setting(0.05, gt=0.0)  # per 256 images: lr = base_lr × total batch / 256
    momentum: float = setting(0.9, ge=0.0, lt=1.0)
    weight_decay: float = setting(1e-4, ge=0.0)
    # weight decay on BN parameters and biases too; None → the method's authors' (m2t,
    # projector_only: yes; byol, eman: no). LARS never adapts their steps.
    bn_bias_weight_decay: bool | None = None
    warmup_epochs: float = setting(10.0, ge=0.0)
    lars_trust_coefficient: float = setting(1e-3, gt=0.0)


@dataclass
class TrainConfig:
    epochs: int = setting(100, ge=0)
    steps: int = setting(0, ge=0)        # > 0: stop after this many steps (overrides epochs)
    seed: int = setting(0, ge=0, lt=INT64)
    device: str = "auto"                 # auto | cpu | cuda
    amp: str = "none"                    # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    log_every: int = setting(20, ge=1)   # steps between progress lines / metric records
    save_every_epochs: int = setting(10, ge=1, why="epoch_NNNN.pth every N epochs; set it "
                                                   "above train.epochs to keep only the last")
    save_every_steps: int = setting(0, ge=0)  # > 0: also refresh last.pth every N steps
    knn_every_epochs: int = setting(10, ge=1)  # kNN monitor cadence when --val is given
    knn_k: int = setting(20, ge=1)
    knn_temperature: float = setting(0.07, gt=0.0)
    # kNN memory: one similarity block holds at most this much (bank × queries, float32)
    knn_chunk_mb: int = setting(1024, ge=1)
    # > 0: the bank is the first N training images of each class (folder order), not all of
    # them, as lightly and solo-learn offer for speed; 0: every training image (the default)
    knn_bank_per_class: int = setting(0, ge=0)
    export_branch: str = "auto"          # m2t-convert's default branch; auto: by method (SPEC §3)
    nonfinite: str = "stop"              # on a NaN/inf loss: stop | skip (the step, counted)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = ("model", "data", "optim", "train")

CHOICES: dict[str, tuple[str, ...]] = {  # model.method: the registry (see ``choices``)
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    "model.stem": ("imagenet", "cifar"),
    "model.projector_bn": ("plain", "momentum"),
    "optim.name": ("sgd", "lars"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.export_branch": ("auto", "teacher", "student"),
    "train.nonfinite": ("stop", "skip"),
    "data.pipeline": ("auto", "pil", "tensor"),
    "data.cache": ("none", "device"),
}


def choices(key: str) -> tuple[str, ...] | None:
    """The values the string setting ``key`` may take, if they are a fixed list.

    ``model.method``: every name registered in ``pretrain.methods.METHODS`` (the default
    first), looked up when asked, so that registering a method class makes it selectable. This
    is where a method name is checked; ``methods`` does not import this module (it would be an
    import cycle) and is imported here, not above, as only a config naming a method needs it.
    """
    if key == "model.method":
        from .methods import method_names

        return tuple(sorted(method_names(), key=lambda name: (name != ModelConfig.method, name)))
    return CHOICES.get(key)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def short_repr(value: Any) -> str:
    """``repr`` cut to a few dozen characters: YAML aliases can expand a value enormously."""
    return _SHORT.repr(value)


@functools.cache
def _schema() -> dict[str, dict[str, Any]]:
    """The type of every setting, by section and name (``X | None`` for an optional one)."""
    return {s: typing.get_type_hints(type(getattr(Config(), s))) for s in SECTIONS}


@functools.cache
def _defaults() -> Any:
    """The schema with its defaults, as OmegaConf's structured config (merge copies it)."""
    return OmegaConf.structured(Config)


def range_of(key: str) -> Range | None:
    """The allowed range of the numeric setting ``key`` (``"train.knn_k"``), if it has one."""
    section, name = key.split(".")
    for f in dataclasses.fields(getattr(Config(), section)):
        if f.name == name:
            return f.metadata.get("range")
    raise KeyError(key)


def check_range(what: str, value: Any, allowed: Range | None) -> None:
    """Refuse ``value`` outside ``allowed``: ``WHAT must be >= 1, got 0 (why)``."""
    if allowed is None or value is None or value in allowed:
        return
    why = f" ({allowed.why})" if allowed.why else ""
    finite = "finite and " if isinstance(value, float) and not math.isfinite(value) else ""
    raise UserError(f"{what} must be {finite}{allowed}, got {short_repr(value)}{why}")


def _kind(hint: Any) -> type:
    """The type a setting holds when set: ``float`` for ``float`` and for ``float | None``."""
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML reads it) may be given to a setting of type ``hint``."""
    kind = _kind(hint)
    if value is None:
        return type(None) in typing.get_args(hint)
    if isinstance(value, bool) or kind is bool:  # to Python a bool is an int; not here
        return isinstance(value, bool) and kind is bool
    if kind is float and isinstance(value, (int, str)):  # YAML 1.1 reads 1e-4 as a string
        try:
            float(value)
        except (ValueError, OverflowError):
            return False
        return True
    return isinstance(value, kind)


def _yaml_hint(value: Any, kind: type) -> str:
    """Why a value a person wrote right reached us as another type: YAML 1.1 reads an
    unquoted no/off/yes/on as a boolean, and ``1e2`` (no dot) as a string."""
    if isinstance(value, bool) and kind is str:
        return (" (YAML reads an unquoted no, off, yes or on as a boolean: write the word in "
                "quotes)")
    if isinstance(value, str) and kind is int:
        try:
            number = float(value)
        except ValueError:
            return ""
        if number.is_integer():
            return f" (YAML reads {value} as text: write {int(number)})"
    return ""


def _check(key: str, value: Any, source: str) -> None:
    """Refuse an unknown key, a value of another type or a string outside the choices.

    Every string setting has choices, so no ``${...}`` interpolation reaches OmegaConf.
    """
    schema = _schema()
    section, _, name = key.partition(".")
    if key.count(".") != 1 or section not in schema:
        all_keys = [f"{s}.{k}" for s in SECTIONS for k in schema[s]]
        raise UserError(f"{source}: unknown config key {key!r}; valid keys: {', '.join(all_keys)}")
    if name not in schema[section]:
        raise UserError(f"{source}: unknown config key {key!r}; valid keys in {section}: "
                        f"{', '.join(schema[section])}")
    if not _is_a(value, schema[section][name]):
        kind = _kind(schema[section][name])
        raise UserError(f"{source}: {key} must be {kind.__name__}, "
                        f"got {short_repr(value)}{_yaml_hint(value, kind)}")
    allowed = choices(key)
    if allowed is not None and value not in allowed:
        raise UserError(f"{source}: {key} must be one of {', '.join(allowed)}, "
                        f"got {short_repr(value)}")


def _merge(base: Config | None, layers: list[tuple[str, list[tuple[str, Any]]]],
           ranges: tuple[str, ...] = SECTIONS) -> Config:
    """``base`` (the defaults if None) with each ``(source, [(key, value), ...])`` merged on top.

    Every value is checked first (``_check``); the ranges of the sections in ``ranges`` are
    checked after the merge, on the values the layers set, each error naming where it was set.
    """
    set_by: dict[str, str] = {}
    nested = []
    for source, items in layers:
        layer: dict[str, dict[str, Any]] = {}
        for key, value in items:
            _check(key, value, source)
            section, name = key.split(".")
            layer.setdefault(section, {})[name] = value
            set_by.pop(key, None)
            set_by[key] = source  # the last setter, in the order of the last setting
        nested.append(layer)
    try:
        conf = OmegaConf.merge(_defaults() if base is None else OmegaConf.structured(base), *nested)
    except OmegaConfBaseException as exc:  # not expected: _check is the stricter
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{set_by.get(exc.full_key, 'config')}: {exc.full_key}: {first}") from None
    cfg = OmegaConf.to_object(conf)
    assert isinstance(cfg, Config)
    for key, source in set_by.items():
        section, name = key.split(".")
        if section in ranges:
            check_range(f"{source}: {key}", getattr(getattr(cfg, section), name), range_of(key))
    return cfg


def _flatten(data: dict[str, Any], source: str) -> list[tuple[str, Any]]:
    flat: dict[str, Any] = {}
    for name, sub in data.items():
        if not isinstance(sub, dict):
            raise UserError(f"{source}: top-level key {short_repr(name)} must be a mapping of settings "
                            f"(sections: model, data, optim, train)")
        for key, value in sub.items():
            flat[f"{name}.{key}"] = value
    return list(flat.items())


def _parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``section.key=value`` items, the values read as YAML scalars (left as text if not YAML)."""
    items = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        items.append((key.strip(), value))
    return items


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"{path}: not valid YAML ({first})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        layers.append((str(path), _flatten(data, str(path))))
    layers.append(("command line", _parse_overrides(overrides or [])))
    cfg = _merge(None, layers)
    _validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` items to ``cfg`` (in place, and returned), validating each."""
    merged = _merge(cfg, [("command line", _parse_overrides(overrides))])
    _validate(merged)
    for section in SECTIONS:
        vars(getattr(cfg, section)).update(vars(getattr(merged, section)))
    return cfg


def config_from_dict(data: dict[str, Any], source: str,
                     ranges: tuple[str, ...] = SECTIONS) -> Config:
    """Rebuild a Config saved in a checkpoint (resume, conversion).

    Only the sections in ``ranges`` are held to today's ranges: a finished run that is only
    evaluated needs sane model settings to be rebuilt; how it was trained is history.
    """
    cfg = _merge(None, [(source, _flatten(_as_trained(data), source))], ranges)
    if "train" in ranges:
        _validate(cfg)
    return cfg


def _as_trained(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config from before issue 31 (no ``model.projector_bn``), with the settings that
    issue added or whose defaults it changed set as that run was trained: projector_only's
    momentum projector had momentum BN, every method decayed BN parameters and biases, and
    byol and eman started the teacher EMA at 0.996."""
    model = data.get("model")
    if not isinstance(model, dict) or "projector_bn" in model:
        return data
    method = model.get("method", ModelConfig.method)
    model = {**model, "projector_bn": "momentum" if method == "projector_only" else "plain"}
    if model.get("base_momentum") is None and method in ("byol", "eman"):
        model["base_momentum"] = 0.996
    optim = data.get("optim", {})
    if isinstance(optim, dict):
        optim = {**optim, "bn_bias_weight_decay": True}
    return {**data, "model": model, "optim": optim}


def _validate(cfg: Config) -> None:
    """What no single setting's range says (the ranges were checked after the merge)."""
    if cfg.train.epochs < 1 and cfg.train.steps < 1:
        raise UserError("config: train.epochs or train.steps must be >= 1")
