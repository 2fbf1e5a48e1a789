"""Pretraining configuration: typed dataclasses, loaded from YAML, overridden by ``key=value``.

Defaults live here and only here. A YAML file in ``configs/pretrain/`` sets what differs from
them; command-line overrides like ``train.epochs=5`` or ``optim.name=lars`` come last. The
resolved config is printed at start and saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


@dataclass
class ModelConfig:
    arch: str = "resnet50"               # torchvision ResNet: resnet18/34/50/101/152
    method: str = "m2t"                  # see pretrain.methods.METHODS
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    base_momentum: float | None = None  # teacher EMA m0; None → the method's default
    double_variance_correction: bool = False  # the authors' extra n/(n-1) on the variance
    residual: bool = False               # residual-momentum add-on (SPEC §1.5)
    residual_weight: float = 1.0         # its weight λ
    sync_bn: bool = False                # SyncBN in student and teacher (byol only)


@dataclass
class DataConfig:
    batch_size: int = 128                # per process
    image_size: int = 224
    workers: int = 8
    max_bad_fraction: float = 0.01       # abort when more images than this fail to decode
    min_scale: float = 0.08              # RandomResizedCrop lower bound


@dataclass
class OptimConfig:
    name: str = "sgd"                    # sgd | lars
    base_lr: float = 0.05                # per 256 images: lr = base_lr × total batch / 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0
    lars_trust_coefficient: float = 1e-3


@dataclass
class TrainConfig:
    epochs: int = 100
    steps: int = 0                       # > 0: stop after this many steps (overrides epochs)
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda
    amp: str = "none"                    # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    log_every: int = 20                  # steps between progress lines / metric records
    save_every_epochs: int = 10          # epoch checkpoints (last.pth is written every epoch)
    save_every_steps: int = 0            # > 0: also refresh last.pth every N steps
    knn_every_epochs: int = 10           # kNN monitor cadence when --val is given
    knn_k: int = 20
    knn_temperature: float = 0.07
    export_branch: str = "teacher"       # which weights m2t-convert takes by default
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


CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
    "optim.name": ("sgd", "lars"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.export_branch": ("teacher", "student"),
    "model.method": ("m2t", "byol", "eman", "projector_only"),
    "train.nonfinite": ("stop", "skip"),
}


def _valid_keys(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise UserError(f"{source}: {key} must be {getattr(hint, '__name__', hint)}, "
                    f"got {value!r}")


def _apply(cfg: Config, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    sections = _valid_keys(cfg)
    if len(parts) != 2 or parts[0] not in sections:
        all_keys = [f"{s}.{k}" for s in sections for k in _valid_keys(getattr(cfg, s))]
        raise UserError(f"{source}: unknown config key {key!r}; valid keys: "
                        f"{', '.join(all_keys)}")
    section = getattr(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise UserError(f"{source}: unknown config key {key!r}; valid keys in {parts[0]}: "
                        f"{', '.join(_valid_keys(section))}")
    value = _coerce(key, value, hints[parts[1]], source)
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    setattr(section, parts[1], value)


def _flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, sub in data.items():
        if not isinstance(sub, dict):
            raise UserError(f"{source}: top-level key {name!r} must be a mapping of settings "
                            f"(sections: model, data, optim, train)")
        for key, value in sub.items():
            flat[f"{name}.{key}"] = value
    return flat


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides."""
    cfg = Config()
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
        for key, value in _flatten(data, str(path)).items():
            _apply(cfg, key, value, str(path))
    apply_overrides(cfg, overrides or [])
    _validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` items (values parsed as YAML scalars), validating each."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            value = raw
        _apply(cfg, key.strip(), value, "command line")
    _validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a Config saved in a checkpoint (resume, conversion)."""
    cfg = Config()
    for key, value in _flatten(data, source).items():
        _apply(cfg, key, value, source)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.data.batch_size >= 2, "data.batch_size must be >= 2 (BatchNorm needs a batch)"),
        (cfg.data.image_size >= 16, "data.image_size must be >= 16"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (cfg.train.epochs >= 1 or cfg.train.steps >= 1, "train.epochs or train.steps must be >= 1"),
        (cfg.optim.base_lr > 0, "optim.base_lr must be > 0"),
        (cfg.model.base_momentum is None or 0.0 <= cfg.model.base_momentum <= 1.0,
         "model.base_momentum must be in [0, 1]"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")
