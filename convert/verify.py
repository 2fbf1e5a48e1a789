"""Proof that a converted ``.pkl`` is right: Detectron2 loads it and computes what torchvision does.

Detectron2 is imported here, lazily, and nowhere else in ``convert/``: conversion itself works
without it. The check (SPEC §3):

1. Build Detectron2's ResNet-FPN backbone for the architecture (``build_resnet_fpn_backbone``,
   ``RESNETS.NORM`` BN, ``STRIDE_IN_1X1 False``) inside a holder module named like a
   ``GeneralizedRCNN`` (``backbone.bottom_up.res2...``).
2. Compare the shapes of the file's tensors with the model's: a key fits the bottom-up tensor
   of its name (unmatched: no such tensor; mis-shaped: another shape).
3. Load the file with Detectron2's own ``DetectionCheckpointer`` (its name-matching heuristics
   are what a training run uses) into the model, whose tensors start as NaN, and confirm each
   bottom-up tensor now equals the array stored under its Detectron2 name.
4. Run a random batch through a torchvision ResNet holding the reference weights and through
   the Detectron2 bottom-up network, both in eval mode, and compare ``layer1..layer4`` with
   ``res2..res5``.

A CIFAR-stem or narrow/wide backbone has no Detectron2 counterpart; its ``.pth`` is proven by
``verify_torchvision`` instead: the file loads into torchvision's network with that stem and
width (``archs.variant_model``), every tensor equal to the checkpoint's, and a random batch
runs through it to finite stage outputs of the expected shapes.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

from . import archs
from .archs import Variant
from .errors import ConversionError, first_line
from .naming import detectron2_resnet_settings, detectron2_to_torchvision

STAGES = ("res2", "res3", "res4", "res5")
_HOLDER_PREFIX = "backbone.bottom_up."


@dataclass
class VerifyReport:
    """Outcome of ``verify_detectron2``; ``ok`` is the verdict, ``lines()`` the explanation."""

    path: str
    arch: str
    norm: str
    model_tensors: int = 0              # bottom-up entries the Detectron2 model registers
    loaded: int = 0                     # of those, loaded from the file (values checked)
    not_loaded: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)   # file keys the model did not take
    mis_shaped: list[str] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    output_scale: float = 0.0           # largest |output| of the torchvision reference
    tolerance: float = 0.0
    image_size: int = 0

    @property
    def max_diff(self) -> float:
        return max(self.max_abs_diff.values(), default=float("inf"))

    @property
    def ok(self) -> bool:
        return (self.model_tensors > 0 and self.loaded == self.model_tensors
                and not self.not_loaded and not self.unmatched and not self.mis_shaped
                and len(self.max_abs_diff) == len(STAGES) and self.max_diff <= self.tolerance)

    def lines(self) -> list[str]:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")

        lines = [f"Detectron2 DetectionCheckpointer loaded {self.loaded}/{self.model_tensors} "
                 f"backbone tensors ({self.arch}, norm {self.norm}); "
                 f"{len(self.unmatched)} unmatched, {len(self.mis_shaped)} mis-shaped"]
        if self.not_loaded:
            lines.append(f"not loaded: {names(self.not_loaded)}")
        if self.unmatched:
            lines.append(f"unmatched in the file: {names(self.unmatched)}")
        if self.mis_shaped:
            lines.append(f"mis-shaped: {names(self.mis_shaped)}")
        if self.max_abs_diff:
            per_stage = ", ".join(f"{k} {v:.1e}" for k, v in self.max_abs_diff.items())
            lines.append(f"max |torchvision layer1..4 - Detectron2 res2..5| = {self.max_diff:.2e} "
                         f"(tolerance {self.tolerance:.1e}; outputs up to "
                         f"{self.output_scale:.2g}; {per_stage})")
        lines.append("verification " + ("passed" if self.ok else "FAILED"))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@contextmanager
def _quiet_logs(names: tuple[str, ...]) -> Iterator[None]:
    """Keep the records of Detectron2's and fvcore's loggers off the terminal: what they say of
    the load, the report says in its own lines."""
    handler = logging.NullHandler()
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate


def build_detectron2_backbone(arch: str, norm: str = "BN",
                              initialise: bool = True) -> torch.nn.Module:
    """A holder whose ``backbone`` is Detectron2's ResNet-FPN for ``arch``, in eval mode.

    ``initialise=False`` skips Detectron2's weight initialisation (the memory is left
    uninitialised): for a model whose every tensor is about to be loaded, and checked.
    """
    try:
        from detectron2.config import get_cfg
        from detectron2.modeling import build_backbone
    except ImportError as e:
        raise ConversionError("--verify", f"needs Detectron2, which cannot be imported ({e}); "
                                          f"install it with tools/install_detectron2.py") from None
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    settings = detectron2_resnet_settings(archs.depth(arch))
    for key, value in settings.items():
        setattr(cfg.MODEL.RESNETS, key, value)
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    cfg.MODEL.FPN.IN_FEATURES = list(STAGES)
    holder = torch.nn.Module()
    if initialise:
        holder.backbone = build_backbone(cfg)
    else:
        with torch.device("meta"):
            holder.backbone = build_backbone(cfg)
        holder.to_empty(device="cpu")
    return holder.eval()


def _torchvision_stages(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for stage, layer in zip(STAGES, (model.layer1, model.layer2, model.layer3, model.layer4), strict=True):
        x = layer(x)
        out[stage] = x
    return out


def verify_detectron2(pkl_path: str | Path, arch: str,
                      reference: Mapping[str, torch.Tensor] | None = None, norm: str = "BN",
                      image_size: int = 64, atol: float = 1e-4, rtol: float = 1e-5,
                      seed: int = 0) -> VerifyReport:
    """Load ``pkl_path`` into Detectron2's backbone for ``arch`` and compare with torchvision.

    ``reference``: the torchvision backbone state dict the file was made from; without it the
    reference is rebuilt from the file by inverting the renaming. ``norm``: "BN" (318 tensors
    for a ResNet-50) or "FrozenBN" (265). The stage outputs must agree within
    ``atol + rtol * max|output|`` (float32, eval mode).
    """
    if arch not in archs.RESNETS:
        raise ConversionError(str(pkl_path), f"unknown architecture {arch!r}; choose one of "
                                             f"{', '.join(archs.RESNETS)}")
    from detectron2.checkpoint import DetectionCheckpointer

    path = str(pkl_path)
    report = VerifyReport(path=path, arch=arch, norm=norm, image_size=image_size)
    holder = build_detectron2_backbone(arch, norm, initialise=False)
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise ConversionError(path, f"cannot read as a Detectron2 pickle ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConversionError(path, "not a Detectron2 model pickle (no 'model' dict)")
    stored = data["model"]

    # What the model can take, compared directly: a key of the file fits the bottom-up
    # tensor of its name (the naming m2t-convert writes) when the shapes agree.
    shapes = {k[len(_HOLDER_PREFIX):]: v.shape for k, v in holder.state_dict().items()
              if k.startswith(_HOLDER_PREFIX)}
    report.mis_shaped = [k for k in sorted(stored) if k in shapes
                         and tuple(getattr(stored[k], "shape", ())) != tuple(shapes[k])]
    report.unmatched = [k for k in sorted(stored)
                        if k not in shapes or k in report.mis_shaped]
    with torch.no_grad():  # a tensor the load does not fill can never equal the file's
        for tensor in holder.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    with _quiet_logs(("detectron2", "fvcore")):
        DetectionCheckpointer(holder).load(path)
    state = holder.state_dict()
    report.model_tensors = len(shapes)
    for name in shapes:
        if name.endswith("num_batches_tracked"):
            report.loaded += 1  # registered by the model, filled in at load (SPEC §3)
        elif name in stored and torch.equal(state[_HOLDER_PREFIX + name],
                                            torch.as_tensor(stored[name])):
            report.loaded += 1
        else:
            report.not_loaded.append(name)

    if reference is None:
        reference = {detectron2_to_torchvision(k): torch.as_tensor(v) for k, v in stored.items()}
    with torch.device("meta"):  # no initialisation: every tensor used below is assigned
        tv = getattr(torchvision.models, arch)()
    result = tv.load_state_dict(dict(reference), strict=False, assign=True)
    unset = [k for k in result.missing_keys
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if unset:
        raise ConversionError(path, f"the torchvision reference lacks {', '.join(unset[:3])}")
    tv.eval()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        expected = _torchvision_stages(tv, x)
        got = holder.backbone.bottom_up(x)
    report.output_scale = max(float(v.abs().max()) for v in expected.values())
    report.tolerance = atol + rtol * report.output_scale
    for stage in STAGES:
        if stage in got and got[stage].shape == expected[stage].shape:
            report.max_abs_diff[stage] = float((got[stage] - expected[stage]).abs().max())
    return report


@dataclass
class TorchvisionReport:
    """Outcome of ``verify_torchvision``, worded like ``VerifyReport``."""

    path: str
    arch: str
    stem: str
    width: int
    model_tensors: int = 0              # backbone entries the model registers (fc excluded)
    loaded: int = 0                     # of those, loaded from the file with the right values
    not_loaded: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)   # file keys the model did not take
    stage_shapes: dict[str, list[int]] = field(default_factory=dict)
    expected_stage_shapes: dict[str, list[int]] = field(default_factory=dict)  # on meta
    finite: bool = False
    image_size: int = 0

    @property
    def ok(self) -> bool:
        return (self.model_tensors > 0 and self.loaded == self.model_tensors
                and not self.not_loaded and not self.unmatched and self.finite
                and len(self.stage_shapes) == len(STAGES)
                and self.stage_shapes == self.expected_stage_shapes)

    def lines(self) -> list[str]:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")

        model = archs.name(self.arch, self.stem, self.width)
        lines = [f"torchvision {model} loaded {self.loaded}/{self.model_tensors} backbone "
                 f"tensors from the file, equal to the checkpoint's; "
                 f"{len(self.unmatched)} unmatched"]
        if self.not_loaded:
            lines.append(f"not loaded: {names(self.not_loaded)}")
        if self.unmatched:
            lines.append(f"unmatched in the file: {names(self.unmatched)}")
        if self.stage_shapes:
            last = self.stage_shapes.get(STAGES[-1])
            shaped = ("of the expected shapes" if self.stage_shapes == self.expected_stage_shapes
                      else f"NOT of the expected shapes {self.expected_stage_shapes}")
            lines.append(f"{self.image_size} px batch: layer1..4 outputs "
                         f"{'finite' if self.finite else 'NOT finite'}, {shaped}"
                         + (f", layer4 {tuple(last)}" if last else ""))
        lines.append("Detectron2 check skipped: its ResNet cannot host a "
                     f"{Variant(self.stem, self.width).describe()} backbone")
        lines.append("verification " + ("passed" if self.ok else "FAILED"))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_torchvision(pth_path: str | Path, arch: str, reference: Mapping[str, torch.Tensor],
                       stem: str = "imagenet", width: int = archs.STANDARD_WIDTH,
                       seed: int = 0) -> TorchvisionReport:
    """Load the ``.pth`` at ``pth_path`` into torchvision's ``arch`` with this stem and width.

    Every backbone tensor the model registers must come from the file and equal
    ``reference`` (the state it was written from); then a random batch (32 px for the CIFAR
    stem, 64 px otherwise) must give finite ``layer1..layer4`` outputs.
    """
    path = str(pth_path)
    image_size = 32 if stem == "cifar" else 64
    report = TorchvisionReport(path=path, arch=arch, stem=stem, width=width,
                               image_size=image_size)
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file it cannot read
        raise ConversionError(path, f"cannot read back as a torchvision state dict "
                                    f"({first_line(e)})") from None
    if not isinstance(stored, dict):
        raise ConversionError(path, "not a state dict")
    model = archs.variant_model(arch, stem, width, device="cpu")
    model.fc = torch.nn.Identity()
    keys = list(model.state_dict())
    report.model_tensors = len(keys)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    fitting = {k: v for k, v in stored.items()
               if k in shapes and isinstance(v, torch.Tensor) and v.shape == shapes[k]}
    result = model.load_state_dict(fitting, strict=False)
    report.unmatched = [k for k in stored if k not in fitting]
    state = model.state_dict()
    for key in keys:
        if (key not in result.missing_keys and key in reference
                and torch.equal(state[key], reference[key])):
            report.loaded += 1
        else:
            report.not_loaded.append(key)
    model.eval()
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        outputs = _torchvision_stages(model, x)
    report.finite = all(bool(torch.isfinite(v).all()) for v in outputs.values())
    report.stage_shapes = {k: list(v.shape) for k, v in outputs.items()}
    with torch.no_grad():  # the shapes the variant has by construction, computed on meta
        shapes = _torchvision_stages(archs.variant_model(arch, stem, width).eval(),
                                     x.to("meta"))
    report.expected_stage_shapes = {k: list(v.shape) for k, v in shapes.items()}
    return report
