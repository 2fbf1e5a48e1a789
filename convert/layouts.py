"""Recognise what a checkpoint holds: where its ResNet backbones are and which branch each is.

Checkpoints from different codebases wrap the same torchvision ResNet differently. We flatten
the loaded object into dotted keys, strip wrapper names that carry no meaning (a
``state_dict`` or ``model`` entry at the top, ``module.`` from DataParallel/DDP anywhere),
and split every key that ends like a torchvision ResNet key into a *prefix* and that key.
Each prefix holding ResNet stages is a candidate backbone; ``KNOWN_PREFIXES`` (the one table
of layouts) says which branch, teacher or student, a prefix is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .naming import split_torchvision_key

OUR_FORMAT = "momentum2-pretrain"


@dataclass(frozen=True)
class KnownPrefix:
    """A backbone prefix some codebase uses, the branch it holds, and its counterpart."""

    prefix: str
    branch: str
    layout: str
    partner: str
    #: Whether the prefix names its branch only next to its partner: a lone ``backbone.`` is
    #: just *the* backbone (e.g. solo-learn SimCLR), not a student.
    needs_partner: bool = False


#: The one table of known layouts, after wrapper stripping (``module.``, ``state_dict``).
KNOWN_PREFIXES: tuple[KnownPrefix, ...] = (
    KnownPrefix("teacher.backbone.", "teacher", "m2t-pretrain", "student.backbone."),
    KnownPrefix("student.backbone.", "student", "m2t-pretrain", "teacher.backbone."),
    KnownPrefix("teacher_encoder.", "teacher", "Momentum² Teacher (authors' code)",
                "student_encoder."),
    KnownPrefix("student_encoder.", "student", "Momentum² Teacher (authors' code)",
                "teacher_encoder."),
    KnownPrefix("encoder_k.", "teacher", "MoCo (encoder_q / encoder_k)", "encoder_q."),
    KnownPrefix("encoder_q.", "student", "MoCo (encoder_q / encoder_k)", "encoder_k."),
    KnownPrefix("target_net.backbone.", "teacher", "BYOL / EMAN (online_net / target_net)",
                "online_net.backbone."),
    KnownPrefix("online_net.backbone.", "student", "BYOL / EMAN (online_net / target_net)",
                "target_net.backbone."),
    KnownPrefix("momentum_backbone.", "teacher",
                "solo-learn / Lightning (backbone / momentum_backbone)", "backbone."),
    KnownPrefix("backbone.", "student", "solo-learn / Lightning (backbone / momentum_backbone)",
                "momentum_backbone.", needs_partner=True),
    KnownPrefix("ema.", "teacher", "EMAN (main / ema)", "main."),
    KnownPrefix("main.", "student", "EMAN (main / ema)", "ema.", needs_partner=True),
    KnownPrefix("model_ema.", "teacher", "EMA model (model / model_ema)", ""),
    KnownPrefix("state_dict_ema.", "teacher", "timm EMA (state_dict / state_dict_ema)", ""),
    KnownPrefix("", "student", "torchvision ResNet state dict", "model_ema.", needs_partner=True),
)

#: Top-level entries that only wrap the weights; stripped from the front of every key.
WRAPPERS = ("state_dict", "model", "module")

#: Momentum-BN counters (SPEC §1.1): part of our teacher's BN state, not of an ordinary BN.
MOMENTUM_BN_EXTRAS = ("step", "total_steps")

#: Key fragments of other architectures, to say what a non-ResNet checkpoint looks like.
OTHER_ARCHITECTURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a Vision Transformer", ("cls_token", "class_token", "patch_embed", "conv_proj",
                              "encoder.layers.", "pos_embed")),
    ("a Swin Transformer", ("relative_position_bias_table",)),
    ("a ConvNeXt", ("downsample_layers.", "stages.")),
    ("a VGG / MobileNet / EfficientNet / DenseNet (torchvision 'features.')", ("features.",)),
)


@dataclass
class Backbone:
    """ResNet tensors found under one prefix, renamed to torchvision keys."""

    prefix: str                  # after wrapper stripping, e.g. "encoder_k."
    found_as: str                # the prefix as it appears in the file
    tensors: dict[str, torch.Tensor]
    branch: str | None = None  # "teacher", "student", or None when the layout says neither
    layout: str = "unrecognised layout"

    def describe(self) -> str:
        label = f"{self.branch}, {self.layout}" if self.branch else self.layout
        return f"'{self.found_as}' ({label})"


@dataclass
class Contents:
    """What a loaded checkpoint holds, as far as conversion cares."""

    backbones: list[Backbone]
    wrappers: list[str]
    keys: list[str]              # every tensor key in the file, flattened
    canonical: list[str]         # the same keys with wrappers stripped
    meta: dict[str, Any] = field(default_factory=dict)  # our format: method, arch, step, ...

    @property
    def tensor_count(self) -> int:
        return len(self.keys)

    @property
    def ours(self) -> bool:
        return self.meta.get("format") == OUR_FORMAT


@dataclass
class Selection:
    """The backbone chosen for export and why."""

    backbone: Backbone
    branch: str   # "teacher", "student" or "single backbone"
    note: str = ""
    dropped_counters: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # extras removed


#: Bounds on what flattening a loaded object may walk: real checkpoints nest a few levels and
#: hold thousands of entries, while a few kilobytes of pickle can nest a dict a million deep
#: or, by sharing one dict many times over, name more entries than memory holds.
MAX_DEPTH = 64
MAX_ENTRIES = 1_000_000
MAX_KEY_LENGTH = 1000


def _flatten(obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor in ``obj``'s nested string-keyed mappings, under its dotted key.

    ValueError (a user-facing sentence) for an object no checkpoint looks like: nested deeper
    than ``MAX_DEPTH``, more than ``MAX_ENTRIES`` entries, or two entries with one dotted key.
    """
    out: dict[str, torch.Tensor] = {}
    entries = 0
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        node, prefix, depth = stack.pop()
        if isinstance(node, torch.Tensor):
            key = prefix[:-1]
            if key in out:
                raise ValueError(f"two entries flatten to the same key '{_short(key)}' "
                                 f"(e.g. 'a.b' and 'a' → 'b'): not a checkpoint this tool can "
                                 f"read unambiguously")
            out[key] = node
            continue
        if isinstance(node, torch.nn.Module):  # a whole pickled model (only with --unsafe-load)
            node = node.state_dict()
        if not isinstance(node, Mapping):
            continue
        if depth >= MAX_DEPTH:
            raise ValueError(f"nests containers more than {MAX_DEPTH} levels deep (or refers "
                             f"to itself): not a model checkpoint")
        entries += len(node)
        if entries > MAX_ENTRIES:
            raise ValueError(f"holds more than {MAX_ENTRIES:,} entries (counting each shared "
                             f"one every time it is reached): not a model checkpoint")
        children = []
        for key, value in node.items():
            if isinstance(key, str):  # optimizer states are keyed by int: not weights
                child = f"{prefix}{key}."
                if len(child) > MAX_KEY_LENGTH:
                    raise ValueError(f"has a key longer than {MAX_KEY_LENGTH} characters "
                                     f"('{_short(child)}'): not a model checkpoint")
                children.append((value, child, depth + 1))
        stack.extend(reversed(children))  # depth first, in the file's order
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _strip_wrappers(key: str, seen: set[str]) -> str:
    parts = key.split(".")
    while len(parts) > 1 and parts[0] in WRAPPERS:
        seen.add(parts.pop(0))
    if "module" in parts[:-1]:
        seen.add("module")
        parts = [p for i, p in enumerate(parts) if p != "module" or i == len(parts) - 1]
    return ".".join(parts)


def scan(obj: Any) -> Contents:
    """Find every ResNet backbone in a loaded checkpoint object.

    Backbones are told apart by their prefix as written in the file: ``module.encoder_q.``
    and ``encoder_q.`` (or ``state_dict.`` and ``model.``) are two backbones even though they
    strip to one prefix, so that neither is silently mixed into the other. ValueError (a
    sentence) for objects no checkpoint looks like (see ``_flatten``).
    """
    flat = _flatten(obj)
    seen: set[str] = set()
    groups: dict[str, dict[str, torch.Tensor]] = {}   # prefix in the file -> tensors
    canonical_of: dict[str, str] = {}                 # prefix in the file -> stripped prefix
    canonical_keys: list[str] = []
    for key, tensor in flat.items():
        canonical = _strip_wrappers(key, seen)
        canonical_keys.append(canonical)
        split = split_torchvision_key(canonical)
        if split is None:
            continue
        prefix, name = split
        found_as = key[: len(key) - len(name)]
        groups.setdefault(found_as, {})[name] = tensor
        canonical_of[found_as] = prefix
    backbones = [Backbone(canonical_of[found_as], found_as, tensors)
                 for found_as, tensors in groups.items()
                 if any(k.startswith("layer1.") for k in tensors)]
    present = {b.prefix for b in backbones}
    known = {k.prefix: k for k in KNOWN_PREFIXES}
    for backbone in backbones:
        entry = known.get(backbone.prefix)
        if entry is None:
            continue
        backbone.layout = entry.layout
        if not entry.needs_partner or entry.partner in present:
            backbone.branch = entry.branch
        elif entry.prefix == "":
            backbone.layout = "torchvision ResNet state dict"
        else:
            backbone.layout = f"single backbone under '{entry.prefix}'"
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping) and obj.get("format") == OUR_FORMAT:
        meta = {k: obj.get(k) for k in ("format", "version", "method", "arch", "step", "epoch")}
        config = obj.get("config")
        model = config.get("model") if isinstance(config, Mapping) else None
        if isinstance(model, Mapping):  # what the config says, checked against the tensors
            for key in ("stem", "width"):
                if key in model:
                    meta[key] = model[key]
        train = config.get("train") if isinstance(config, Mapping) else None
        for source in (obj, train if isinstance(train, Mapping) else {}):
            if source.get("export_branch") in ("teacher", "student"):
                meta["export_branch"] = source["export_branch"]
                break
    order = [wrapper for wrapper in WRAPPERS if wrapper in seen]
    return Contents(backbones, order, list(flat), canonical_keys, meta)


def not_exported(contents: Contents, selection: Selection) -> dict[str, int]:
    """Tensors of the file left out, grouped by name: {'fc': 2, 'encoder_q': 318, ...}.

    Groups are the first key segment, or the first two inside the exported prefix's own
    top-level entry (``encoder_k.fc``, ``teacher.projector``).
    """
    prefix = selection.backbone.prefix
    exported = {selection.backbone.found_as + name for name in selection.backbone.tensors}
    head = prefix.split(".")[0]
    groups: dict[str, int] = {}
    for original, key in zip(contents.keys, contents.canonical, strict=True):
        if original in exported:
            continue
        parts = key.split(".")
        if prefix and key.startswith(prefix):
            group = prefix + parts[prefix.count(".")]
        elif head and parts[0] == head and len(parts) > 2:
            group = ".".join(parts[:2])
        else:
            group = parts[0] if len(parts) > 1 else key
        groups[group] = groups.get(group, 0) + 1
    return groups


def no_resnet_message(contents: Contents) -> str:
    """Why nothing could be converted, in terms of what the file does hold."""
    if contents.tensor_count == 0:
        return "holds no tensors at all: not a model checkpoint"
    keys = ", ".join(contents.keys[:3])
    n = contents.tensor_count
    return (f"holds {n} tensor{'' if n == 1 else 's'} but no ResNet backbone (no keys like "
            f"'conv1.weight', 'layer1.0.conv1.weight' under any prefix); e.g. {keys}")


#: Key fragments of Detectron2's own models: a whole detector, or a bare Detectron2 ResNet.
DETECTRON2_DETECTOR = ("backbone.bottom_up.", "roi_heads.", "proposal_generator.",
                       "sem_seg_head.")
DETECTRON2_RESNET = ("stem.conv1.", "res2.0.", "res5.0.")


def detectron2_kind(contents_keys: list[str]) -> str | None:
    """Why a file in Detectron2's naming needs no conversion, or None if it is not one."""
    if any(fragment in key for key in contents_keys for fragment in DETECTRON2_DETECTOR):
        return ("is a Detectron2 checkpoint of a whole detector (keys like "
                "'backbone.bottom_up.res2...', 'roi_heads...', as in model_final.pth), not a "
                "pretraining checkpoint: it needs no conversion; Detectron2 (MODEL.WEIGHTS, "
                "m2t-transfer --weights) loads it as it is")
    if all(any(fragment in key for key in contents_keys) for fragment in DETECTRON2_RESNET):
        return ("holds a ResNet already in Detectron2's naming ('stem.conv1', 'res2'...'res5'), "
                "not torchvision's: it needs no conversion; Detectron2 (MODEL.WEIGHTS, "
                "m2t-transfer --weights) loads it as it is")
    return None


def other_architecture(contents_keys: list[str]) -> str | None:
    """'a Vision Transformer' etc. when the keys look like another known architecture."""
    for name, fragments in OTHER_ARCHITECTURES:
        if any(fragment in key for key in contents_keys for fragment in fragments):
            return name
    return None


def select(contents: Contents, branch: str | None = None,
           prefix: str | None = None) -> Selection:
    """Choose the backbone to export; ValueError (a user-facing sentence) if none or several.

    ``branch`` None means the checkpoint's own preference (``train.export_branch`` in our
    checkpoints), else the teacher (SPEC §1.1: the authors evaluate the teacher). A
    checkpoint with one backbone of no particular branch exports it whatever is asked.
    """
    listing = ", ".join(b.describe() for b in contents.backbones)
    if prefix is not None:
        wanted = prefix if prefix == "" or prefix.endswith(".") else prefix + "."
        chosen = ([b for b in contents.backbones if b.found_as == wanted]
                  or [b for b in contents.backbones if b.prefix == wanted])
        if not chosen:
            raise ValueError(f"no backbone under prefix '{wanted}'; backbones found: {listing}")
        if len(chosen) > 1:
            raise ValueError(f"prefix '{wanted}' is ambiguous: {_several(chosen)}")
        return _finish(chosen[0], chosen[0].branch or "single backbone")
    requested = branch or contents.meta.get("export_branch") or "teacher"
    matches = [b for b in contents.backbones if b.branch == requested]
    if len(matches) == 1:
        return _finish(matches[0], requested)
    if len(matches) > 1:
        raise ValueError(f"the {requested} branch is ambiguous: {_several(matches)}")
    if (contents.ours and contents.meta.get("method") == "projector_only"
            and requested == "teacher"):
        students = [b for b in contents.backbones if b.branch == "student"]
        if len(students) == 1:
            return _finish(students[0], "teacher",
                           "method projector_only: the teacher shares the student's backbone, "
                           "so the student backbone is exported")
    unnamed = [b for b in contents.backbones if b.branch is None]
    if len(contents.backbones) == 1 and unnamed:
        return _finish(contents.backbones[0], "single backbone")
    if len(unnamed) == len(contents.backbones):
        raise ValueError(f"holds {len(unnamed)} backbones and none is a teacher or a student: "
                         f"{_several(unnamed)}")
    others = [b for b in contents.backbones if b.branch and b.branch != requested]
    other_branches = sorted({b.branch for b in others if b.branch})
    if len(other_branches) == 1 and len(others) == 1:
        hint = f"--branch {other_branches[0]}"
    else:
        hint = "--prefix " + " or --prefix ".join(f"'{b.found_as}'" for b in contents.backbones)
    raise ValueError(f"no {requested} backbone found; backbones found under prefixes {listing}; "
                     f"choose one with {hint}")


def _several(backbones: list[Backbone]) -> str:
    """'several backbones found (...); choose one with --prefix 'a.' or --prefix 'b.''."""
    listing = ", ".join(b.describe() for b in backbones)
    choices = " or ".join(f"--prefix '{b.found_as}'" for b in backbones)
    return f"several backbones found ({listing}); choose one with {choices}"


def _finish(backbone: Backbone, branch: str, note: str = "") -> Selection:
    """Drop momentum-BN counters: the rest of a momentum BN is an ordinary BN's state."""
    kept: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, tensor in backbone.tensors.items():
        # Only BN owners (bn1, bnK, downsample.1) can carry names other than "weight".
        if key.rpartition(".")[2] in MOMENTUM_BN_EXTRAS:
            dropped += 1
            continue
        kept[key] = tensor
    return Selection(backbone, branch, note, dropped, kept)
