"""torchvision ↔ Detectron2 ResNet key names: the only module that knows the naming schemes.

A torchvision ResNet (``torchvision.models.resnet50()``) names its tensors

    conv1.weight, bn1.{weight,bias,running_mean,running_var,num_batches_tracked},
    layer{1-4}.{i}.conv{1-3}.weight, layer{1-4}.{i}.bn{1-3}.*,
    layer{1-4}.0.downsample.0.weight (1x1 conv), layer{1-4}.0.downsample.1.* (its BN), fc.*

Detectron2's ``ResNet`` (``modeling/backbone/resnet.py``) names the same tensors after its
modules: ``stem.conv1``, ``res{2-5}.{i}.conv{1-3}`` with the BN inside the conv as ``.norm``,
and ``shortcut`` for the projection. SPEC §3 gives the renaming:

    keys without "layer" get the prefix "stem."; layerN → res{N+1}; bnK → convK.norm;
    downsample.0 → shortcut; downsample.1 → shortcut.norm; num_batches_tracked dropped.

>>> torchvision_to_detectron2("layer1.0.downsample.1.running_var")
'res2.0.shortcut.norm.running_var'
>>> torchvision_to_detectron2("bn1.weight")
'stem.conv1.norm.weight'
>>> detectron2_to_torchvision("res5.2.conv3.norm.bias")
'layer4.2.bn3.bias'
"""

from __future__ import annotations

import re

#: Tensors every BatchNorm2d carries in a state dict, in the order torchvision registers them.
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: A torchvision ResNet backbone key (no ``fc``), anchored at the end of a longer key so that
#: ``encoder_q.layer1.0.conv1.weight`` splits into the prefix ``encoder_q.`` and the key.
#: The BN tensor name is left open (``[a-z_]+``) so that momentum-BN counters are found too.
_TORCHVISION_BODY = (
    r"conv1\.weight"
    r"|bn1\.[a-z_]+"
    r"|layer[1-4]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\.[a-z_]+"
    r"|downsample\.0\.weight|downsample\.1\.[a-z_]+)"
)
_TORCHVISION_KEY = re.compile(r"(?:^|\.)(" + _TORCHVISION_BODY + r")$")

#: The same backbone saved as ``nn.Sequential(*list(resnet.children())[:-1])`` (lightly's
#: examples): the children are numbered, conv1 = 0, bn1 = 1 (2 and 3, ReLU and max-pool, hold
#: no tensors), layer1..layer4 = 4..7.
SEQUENTIAL_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3",
                       "7": "layer4"}
_SEQUENTIAL_BODY = (
    r"0\.weight"
    r"|1\.[a-z_]+"
    r"|[4-7]\.\d+\.(?:conv[1-3]\.weight|bn[1-3]\.[a-z_]+"
    r"|downsample\.0\.weight|downsample\.1\.[a-z_]+)"
)
_SEQUENTIAL_KEY = re.compile(r"(?:^|\.)(" + _SEQUENTIAL_BODY + r")$")

_STAGE = re.compile(r"^layer([1-4])$")
_D2_STAGE = re.compile(r"^res([2-5])$")
_BN = re.compile(r"^bn([1-3])$")


def split_torchvision_key(key: str) -> tuple[str, str] | None:
    """Split ``key`` into (prefix, torchvision ResNet key), or None if it is not one.

    The longest matching tail wins, so the prefix is whatever wraps the backbone.

    >>> split_torchvision_key("module.encoder_k.layer3.5.bn2.running_mean")
    ('module.encoder_k.', 'layer3.5.bn2.running_mean')
    >>> split_torchvision_key("projector.0.weight") is None
    True
    """
    match = _TORCHVISION_KEY.search(key)
    if match is None:
        return None
    return key[: match.start(1)], match.group(1)


def split_sequential_key(key: str) -> tuple[str, str, str] | None:
    """Split a key of a ResNet saved as numbered children into (prefix, tail, torchvision key).

    ``tail`` is the key's end as written, the torchvision key what it names. Whether a prefix
    really holds such a backbone is for the caller to judge from all its keys: ``1.weight``
    alone could be any second module's weight.

    >>> split_sequential_key("backbone.4.0.downsample.1.running_var")
    ('backbone.', '4.0.downsample.1.running_var', 'layer1.0.downsample.1.running_var')
    >>> split_sequential_key("backbone_momentum.1.bias")
    ('backbone_momentum.', '1.bias', 'bn1.bias')
    """
    match = _SEQUENTIAL_KEY.search(key)
    if match is None:
        return None
    tail = match.group(1)
    child, _, rest = tail.partition(".")
    return key[: match.start(1)], tail, f"{SEQUENTIAL_CHILDREN[child]}.{rest}"


def torchvision_to_detectron2(key: str) -> str | None:
    """The Detectron2 name of a torchvision ResNet backbone key; None for dropped tensors.

    Dropped: ``num_batches_tracked`` (Detectron2 pickles carry no BN counters; its
    ``BatchNorm2d`` fills one in at load time).
    """
    if key.endswith(".num_batches_tracked"):
        return None
    parts = key.split(".")
    stage = _STAGE.match(parts[0])
    if stage is None:
        parts.insert(0, "stem")
    else:
        parts[0] = f"res{int(stage.group(1)) + 1}"
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        bn = _BN.match(part)
        if bn is not None:
            out += [f"conv{bn.group(1)}", "norm"]
        elif part == "downsample" and i + 1 < len(parts) and parts[i + 1] in ("0", "1"):
            out += ["shortcut"] if parts[i + 1] == "0" else ["shortcut", "norm"]
            i += 1
        else:
            out.append(part)
        i += 1
    return ".".join(out)


def detectron2_to_torchvision(key: str) -> str:
    """The torchvision name of a Detectron2 ResNet key: the inverse of the renaming above.

    Used when verifying a ``.pkl`` on its own, to rebuild the torchvision reference model.
    """
    parts = key.split(".")
    if parts[0] == "stem":
        parts = parts[1:]
    else:
        stage = _D2_STAGE.match(parts[0])
        if stage is None:
            raise ValueError(f"not a Detectron2 ResNet key: {key!r}")
        parts[0] = f"layer{int(stage.group(1)) - 1}"
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        norm_follows = i + 1 < len(parts) and parts[i + 1] == "norm"
        if part.startswith("conv") and norm_follows:
            out.append("bn" + part[len("conv"):])
            i += 1
        elif part == "shortcut":
            out += ["downsample", "1" if norm_follows else "0"]
            i += 1 if norm_follows else 0
        else:
            out.append(part)
        i += 1
    return ".".join(out)


#: Input normalisation of torchvision ImageNet models, in Detectron2's 0–255 pixel units.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def detectron2_resnet_settings(depth: int) -> dict[str, object]:
    """``MODEL.RESNETS`` values a Detectron2 model needs to host these weights.

    torchvision ResNets put the stride on the 3x3 conv (v1.5) → ``STRIDE_IN_1X1 False``;
    basic-block ResNets (18/34) have 64 output channels in res2.
    """
    return {"DEPTH": depth, "STRIDE_IN_1X1": False, "RES2_OUT_CHANNELS": 64 if depth < 50 else 256}


def detectron2_config_yaml(depth: int, weights: str | None = None) -> str:
    """The Detectron2 config block the converted weights require, as a YAML snippet.

    Merge it into a Detectron2 config (``cfg.merge_from_file``) or copy it by hand.
    """
    resnets = detectron2_resnet_settings(depth)
    lines = ["MODEL:"]
    if weights is not None:
        lines.append(f"  WEIGHTS: {weights}")
    lines += [
        f"  PIXEL_MEAN: [{', '.join(str(v) for v in PIXEL_MEAN)}]",
        f"  PIXEL_STD: [{', '.join(str(v) for v in PIXEL_STD)}]",
        "  RESNETS:",
        f"    DEPTH: {resnets['DEPTH']}",
        f"    STRIDE_IN_1X1: {resnets['STRIDE_IN_1X1']}",
        f"    RES2_OUT_CHANNELS: {resnets['RES2_OUT_CHANNELS']}",
        "INPUT:",
        "  FORMAT: RGB",
    ]
    return "\n".join(lines) + "\n"
