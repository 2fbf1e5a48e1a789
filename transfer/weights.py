"""Loading pretrained weights into a detector, and proof that the backbone received them.

Detectron2's ``DetectionCheckpointer`` does the loading (``.pkl`` from ``m2t-convert`` with
its name-matching heuristics, or a Detectron2 ``.pth``); it only *logs* tensors it could not
match or whose shape differs. Here every ResNet tensor the model has (stem, res2-res5,
also res5 inside the C4 ROI head) must be loaded, otherwise the weights are for another
architecture and training would silently start from random init.

Weights files come from the internet, and unpickling runs whatever code a pickle names.
:class:`SafeCheckpointer` therefore reads ``.pkl`` files with :class:`RestrictedUnpickler`
(numpy arrays and plain containers only) and ``.pth`` files with
``torch.load(weights_only=True)``; a file that needs anything else is refused with the type
named, unless ``--unsafe-load`` (``unsafe_load=True``) says the file is trusted, which warns.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from torch import nn

from jobs.atomic import replace_file, write_text

from ._private import HookedCheckpointer, PurePythonUnpickler
from .errors import TransferError, first_line, refused_global, refused_pickle

#: State-dict names of the ResNet parts a converted checkpoint provides.
_RESNET_KEY = re.compile(r"^(?:backbone\.(?:bottom_up\.)?|roi_heads\.)(?:stem\.|res[2-5]\.\d+\.)")


def resnet_keys(model: nn.Module) -> list[str]:
    """The model's ResNet tensors a backbone checkpoint must fill (BN counters excluded)."""
    return [k for k in model.state_dict()
            if _RESNET_KEY.match(k) and not k.endswith("num_batches_tracked")]


#: What a weights pickle may name: numpy arrays, scalars and dtypes, and plain containers.
#: (``_codecs.encode`` carries bytes in protocol-2 pickles, ``copyreg._reconstructor``
#: objects in Python 2 ones; both only call what the pickle may name anyway.)
SAFE_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "bytearray"), ("builtins", "complex"),
})

class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a type or function outside :data:`SAFE_PICKLE_GLOBALS`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class RestrictedUnpickler(PurePythonUnpickler):
    """An unpickler that rebuilds only numpy arrays and plain data (no code runs on load).

    It extends the pure-Python unpickler, whose memo is a dict: the C one sizes its memo
    array by the largest index a pickle names, so one corrupt byte can make it allocate
    gigabytes (as fast on real weights files, whose bulk is a few large byte strings).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_PICKLE_GLOBALS or (module == "numpy.dtypes"
                                                     and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(f"{module}.{name}")


def _refusal(path: str, type_name: str) -> TransferError:
    return TransferError(path, refused_pickle(type_name, "if you trust the file, pass "
                                                         "--unsafe-load"))


_WARNED: set[str] = set()


def _warn_unsafe(path: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        print(f"warning: {path}: loading with full unpickling (--unsafe-load): this runs any "
              f"code the file contains", file=sys.stderr, flush=True)


def read_pickle(path: str, unsafe_load: bool = False) -> Any:
    """The object in the pickle at ``path``, read with :class:`RestrictedUnpickler`.

    With ``unsafe_load`` a file the restricted reader refuses is unpickled fully (warning).
    """
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except UnsafePickleError as err:
            if not unsafe_load:
                raise _refusal(path, err.name) from None
        except Exception as err:  # noqa: BLE001 - a damaged pickle fails in any type it builds
            raise TransferError(path, f"not a weights file Detectron2 can read (a .pkl from "
                                      f"m2t-convert or a Detectron2 .pth): "
                                      f"{first_line(err, 200)}") from None
        _warn_unsafe(path)
        f.seek(0)
        return pickle.load(f, encoding="latin1")


class SafeCheckpointer(HookedCheckpointer):
    """``DetectionCheckpointer`` that never unpickles code from a file unless told to; after a
    ``load``, ``incompatible`` holds its missing, unexpected and mis-shaped keys."""

    def __init__(self, *args: Any, unsafe_load: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unsafe_load = unsafe_load
        _one_line_failures()

    @classmethod
    def replacing(cls, other: DetectionCheckpointer, unsafe_load: bool = False
                  ) -> SafeCheckpointer:
        """A safe checkpointer with the model, folder and checkpointables of ``other``."""
        return cls(other.model, other.save_dir, save_to_disk=other.save_to_disk,
                   unsafe_load=unsafe_load, **other.checkpointables)

    def read_pickle_file(self, filename: str) -> dict[str, Any]:
        data = read_pickle(self.path_manager.get_local_path(filename), self.unsafe_load)
        if not isinstance(data, dict):
            raise TransferError(filename, f"a weights pickle holds a dict, this one a "
                                          f"{type(data).__name__}")
        if "model" in data and "__author__" in data:  # Detectron2 model-zoo format
            return data
        if "blobs" in data:  # Caffe2 / Detectron1 model zoo (as DetectionCheckpointer reads)
            data = data["blobs"]
        if not isinstance(data, dict):
            raise TransferError(filename, "'blobs' of the weights pickle is not a dict")
        data = {k: v for k, v in data.items() if not str(k).endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save`` (model, checkpointables and ``kwargs`` in ``NAME.pth``, then
        ``last_checkpoint``), with both files written through :mod:`jobs.atomic`: a full disk
        or a kill leaves the previous files as they were, never a truncated ``.pth``; a failed
        write is one :class:`TransferError` naming the file."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        recorder: _WriteErrors | None = None

        def write(f: IO[bytes]) -> None:
            nonlocal recorder
            recorder = _WriteErrors(f)
            torch.save(data, recorder)  # type: ignore[arg-type]

        try:
            replace_file(path, write)
        except (OSError, RuntimeError) as err:
            # torch.save reports a failed write as a RuntimeError ("unexpected pos"): name the
            # OSError behind it
            cause = recorder.error if recorder is not None and recorder.error else err
            reason = getattr(cause, "strerror", None) or first_line(cause, 200)
            raise TransferError(path, f"could not save checkpoint ({reason}); the previous "
                                      f"checkpoint is untouched") from None
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """fvcore's, through :mod:`jobs.atomic`."""
        path = os.path.join(self.save_dir, "last_checkpoint")
        try:
            write_text(path, last_filename_basename)
        except OSError as err:
            raise TransferError(path, f"could not write it ({err.strerror or err}); it still "
                                      f"names the previous checkpoint") from None

    def read_torch_file(self, f: str) -> Any:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            refused = refused_global(err)
            if refused is None:
                raise
            if not self.unsafe_load:
                raise _refusal(f, refused) from None
        _warn_unsafe(f)
        return torch.load(f, map_location="cpu", weights_only=False)


class _WriteErrors:
    """A file wrapper that keeps the ``OSError`` a write raised (torch.save hides it)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


class _OneLine(logging.Filter):
    """A record of an exception the command reports in its own ``error:`` line (a failed
    save, a full disk) keeps its message and the error's sentence, not the traceback:
    Detectron2's loop logs every exception of a step with ``logger.exception`` before it
    reaches the command, which printed it on the terminal too."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (TransferError, OSError)):
            record.msg = f"{record.getMessage()} {exc}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _one_line_failures() -> None:
    """Install :class:`_OneLine` on the logger of Detectron2's training loop (once)."""
    log = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, _OneLine) for f in log.filters):
        log.addFilter(_OneLine())


@dataclass
class LoadReport:
    """What loading a weights file into a model did to its ResNet tensors."""

    path: str
    resnet_total: int
    resnet_missing: list[str]
    other_missing: int
    unexpected: list[str]
    other_missing_keys: list[str] = field(default_factory=list)
    #: Backbone tensors of the file the model has no place for (a deeper network's extra
    #: blocks): fvcore only logs them as "not used", and training would go on without them.
    unused_backbone: list[str] = field(default_factory=list)

    @property
    def resnet_loaded(self) -> int:
        return self.resnet_total - len(self.resnet_missing)


def load_weights(model: nn.Module, path: str, unsafe_load: bool = False) -> LoadReport:
    """Load ``path`` into ``model`` with Detectron2's checkpointer; report the ResNet part.

    Raises :class:`TransferError` if the file is missing, not a weights file, or pickles
    something safe loading refuses (without ``unsafe_load``).
    """
    file = Path(path)
    if not file.is_file():
        raise TransferError(path, "weights file not found")
    checkpointer = SafeCheckpointer(model, unsafe_load=unsafe_load)
    try:
        checkpointer.load(str(file))
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError,
            AttributeError, TypeError, AssertionError, IndexError, MemoryError,
            OverflowError, OSError) as err:  # OSError: torch's reader of a cut zip archive
        kind = file_kind(str(file))
        if kind is not None:
            raise TransferError(path, f"{kind}, not Detectron2 weights; convert it first: "
                                      f"m2t-convert {path} weights.pkl") from None
        raise TransferError(path, f"not a weights file Detectron2 can read (a .pkl from "
                                  f"m2t-convert or a Detectron2 .pth): "
                                  f"{first_line(err, 200)}") from None
    incompatible = checkpointer.incompatible
    missing = set(incompatible.missing_keys) if incompatible else set()
    expected = resnet_keys(model)
    return LoadReport(
        path=str(path),
        resnet_total=len(expected),
        resnet_missing=[k for k in expected if k in missing],
        other_missing=len(missing - set(expected)),
        unexpected=list(incompatible.unexpected_keys) if incompatible else [],
        other_missing_keys=sorted(missing - set(expected)),
        unused_backbone=unused_backbone_keys(
            model, list(incompatible.unexpected_keys) if incompatible else []),
    )


#: A ResNet part in a file's key, as the checkpoint names it (``res3.2.conv1.weight``,
#: ``backbone.bottom_up.stem.conv1.weight``): the stage is group 1.
_RESNET_PART = re.compile(r"(?:^|\.)(stem|res\d+)\.")


def unused_backbone_keys(model: nn.Module, unexpected: list[str]) -> list[str]:
    """The ``unexpected`` keys that are ResNet tensors the model should have taken.

    A key of a stage the model builds (or of no stage a Detectron2 ResNet has) means the
    file's network is another one: deeper, or with extra parts such as an SE block. A stage
    the model does not build at all (an RPN-only C4 model has no res5) is Detectron2's own
    convention for using part of a backbone, and is not counted.
    """
    built = {m.group(1) for k in resnet_keys(model) if (m := _RESNET_PART.search(k))}
    unused = []
    for key in unexpected:
        match = _RESNET_PART.search(key)
        if match is None:
            continue
        stage = match.group(1)
        if stage in built or stage not in ("res2", "res3", "res4", "res5"):
            unused.append(key)
    return unused


def require_backbone(report: LoadReport, cfg: CfgNode, config_name: str) -> None:
    """Raise :class:`TransferError` unless every ResNet tensor was loaded, and every ResNet
    tensor of the file was used (a ResNet-34 under a ResNet-18 config fills every tensor of
    the model with the first blocks of each stage, and leaves the rest out)."""
    if not report.resnet_missing and not report.unused_backbone:
        return
    kind = file_kind(report.path)
    if kind is not None:
        raise TransferError(report.path, f"{kind}, not Detectron2 weights; convert it first: "
                                         f"m2t-convert {report.path} weights.pkl")
    arch = _converted_arch(report.path)
    found = f" (it holds a {arch})" if arch else ""
    if not report.resnet_missing:
        unused = report.unused_backbone
        raise TransferError(
            report.path,
            f"weights do not fit the ResNet-{cfg.MODEL.RESNETS.DEPTH} backbone of {config_name}"
            f"{found}: {len(unused)} backbone tensors of the file have no place in its "
            f"{report.resnet_total} (first: {unused[0]}), so training would use only part of "
            f"the pretrained network; convert a checkpoint of the matching architecture with "
            f"m2t-convert or set MODEL.RESNETS.DEPTH")
    raise TransferError(
        report.path,
        f"weights do not fit the ResNet-{cfg.MODEL.RESNETS.DEPTH} backbone of {config_name}"
        f"{found}: {len(report.resnet_missing)} of {report.resnet_total} backbone tensors are "
        f"missing or have another shape (first: {report.resnet_missing[0]}); convert a "
        f"checkpoint of the matching architecture with m2t-convert or set MODEL.RESNETS.DEPTH",
    )


def require_heads(report: LoadReport) -> None:
    """Raise :class:`TransferError` unless the weights fill the whole detector (evaluation:
    heads that were not loaded are random, and their AP means nothing)."""
    if not report.other_missing_keys:
        return
    raise TransferError(
        report.path,
        f"evaluation needs a trained detector, but {len(report.other_missing_keys)} tensors of "
        f"its heads are missing from the weights or have another shape (first: "
        f"{report.other_missing_keys[0]}; e.g. a detector trained for another number of "
        f"classes): they would be random; evaluate the model_final.pth of a fine-tuning run on "
        f"the same categories")


def file_kind(path: str) -> str | None:
    """What a ``.pth`` holds when it is a checkpoint transfer cannot use as it is: an
    ``m2t-pretrain`` checkpoint or a torchvision ResNet state dict; None otherwise."""
    if not path.endswith((".pth", ".pt")):
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - only a hint for the error message
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") == "momentum2-pretrain" or {"student", "teacher"} <= data.keys():
        return "a pretraining checkpoint (m2t-pretrain)"
    if "conv1.weight" in data and any(str(k).startswith("layer1.") for k in data):
        return "a torchvision ResNet state dict"
    return None


def check_weights(cfg: CfgNode, path: str, config_name: str,
                  unsafe_load: bool = False) -> LoadReport:
    """Build the model of ``cfg`` on the CPU and check that ``path`` fills its backbone."""
    probe = cfg.clone()
    probe.defrost()
    probe.MODEL.DEVICE = "cpu"
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the checkpointer's per-key notes come again in training
    try:
        model = build_model(probe)
        report = load_weights(model, path, unsafe_load)
    finally:
        logging.disable(previous)
    require_backbone(report, cfg, config_name)
    return report


def _converted_arch(path: str) -> str | None:
    """The architecture ``m2t-convert`` recorded in a ``.pkl``, if any."""
    if not path.endswith(".pkl"):
        return None
    try:
        return read_pickle(path).get("m2t_convert", {}).get("arch")
    except Exception:  # noqa: BLE001 - only a hint for the error message
        return None
