"""``convert_checkpoint``: read a checkpoint, pick the backbone, write Detectron2 or torchvision.

The steps, each in its own module: ``io`` reads the file safely; ``layouts`` finds the
backbones and chooses the branch; ``archs`` names the architecture and checks every tensor
against torchvision's; ``naming`` renames for Detectron2; ``verify`` (optional) proves the
result with Detectron2 itself. The returned summary is plain data; ``summary_lines`` words it.

A CIFAR-stem or narrow/wide ResNet (``archs.Variant``, read from ``conv1.weight`` and checked
against our checkpoint's ``config.model``) converts to a torchvision ``.pth`` only: Detectron2's
ResNet cannot host it, so a ``.pkl`` is refused before anything is written.
"""

from __future__ import annotations

import pickle
import re
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torchvision

from . import archs, layouts
from .choices import FORMATS
from .errors import ConversionError, PathArg
from .io import check_writable, read_checkpoint, write_all_atomic
from .naming import detectron2_config_yaml, torchvision_to_detectron2

_EXTENSIONS = {".pkl": "d2", ".pth": "torchvision", ".pt": "torchvision"}
AUTHOR = "m2t-convert (momentum2)"


class VerificationError(ConversionError):
    """``--verify`` found a problem; ``report`` says which. Nothing was written."""

    def __init__(self, path: PathArg, report: Any) -> None:
        super().__init__(path, "verification failed; no output written")
        self.report = report


def output_format(output: Path, fmt: str | None) -> str:
    """'d2' or 'torchvision', from ``fmt`` or the extension; the two must agree on .pkl."""
    by_extension = _EXTENSIONS.get(output.suffix.lower())
    if fmt is not None and fmt not in FORMATS:
        raise ConversionError(output, f"unknown format {fmt!r}; choose d2 or torchvision")
    if fmt == "d2" and by_extension != "d2":
        raise ConversionError(output, "Detectron2 reads converted weights only from files "
                                      "ending in .pkl; name the output *.pkl")
    if fmt == "torchvision" and by_extension == "d2":
        raise ConversionError(output, "a torchvision state dict named *.pkl would be read as "
                                      "a Detectron2 pickle; name it *.pth")
    chosen = fmt or by_extension
    if chosen is None:
        raise ConversionError(output, f"cannot tell the output format from the extension "
                                      f"'{output.suffix}'; use .pkl (Detectron2) or .pth "
                                      f"(torchvision), or pass --format")
    return chosen


def sidecar_path(output: Path) -> Path:
    """Where the Detectron2 config snippet goes: ``out.pkl`` → ``out.yaml``."""
    return output.with_suffix(".yaml")


def _input_kind(contents: layouts.Contents, selection: layouts.Selection) -> str:
    meta = contents.meta
    if contents.ours:
        kind = (f"m2t-pretrain checkpoint (method {meta.get('method')}, "
                f"step {meta.get('step')}, epoch {meta.get('epoch')})")
    else:
        kind = selection.backbone.layout
        if selection.backbone.layout == "unrecognised layout":
            kind = f"backbone under the unrecognised prefix '{selection.backbone.prefix}'"
    wrapped = [f"'{w}'" for w in contents.wrappers if w != "module"]
    if wrapped:
        kind += f", inside {' / '.join(wrapped)}"
    if "module" in contents.wrappers:
        kind += ", 'module.' stripped"
    return kind


def _backbone_state(tensors: Mapping[str, torch.Tensor], arch: str,
                    variant: archs.Variant = archs.STANDARD) -> dict[str, torch.Tensor]:
    """torchvision-ordered float32 backbone state; absent BN counters are written as 0."""
    state: dict[str, torch.Tensor] = {}
    for key in archs.expected_shapes(arch, *variant):
        tensor = tensors.get(key)
        if tensor is None:  # only num_batches_tracked can be absent (archs.check)
            tensor = torch.tensor(0, dtype=torch.long)
        elif tensor.is_floating_point():
            tensor = tensor.detach().to(torch.float32)
        state[key] = tensor.detach().cpu().contiguous()
    return state


def torchvision_load_report(state: Mapping[str, torch.Tensor], arch: str,
                            device: str = "meta", stem: str = "imagenet",
                            width: int = archs.STANDARD_WIDTH) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys when ``torchvision.models.<arch>()`` loads ``state``.

    ``stem``/``width``: load into that variant of the model (``archs.variant_model``).
    """
    variant = archs.Variant(stem, width)
    if device == "meta":
        model = archs.meta_model(arch, *variant)
    elif variant.standard:
        model = getattr(torchvision.models, arch)()
    else:
        model = archs.variant_model(arch, stem, width, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # copying into meta tensors is a no-op: that's the idea
        result = model.load_state_dict(dict(state), strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def detectron2_payload(state: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The Detectron2 model-zoo pickle: renamed numpy arrays, no BN counters (SPEC §3)."""
    model: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        name = torchvision_to_detectron2(key)
        if name is not None:
            model[name] = tensor.numpy()
    return {"model": model, "__author__": AUTHOR, "matching_heuristics": True,
            "m2t_convert": meta}


@dataclass
class FoundBackbone:
    """A checkpoint's chosen backbone as a torchvision state dict, and how it was found."""

    contents: layouts.Contents
    selection: layouts.Selection
    arch: str
    state: dict[str, torch.Tensor]   # torchvision keys and order, float32, no fc
    variant: archs.Variant = archs.STANDARD   # stem and width, read from conv1.weight

    @property
    def name(self) -> str:
        """'resnet18, CIFAR stem, width 16' (just 'resnet18' for torchvision's network)."""
        return archs.name(self.arch, *self.variant)


def read_backbone(source: str, branch: str | None = None, arch: str | None = None,
                  prefix: str | None = None, unsafe_load: bool = False) -> FoundBackbone:
    """Load ``source``, choose the backbone, name its architecture and check every tensor.

    A CIFAR-stem or narrow/wide variant (``archs.variant_of``) is checked against that
    variant's shapes and, in our checkpoints, against ``config.model.stem``/``width``.
    Raises ``ConversionError`` saying what was expected and what was found.
    """
    loaded, file_kind = read_checkpoint(source, unsafe=unsafe_load)
    try:
        contents = layouts.scan(loaded)
    except ValueError as e:
        raise ConversionError(source, str(e)) from None
    if not contents.backbones:
        detectron2 = layouts.detectron2_kind(contents.keys)
        if detectron2 is not None:
            raise ConversionError(source, detectron2)
        other = layouts.other_architecture(contents.keys)
        if other is not None:
            raise ConversionError(source, f"is not a ResNet: its tensors look like {other}; "
                                          f"only torchvision-style ResNets "
                                          f"({', '.join(archs.RESNETS)}) can be converted")
        message = layouts.no_resnet_message(contents)  # "holds ..."
        if file_kind == "safetensors":
            message = f"is a safetensors file that {message}"
        raise ConversionError(source, message)
    try:
        selection = layouts.select(contents, branch, prefix)
    except ValueError as e:
        raise ConversionError(source, str(e)) from None
    tensors = selection.tensors
    left = left_behind(contents, selection)
    if left:
        raise ConversionError(source, f"backbone {selection.backbone.describe()} holds "
                                      f"{len(left)} tensor(s) that a torchvision ResNet has no "
                                      f"place for ({', '.join(left[:3])}"
                                      f"{', ...' if len(left) > 3 else ''}): it is another "
                                      f"network (an SE block, an extra stage, a biased conv), "
                                      f"and converting would silently leave them behind; "
                                      f"nothing was written")
    try:
        detected = archs.detect(list(tensors))
    except ValueError as e:
        raise ConversionError(source, f"backbone {selection.backbone.describe()} is {e}") from None
    found = archs.describe(*archs.RESNETS[detected])
    if arch is not None and arch != detected:
        raise ConversionError(source, f"holds a {detected} ({found}), not the requested "
                                      f"--arch {arch}")
    declared = contents.meta.get("arch")
    if contents.ours and declared and declared != detected:
        raise ConversionError(source, f"says arch {declared} but its tensors are a {detected} "
                                      f"({found})")
    variant = archs.variant_of(tensors)
    problems = archs.check(tensors, detected, *variant)
    if problems:
        what = detected if variant.standard else f"{detected} ({variant.describe()})"
        raise ConversionError(source, f"backbone {selection.backbone.describe()} is not a "
                                      f"torchvision {what}: {'; '.join(problems)}")
    if contents.ours:
        _check_declared_variant(source, contents.meta, detected, variant,
                                tuple(tensors["conv1.weight"].shape))
    state = _backbone_state(tensors, detected, variant)
    bad = archs.non_finite(state)  # as written: float32 (a float64 1e300 is inf there)
    if bad is not None:
        raise ConversionError(source, f"backbone {selection.backbone.describe()} has non-finite "
                                      f"weights: {bad} (as float32); nothing was written: "
                                      f"convert a checkpoint from before the training diverged")
    return FoundBackbone(contents, selection, detected, state, variant)


#: What follows a backbone's prefix in a key of that backbone: torchvision's stem and stages
#: (``conv1.``, ``bn1.``, ``layerN.``), or the numbered children of one saved as an
#: ``nn.Sequential`` (0-7). ``fc.`` (the classifier) and any other name are not backbone.
_BACKBONE_PART = re.compile(r"(?:conv1|bn1|layer\d+|[0-7])\.")


def left_behind(contents: layouts.Contents, selection: layouts.Selection) -> list[str]:
    """Keys of the file under the chosen backbone's prefix that name a part of the backbone
    (``layer1.0.se.fc1.weight``, ``layer5.0.conv1.weight``, ``conv1.bias``) but are not
    among the tensors exported: the network is not the torchvision ResNet the output will
    be read as. Heads (``fc.``) and what other prefixes hold (projectors) are not counted."""
    backbone = selection.backbone
    exported = set(backbone.sources.values())
    prefix = backbone.found_as
    return [key for key in contents.keys
            if key.startswith(prefix) and key not in exported
            and _BACKBONE_PART.match(key[len(prefix):])
            and not any(other.found_as != prefix and other.found_as.startswith(prefix)
                        and key.startswith(other.found_as) for other in contents.backbones)]


def _shown(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_declared_variant(source: str, meta: Mapping[str, Any], arch: str,
                            variant: archs.Variant, conv1: tuple[int, ...]) -> None:
    """Refuse our checkpoint when its ``config.model.stem``/``width`` (where it records
    them) disagree with the variant its tensors are."""
    said = []
    stem, width = meta.get("stem", variant.stem), meta.get("width", variant.width)
    if not isinstance(stem, str) or stem != variant.stem:
        said.append(f"model.stem {_shown(stem)}")
    if not isinstance(width, int) or isinstance(width, bool) or width != variant.width:
        said.append(f"model.width {_shown(width)}")
    if said:
        raise ConversionError(source, f"its config says {' and '.join(said)} but its tensors "
                                      f"are a {archs.name(arch, *variant)} (conv1.weight "
                                      f"{conv1}); the checkpoint was altered or mixed up")


def convert_checkpoint(input: PathArg, output: PathArg, branch: str | None = None,
                       fmt: str | None = None, arch: str | None = None, force: bool = False,
                       verify: bool = False, prefix: str | None = None,
                       unsafe_load: bool = False) -> dict[str, Any]:
    """Convert the ResNet backbone in ``input`` to Detectron2 (.pkl) or torchvision (.pth).

    ``branch``: "teacher" or "student"; None takes the default (SPEC §3): our checkpoint's
    ``train.export_branch`` or its method's choice, else what the layout's source transfers
    (``layouts.default_branch``). ``fmt``: "d2" or "torchvision"; None goes by the extension. ``arch``: the
    expected architecture, checked against the one detected from the tensors. ``verify``:
    prove the result with Detectron2 (``verify_detectron2``) before it takes its name.
    ``prefix``: pick the backbone under this key prefix when the layout is not recognised.

    Raises ``ConversionError`` (``VerificationError`` for a failed proof) with a sentence a
    user can act on; on any error no output file is left behind. Returns the summary (plain
    data; ``summary_lines`` renders it).
    """
    started = time.perf_counter()
    source, out = str(input), Path(output)
    if branch not in (None, "teacher", "student"):
        raise ConversionError(source, f"unknown branch {branch!r}; choose teacher or student")
    if arch is not None and arch not in archs.RESNETS:
        raise ConversionError(source, f"unknown --arch {arch!r}; choose one of "
                                      f"{', '.join(archs.RESNETS)}")
    chosen_format = output_format(out, fmt)
    sidecar = sidecar_path(out) if chosen_format == "d2" else None
    check_writable(out, force, source)
    if sidecar is not None:
        check_writable(sidecar, force, source)

    found = read_backbone(source, branch=branch, arch=arch, prefix=prefix,
                          unsafe_load=unsafe_load)
    contents, selection, detected = found.contents, found.selection, found.arch
    state, variant = found.state, found.variant
    if chosen_format == "d2" and not variant.standard:
        raise ConversionError(source, f"backbone {selection.backbone.describe()} "
                                      f"{archs.detectron2_refusal(detected, *variant)}")
    missing, unexpected = torchvision_load_report(state, detected, "meta", *variant)
    meta = {"source": source, "branch": selection.branch, "arch": detected,
            "prefix": selection.backbone.found_as}
    report = None
    if chosen_format == "d2":
        payload = detectron2_payload(state, meta)
        written = len(payload["model"])

        def write(f: IO[bytes]) -> None:
            pickle.dump(payload, f, protocol=4)
    else:
        written = len(state)

        def write(f: IO[bytes]) -> None:
            torch.save(state, f)

    def prove(tmp: Path) -> None:
        nonlocal report
        from .verify import verify_detectron2, verify_torchvision

        if chosen_format == "d2":
            report = verify_detectron2(tmp, detected, reference=state)
        elif not variant.standard:  # Detectron2 cannot host it: torchvision's check only
            report = verify_torchvision(tmp, detected, state, *variant)
        else:
            tv_missing, tv_unexpected = torchvision_load_report(
                torch.load(tmp, weights_only=True), detected, device="cpu")
            with tempfile.TemporaryDirectory() as scratch:
                pkl = Path(scratch) / "check.pkl"
                with open(pkl, "wb") as f:
                    pickle.dump(detectron2_payload(state, meta), f, protocol=4)
                report = verify_detectron2(pkl, detected, reference=state)
            if sorted(tv_missing) != ["fc.bias", "fc.weight"] or tv_unexpected:
                report.not_loaded.append(f"torchvision: missing {tv_missing}, "
                                         f"unexpected {tv_unexpected}")
        if not report.ok:
            raise VerificationError(out, report)

    # The sidecar names the output's final path (a link given as output is replaced, not
    # followed): resolve the folder, not the file. A variant has no Detectron2 config.
    config = (detectron2_config_yaml(archs.depth(detected),
                                     weights=str(out.parent.resolve() / out.name))
              if variant.standard else None)
    files = [(out, write)]
    if sidecar is not None:
        header = f"# Detectron2 settings required by {out.name} (written by m2t-convert)\n"
        text = (header + config).encode()
        files.append((sidecar, lambda f: f.write(text)))
    write_all_atomic(files, check=prove if verify else None)
    return {
        "input": source,
        "output": str(out),
        "format": chosen_format,
        "input_kind": _input_kind(contents, selection),
        "prefix": selection.backbone.found_as,
        "branch": selection.branch,
        "branch_why": selection.why,
        "note": selection.note,
        "arch": detected,
        "stem": variant.stem,
        "width": variant.width,
        "variant": found.name,
        "structure": archs.describe(*archs.RESNETS[detected]),
        "tensors_written": written,
        "tensors_in_file": contents.tensor_count,
        "not_exported": layouts.not_exported(contents, selection),
        "momentum_bn_counters_dropped": selection.dropped_counters,
        "torchvision_missing": missing,
        "torchvision_unexpected": unexpected,
        "detectron2_config": config,
        "config_yaml": str(sidecar) if sidecar is not None else None,
        "verify": report.to_dict() if report is not None else None,
        "verify_lines": report.lines() if report is not None else [],
        "seconds": time.perf_counter() - started,
    }


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The short human summary the command prints."""
    branch = summary["branch"]
    lines = [
        f"input:    {summary['input']}",
        f"detected: {summary['input_kind']}",
        f"branch:   {branch} "
        + (f"({summary['branch_why']}) " if summary.get("branch_why") else "")
        + f"(prefix '{summary['prefix']}')",
    ]
    if summary["note"]:
        lines.append(f"          {summary['note']}")
    lines.append(f"arch:     {summary.get('variant', summary['arch'])} ({summary['structure']})")
    what = "Detectron2 pickle" if summary["format"] == "d2" else "torchvision state dict"
    lines.append(f"wrote:    {summary['output']}: {what}, {summary['tensors_written']} tensors")
    dropped = [f"{group} ({count})" for group, count in summary["not_exported"].items()]
    if summary["momentum_bn_counters_dropped"]:
        dropped.append(f"momentum-BN step/total_steps ({summary['momentum_bn_counters_dropped']})")
    if summary["format"] == "d2":
        dropped.append("num_batches_tracked (Detectron2 pickles carry none)")
    if dropped:
        shown = ", ".join(dropped[:8]) + (", ..." if len(dropped) > 8 else "")
        lines.append(f"dropped:  {shown}")
    variant = archs.Variant(summary.get("stem", "imagenet"),
                            summary.get("width", archs.STANDARD_WIDTH))
    if summary["format"] == "torchvision":
        missing = ", ".join(summary["torchvision_missing"]) or "nothing"
        model = f"torchvision.models.{summary['arch']}()"
        if not variant.standard:
            model += (f" rebuilt with {variant.describe()} ({archs.stem_text(*variant)}; "
                      f"torchvision's module names)")
        lines.append(f"{model} loads it; missing: {missing}"
                     + (f"; unexpected: {summary['torchvision_unexpected']}"
                        if summary["torchvision_unexpected"] else ""))
    if summary["detectron2_config"] is None:
        lines.append(f"Detectron2: cannot host a {summary.get('variant', summary['arch'])} "
                     f"(its ResNet stem is a 7×7 stride-2 conv with max-pool, 64 channels); "
                     f"use these weights as a torchvision backbone")
    elif summary["config_yaml"]:
        lines.append(f"Detectron2 config the weights require (also in {summary['config_yaml']}):")
    else:
        lines.append("Detectron2 config these weights require once converted to a .pkl:")
    if summary["detectron2_config"] is not None:
        lines += ["  " + line for line in summary["detectron2_config"].splitlines()]
    lines += [f"verify:   {line}" for line in summary["verify_lines"]]
    return lines

