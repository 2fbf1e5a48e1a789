"""Recognise what a checkpoint holds: where its ResNet backbones are and which branch each is.

Checkpoints from different codebases wrap the same torchvision ResNet differently. We flatten
the loaded object into dotted keys, strip wrapper names that carry no meaning (a
``state_dict`` or ``model`` entry at the top, ``module.`` from DataParallel/DDP anywhere),
and split every key that ends like a torchvision ResNet key (or like one of a ResNet saved as
numbered ``nn.Sequential`` children) into a *prefix* and that key. Each prefix holding ResNet
stages is a candidate backbone; ``LAYOUTS`` (the one table of layouts) says which branch,
teacher or student, each prefix of a codebase is, and which branch that codebase's own
converter or evaluation transfers: the default (SPEC §3; docs/checkpoint-formats.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .naming import split_sequential_key, split_torchvision_key

OUR_FORMAT = "momentum2-pretrain"

BRANCHES = ("teacher", "student")


@dataclass(frozen=True)
class Layout:
    """Where one codebase's checkpoint keeps its backbones, and which one it transfers.

    Prefixes are written after wrapper stripping (``module.``, a top-level ``state_dict``).
    ``student``'s first prefix is the student itself; any further ones are copies of it that
    the codebase saves too (OpenSelfSup's ``backbone`` is ``encoder_q[0]``). ``alone``: the
    prefixes that name their branch even without the rest of the layout (a lone
    ``encoder_k.`` is a key encoder; a lone ``backbone.`` is just *the* backbone).
    ``default``: the branch the source's own converter or evaluation takes, ``why`` says
    which (it is printed). ``ours``: the layout of m2t-pretrain checkpoints only, whose
    default is chosen by method (``OUR_METHODS``).
    """

    name: str
    teacher: str
    student: tuple[str, ...]
    default: str
    why: str
    alone: tuple[str, ...] = ()
    ours: bool = False

    def members(self) -> list[tuple[str, str, bool]]:
        """(prefix, branch, is a copy) for every prefix of the layout."""
        return [(self.teacher, "teacher", False), (self.student[0], "student", False),
                *((copy, "student", True) for copy in self.student[1:])]


def _both(name: str, teacher: str, student: str, default: str, why: str) -> Layout:
    """A layout whose two prefixes each name their branch on their own."""
    return Layout(name, teacher, (student,), default, why, alone=(teacher, student))


#: The one table of known layouts. Where several match a file, the one that explains most of
#: its backbones wins (then the first listed): ``backbone.`` is the student next to
#: ``momentum_backbone.`` but the teacher next to ``student_backbone.``.
LAYOUTS: tuple[Layout, ...] = (
    Layout("m2t-pretrain", "teacher.backbone.", ("student.backbone.",), "by method",
           "by method", alone=("teacher.backbone.", "student.backbone."), ours=True),
    _both("DINO (teacher / student)", "teacher.backbone.", "student.backbone.", "teacher",
          "DINO transfers the teacher: its evaluation takes --checkpoint_key teacher"),
    _both("Momentum² Teacher (authors' code)", "teacher_encoder.", "student_encoder.",
          "teacher", "the Momentum² Teacher authors transfer the teacher"),
    _both("MoCo v1/v2 (encoder_q / encoder_k)", "encoder_k.", "encoder_q.", "student",
          "MoCo's convert-pretrain-to-detectron2.py takes encoder_q"),
    _both("MoCo v3 (base_encoder / momentum_encoder)", "momentum_encoder.", "base_encoder.",
          "student", "MoCo v3's main_lincls.py takes base_encoder"),
    Layout("PixPro (encoder / encoder_k)", "encoder_k.", ("encoder.",), "student",
           "PixPro's convert_pretrain_to_d2.py takes encoder", alone=("encoder_k.",)),
    _both("EMAN BYOL (online_net / target_net)", "target_net.backbone.",
          "online_net.backbone.", "student",
          "EMAN's main_lincls.py takes --model-prefix online_net.backbone"),
    _both("EMAN FixMatch (main / ema)", "ema.backbone.", "main.backbone.", "student",
          "EMAN's main_fixmatch.py evaluates main"),
    Layout("EMAN (main / ema)", "ema.", ("main.",), "student", "EMAN evaluates main",
           alone=("ema.",)),
    Layout("solo-learn / Lightning (backbone / momentum_backbone)", "momentum_backbone.",
           ("backbone.",), "student", "solo-learn's converter takes backbone",
           alone=("momentum_backbone.",)),
    Layout("lightly example (backbone / backbone_momentum)", "backbone_momentum.",
           ("backbone.",), "student", "lightly's examples embed with backbone",
           alone=("backbone_momentum.",)),
    Layout("lightly BYOL benchmark (backbone / teacher_backbone)", "teacher_backbone.",
           ("backbone.",), "student", "lightly's benchmark evaluates backbone",
           alone=("teacher_backbone.",)),
    Layout("lightly MoCo v2 benchmark (backbone / key_backbone)", "key_backbone.",
           ("backbone.",), "student", "lightly's benchmark evaluates backbone",
           alone=("key_backbone.",)),
    Layout("lightly MoCo v2 benchmark, older (backbone is the key encoder / query_backbone)",
           "backbone.", ("query_backbone.",), "teacher",
           "that benchmark evaluates backbone, its key encoder", alone=("query_backbone.",)),
    Layout("lightly DINO benchmark (backbone is the teacher / student_backbone)", "backbone.",
           ("student_backbone.",), "teacher",
           "lightly's DINO benchmark evaluates backbone, its teacher",
           alone=("student_backbone.",)),
    _both("lightly DINO example (teacher_backbone / student_backbone)", "teacher_backbone.",
          "student_backbone.", "teacher", "DINO transfers the teacher"),
    Layout("mmselfsup 1.x / mmpretrain BYOL (backbone / target_net)", "target_net.0.",
           ("backbone.",), "student", "mmselfsup's extract_backbone_weights.py takes backbone",
           alone=("target_net.0.",)),
    Layout("mmselfsup 1.x / mmpretrain MoCo (backbone / encoder_k)", "encoder_k.0.",
           ("backbone.",), "student", "mmselfsup's extract_backbone_weights.py takes backbone",
           alone=("encoder_k.0.",)),
    Layout("mmselfsup 1.x / mmpretrain MoCo v3 (backbone / momentum_encoder)",
           "momentum_encoder.0.", ("backbone.",), "student",
           "mmselfsup's extract_backbone_weights.py takes backbone",
           alone=("momentum_encoder.0.",)),
    Layout("OpenSelfSup / DenseCL MoCo (backbone = encoder_q.0 / encoder_k.0)", "encoder_k.0.",
           ("backbone.", "encoder_q.0."), "student",
           "OpenSelfSup's extract_backbone_weights.py takes backbone",
           alone=("encoder_k.0.", "encoder_q.0.")),
    Layout("OpenSelfSup BYOL (backbone = online_net.0 / target_net.0)", "target_net.0.",
           ("backbone.", "online_net.0."), "student",
           "OpenSelfSup's extract_backbone_weights.py takes backbone",
           alone=("target_net.0.", "online_net.0.")),
    _both("byol-pytorch (online_encoder / target_encoder)", "target_encoder.net.",
          "online_encoder.net.", "student", "byol-pytorch trains and saves the online network"),
    Layout("EMA model (model / model_ema)", "model_ema.", ("",), "student",
           "timm and DeiT evaluate model, its EMA only on request", alone=("model_ema.",)),
    Layout("timm EMA (state_dict / state_dict_ema)", "state_dict_ema.", ("",), "student",
           "timm's validate.py takes state_dict unless --use-ema",
           alone=("state_dict_ema.",)),
)

#: The branch each method of ours exports by default (``train.export_branch: auto``), and why:
#: what the method's authors evaluate.
OUR_METHODS: dict[str, tuple[str, str]] = {
    "m2t": ("teacher", "method m2t: the Momentum² Teacher authors evaluate the teacher"),
    "byol": ("student", "method byol: the BYOL paper evaluates the online network"),
    "eman": ("student", "method eman: EMAN's code evaluates the online network "
                        "(its main_lincls.py takes encoder_q / online_net.backbone)"),
    "projector_only": ("student", "method projector_only: its only backbone is the "
                                  "student's"),
}
UNKNOWN_METHOD = ("teacher", "method {method}: not one this converter knows; the teacher")

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
    sources: dict[str, str] = field(default_factory=dict)  # torchvision key -> key in the file
    copy_of: str | None = None   # the layout says this is a copy of that prefix's backbone
    entry: Layout | None = None  # the layout that named the branch

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
    why: str = ""  # what chose the branch: a flag, the checkpoint, or the source's convention


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
    strip to one prefix, so that neither is silently mixed into the other. A prefix holding
    a ResNet saved as numbered children (``naming.split_sequential_key``) is read that way.
    ValueError (a sentence) for objects no checkpoint looks like (see ``_flatten``).
    """
    flat = _flatten(obj)
    seen: set[str] = set()
    canonical_keys = [_strip_wrappers(key, seen) for key in flat]
    sequential = _sequential_prefixes(list(flat), canonical_keys)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # file prefix -> tensors
    canonical_of: dict[str, str] = {}                 # prefix in the file -> stripped prefix
    for (key, tensor), canonical in zip(flat.items(), canonical_keys, strict=True):
        split = _split(key, canonical, sequential)
        if split is None:
            continue
        found_as, prefix, name = split
        groups.setdefault(found_as, {})[name] = (key, tensor)
        canonical_of[found_as] = prefix
    backbones = [Backbone(canonical_of[found_as], found_as,
                          {name: tensor for name, (_, tensor) in named.items()},
                          sources={name: key for name, (key, _) in named.items()})
                 for found_as, named in groups.items()
                 if any(k.startswith("layer1.") for k in named)]
    meta = _our_meta(obj)
    _name_branches(backbones, ours=meta.get("format") == OUR_FORMAT)
    order = [wrapper for wrapper in WRAPPERS if wrapper in seen]
    return Contents(backbones, order, list(flat), canonical_keys, meta)


def _sequential_prefixes(keys: list[str], canonical: list[str]) -> set[str]:
    """Prefixes (as in the file) whose keys are a ResNet's numbered children: a conv1
    (``0.weight``) and a layer1 (``4.0...``) under the same prefix."""
    names: dict[str, set[str]] = {}
    for key, stripped in zip(keys, canonical, strict=True):
        split = split_sequential_key(stripped)
        if split is not None:
            names.setdefault(key[: len(key) - len(split[1])], set()).add(split[2])
    return {prefix for prefix, found in names.items()
            if "conv1.weight" in found and any(n.startswith("layer1.") for n in found)}


def _split(key: str, canonical: str, sequential: set[str]) -> tuple[str, str, str] | None:
    """(prefix in the file, stripped prefix, torchvision key) of a backbone key, or None."""
    split = split_sequential_key(canonical)
    if split is not None and key[: len(key) - len(split[1])] in sequential:
        prefix, tail, name = split
    else:
        plain = split_torchvision_key(canonical)
        if plain is None:
            return None
        (prefix, name), tail = plain, plain[1]
    return key[: len(key) - len(tail)], prefix, name


def _name_branches(backbones: list[Backbone], ours: bool) -> None:
    """Give each backbone the branch its layout says (``LAYOUTS``), in place.

    A layout matches the backbones under its prefixes, provided all its prefixes are there
    or one that names its branch alone is; the layout explaining most backbones wins, then
    the first listed. A backbone no layout explains keeps no branch.
    """
    present = {b.prefix for b in backbones}
    candidates = []
    for index, layout in enumerate(LAYOUTS):
        if layout.ours and not ours:
            continue
        hits = [m for m in layout.members() if m[0] in present]
        complete = len(hits) == len(layout.members())
        if hits and (complete or any(m[0] in layout.alone for m in hits)):
            candidates.append((-len(hits), not complete, index, layout, hits))
    claimed: set[str] = set()
    for *_, layout, hits in sorted(candidates, key=lambda c: c[:3]):
        if any(prefix in claimed for prefix, _, _ in hits):
            continue
        for prefix, branch, is_copy in hits:
            claimed.add(prefix)
            for backbone in backbones:
                if backbone.prefix == prefix:
                    backbone.branch, backbone.layout, backbone.entry = branch, layout.name, layout
                    backbone.copy_of = layout.student[0] if is_copy else None
    for backbone in backbones:
        if backbone.prefix in claimed:
            continue
        if backbone.prefix == "":
            backbone.layout = "torchvision ResNet state dict"
        elif any(backbone.prefix == m[0] for layout in LAYOUTS for m in layout.members()):
            backbone.layout = f"single backbone under '{backbone.prefix}'"


def _our_meta(obj: Any) -> dict[str, Any]:
    """What our checkpoint says of itself (method, arch, step, ...); empty for others.

    ``export_branch`` is kept only when it names a branch: "auto" (the default since it
    exists) or anything else leaves the choice to the method (``OUR_METHODS``).
    """
    if not isinstance(obj, Mapping) or obj.get("format") != OUR_FORMAT:
        return {}
    meta = {k: obj.get(k) for k in ("format", "version", "method", "arch", "step", "epoch")}
    config = obj.get("config")
    model = config.get("model") if isinstance(config, Mapping) else None
    if isinstance(model, Mapping):  # what the config says, checked against the tensors
        for key in ("stem", "width"):
            if key in model:
                meta[key] = model[key]
    train = config.get("train") if isinstance(config, Mapping) else None
    for source in (obj, train if isinstance(train, Mapping) else {}):
        if "export_branch" in source:
            if source["export_branch"] in BRANCHES:
                meta["export_branch"] = source["export_branch"]
            break
    return meta


def not_exported(contents: Contents, selection: Selection) -> dict[str, int]:
    """Tensors of the file left out, grouped by name: {'fc': 2, 'encoder_q': 318, ...}.

    Groups are the first key segment, or the first two inside the exported prefix's own
    top-level entry (``encoder_k.fc``, ``teacher.projector``).
    """
    prefix = selection.backbone.prefix
    exported = set(selection.backbone.sources.values())
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

    ``branch`` None means the default (``default_branch``): in our checkpoints the
    ``train.export_branch`` they name, else their method's; in others the branch their
    layout's source transfers. A checkpoint with one backbone of no particular branch exports
    it whatever is asked. The selection's ``why`` says what chose it.
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
        return _finish(chosen[0], chosen[0].branch or "single backbone", why="as --prefix asks")
    if branch is not None:
        requested, why = branch, "as --branch asks"
    else:
        requested, why = default_branch(contents)
    matches = [b for b in contents.backbones if b.branch == requested]
    if len(matches) > 1:
        matches = _without_copies(matches)
    if len(matches) == 1:
        return _finish(matches[0], requested, why=why)
    if len(matches) > 1:
        raise ValueError(f"the {requested} branch is ambiguous: {_several(matches)}")
    if (contents.ours and contents.meta.get("method") == "projector_only"
            and requested == "teacher"):
        students = [b for b in contents.backbones if b.branch == "student"]
        if len(students) == 1:
            return _finish(students[0], "teacher",
                           "method projector_only: the teacher shares the student's backbone, "
                           "so the student backbone is exported", why=why)
    unnamed = [b for b in contents.backbones if b.branch is None]
    if len(contents.backbones) == 1 and unnamed:
        return _finish(contents.backbones[0], "single backbone",
                       why="the file's only backbone")
    if len(unnamed) == len(contents.backbones):
        raise ValueError(f"holds {len(unnamed)} backbones and none is a teacher or a student: "
                         f"{_several(unnamed)}")
    others = [b for b in contents.backbones if b.branch and b.branch != requested]
    other_branches = sorted({b.branch for b in others if b.branch})
    if len(other_branches) == 1 and len(_without_copies(others)) == 1:
        hint = f"--branch {other_branches[0]}"
    else:
        hint = "--prefix " + " or --prefix ".join(f"'{b.found_as}'" for b in contents.backbones)
    raise ValueError(f"no {requested} backbone found; backbones found under prefixes {listing}; "
                     f"choose one with {hint}")


def default_branch(contents: Contents) -> tuple[str, str]:
    """(branch, why) exported when no ``--branch`` is given (SPEC §3).

    Our checkpoints: the ``train.export_branch`` they name (teacher or student), else the
    branch their method's authors evaluate (``OUR_METHODS``). Others: the branch their
    layout's source transfers (``Layout.default``); when the file's layouts disagree, or none
    names a branch, the teacher.
    """
    if contents.ours:
        method = contents.meta.get("method")
        named = contents.meta.get("export_branch")
        if named in BRANCHES:
            why = f"the checkpoint's train.export_branch {named}"
            if method in OUR_METHODS and OUR_METHODS[method][0] != named:
                why += (f"; method {method} alone would take the "
                        f"{OUR_METHODS[method][0]}: pass --branch {OUR_METHODS[method][0]}")
            return named, why
        if isinstance(method, str) and method in OUR_METHODS:
            return OUR_METHODS[method]
        return UNKNOWN_METHOD[0], UNKNOWN_METHOD[1].format(method=_short(str(method), 40))
    entries = {b.entry for b in contents.backbones if b.entry is not None}
    defaults = {entry.default for entry in entries}
    if len(defaults) == 1:
        (entry, *_), (default,) = sorted(entries, key=LAYOUTS.index), defaults
        whys = sorted({e.why for e in entries})
        return default, "; ".join(whys) if len(whys) > 1 else entry.why
    return "teacher", ""


def _without_copies(backbones: list[Backbone]) -> list[Backbone]:
    """``backbones`` less those the layout calls copies of another one among them whose
    tensors they equal (OpenSelfSup saves ``backbone`` and ``encoder_q.0``, one module)."""
    kept = []
    for backbone in backbones:
        originals = [b for b in backbones if backbone.copy_of is not None
                     and b.prefix == backbone.copy_of and _equal(b.tensors, backbone.tensors)]
        if not originals:
            kept.append(backbone)
    return kept


def _equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
        for k in a)


def _several(backbones: list[Backbone]) -> str:
    """'several backbones found (...); choose one with --prefix 'a.' or --prefix 'b.''."""
    listing = ", ".join(b.describe() for b in backbones)
    choices = " or ".join(f"--prefix '{b.found_as}'" for b in backbones)
    return f"several backbones found ({listing}); choose one with {choices}"


def _finish(backbone: Backbone, branch: str, note: str = "", why: str = "") -> Selection:
    """Drop momentum-BN counters: the rest of a momentum BN is an ordinary BN's state."""
    kept: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, tensor in backbone.tensors.items():
        # Only BN owners (bn1, bnK, downsample.1) can carry names other than "weight".
        if key.rpartition(".")[2] in MOMENTUM_BN_EXTRAS:
            dropped += 1
            continue
        kept[key] = tensor
    return Selection(backbone, branch, note, dropped, kept, why)
