"""Pretraining configuration: typed dataclasses, loaded from YAML, overridden by ``key=value``.

Defaults live here and only here. A YAML file in ``configs/pretrain/`` sets what differs from
them; command-line overrides like ``train.epochs=5`` or ``optim.name=lars`` come last. The
resolved config is printed at start and saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

INT64 = 2**63  # numbers torch keeps in 64 bits (seeds, sizes, step counts) stay below this


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: finite, between ``low`` and ``high``.

    A bound is left out with ``None``; ``low_open``/``high_open`` exclude the bound itself.
    ``why`` is said when a value falls outside. Integers always fit in 64 bits.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and not -INT64 <= value < INT64:
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{low}, {high}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "a finite number"


def _number(bound: float | None) -> str:
    return "2**63" if bound == INT64 else f"{bound:g}" if isinstance(bound, float) else str(bound)


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
    method: str = "m2t"                  # see pretrain.methods.METHODS
    proj_hidden_dim: int = setting(4096, ge=1, le=65536)
    proj_dim: int = setting(256, ge=1, le=65536)
    # teacher EMA m0; None → the method's default
    base_momentum: float | None = setting(None, ge=0.0, lt=1.0, why="1 would freeze the teacher")
    double_variance_correction: bool = False  # the authors' extra n/(n-1) on the variance
    residual: bool = False               # residual-momentum add-on (SPEC §1.5)
    residual_weight: float = setting(1.0, ge=0.0)  # its weight λ
    sync_bn: bool = False                # SyncBN in student and teacher (byol only)


@dataclass
class DataConfig:
    batch_size: int = setting(128, ge=2, why="BatchNorm needs a batch")  # per process
    image_size: int = setting(224, ge=16, le=8192)
    workers: int = setting(8, ge=0, le=256)  # loader processes per training process
    max_bad_fraction: float = setting(0.01, ge=0.0, le=1.0)  # abort when more images fail
    min_scale: float = setting(0.08, gt=0.0, le=1.0)  # RandomResizedCrop lower bound
    pipeline: str = "auto"  # auto | pil | tensor (auto: tensor on CUDA, PIL on the CPU)
    cache: str = "none"     # none | device: decode a small dataset once, keep it on the device


@dataclass
class OptimConfig:
    name: str = "sgd"                    # sgd | lars
    base_lr: float = setting(0.05, gt=0.0)  # per 256 images: lr = base_lr × total batch / 256
    momentum: float = setting(0.9, ge=0.0, lt=1.0)
    weight_decay: float = setting(1e-4, ge=0.0)
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
    "model.stem": ("imagenet", "cifar"),
    "optim.name": ("sgd", "lars"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.export_branch": ("teacher", "student"),
    "model.method": ("m2t", "byol", "eman", "projector_only"),
    "train.nonfinite": ("stop", "skip"),
    "data.pipeline": ("auto", "pil", "tensor"),
    "data.cache": ("none", "device"),
}


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def short_repr(value: Any) -> str:
    """``repr`` cut to a few dozen characters: YAML aliases can expand a value enormously."""
    return _SHORT.repr(value)


def _valid_keys(section: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


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
                    f"got {short_repr(value)}")


def _apply(cfg: Config, key: str, value: Any, source: str, ranges: bool = True) -> None:
    """Set ``key`` to ``value`` after checking its type, choices and (if ``ranges``) range."""
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
        raise UserError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, "
                        f"got {short_repr(value)}")
    if ranges:
        check_range(f"{source}: {key}", value, range_of(key))
    setattr(section, parts[1], value)


def _flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, sub in data.items():
        if not isinstance(sub, dict):
            raise UserError(f"{source}: top-level key {short_repr(name)} must be a mapping of settings "
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


def config_from_dict(data: dict[str, Any], source: str,
                     ranges: tuple[str, ...] = ("model", "data", "optim", "train")) -> Config:
    """Rebuild a Config saved in a checkpoint (resume, conversion).

    Only the sections in ``ranges`` are held to today's ranges: a finished run that is only
    evaluated needs sane model settings to be rebuilt; how it was trained is history.
    """
    cfg = Config()
    for key, value in _flatten(data, source).items():
        _apply(cfg, key, value, source, key.split(".")[0] in ranges)
    if "train" in ranges:
        _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    """What no single setting's range says (each value was checked as it was set)."""
    if cfg.train.epochs < 1 and cfg.train.steps < 1:
        raise UserError("config: train.epochs or train.steps must be >= 1")
