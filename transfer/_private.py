"""Private names of third-party libraries that the transfer stage relies on, each with its reason.

Underscore names (and patches of a library's module) change without notice; gathering them
here (issue 17) makes a library upgrade a check of this one file. Add to it only what has no
public way; every other module of ``transfer/`` uses the names defined here.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Iterator
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer

#: The pure-Python unpickler (``pickle._Unpickler``). ``pickle.Unpickler`` is the C one, which
#: sizes its memo array by the largest index a pickle names, so one corrupt byte makes it
#: allocate gigabytes; the pure-Python one keeps its memo in a dict. Restricting what it may
#: rebuild (``find_class``) works the same on both.
PurePythonUnpickler = pickle._Unpickler


def builtin_splits() -> dict[str, tuple[str, str]]:
    """Detectron2's builtin COCO and LVIS datasets: name -> (image root, annotation JSON),
    relative to the dataset root.

    The table is ``_PREDEFINED_SPLITS_COCO["coco"]`` and ``_PREDEFINED_SPLITS_LVIS``: the
    public catalogs hold these paths only already joined to ``$DETECTRON2_DATASETS`` as it
    was when Detectron2 was imported, while ``--dataset-root`` may name another folder.
    """
    from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO, _PREDEFINED_SPLITS_LVIS

    return {**_PREDEFINED_SPLITS_COCO["coco"],
            **{k: v for splits in _PREDEFINED_SPLITS_LVIS.values() for k, v in splits.items()}}


def coco_metadata() -> dict[str, Any]:
    """The metadata of Detectron2's builtin COCO instance datasets (class names and colours,
    dataset id -> contiguous id), without image root or JSON path.

    ``_get_builtin_metadata("coco")`` is what Detectron2 registers its COCO splits with; the
    public ``MetadataCatalog`` entries also carry the paths it resolved at import, which a
    builtin dataset under ``--dataset-root`` replaces.
    """
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    return _get_builtin_metadata("coco")


class HookedCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose file reading is :meth:`read_pickle_file` and
    :meth:`read_torch_file`, and which keeps the result of its last load in ``incompatible``.

    fvcore and Detectron2 read a ``.pkl`` with ``pickle.load`` and a ``.pth`` with
    ``torch.load(weights_only=False)`` (both run code a file names) in the private
    ``_load_file`` and ``_torch_load``, and hand the missing, unexpected and mis-shaped keys of
    a load (fvcore's ``_IncompatibleKeys``) only to the private ``_log_incompatible_keys``.
    Neither has a public way to change it, so the overrides below route both to public
    methods. ``load`` and ``resume_or_load`` stay Detectron2's.
    """

    #: fvcore's ``_IncompatibleKeys`` of the last ``load`` (None before one).
    incompatible: Any = None

    def read_pickle_file(self, filename: str) -> dict[str, Any]:
        """The checkpoint dict of a ``.pkl`` file (as Detectron2's ``_load_file`` returns it)."""
        raise NotImplementedError

    def read_torch_file(self, filename: str) -> Any:
        """The object a ``.pth`` file holds (as fvcore's ``_load_file`` returns it)."""
        raise NotImplementedError

    def _load_file(self, filename: str) -> dict[str, Any]:
        if filename.endswith(".pkl"):
            return self.read_pickle_file(filename)
        return super()._load_file(filename)

    def _torch_load(self, f: str) -> Any:
        return self.read_torch_file(f)

    def _load_model(self, checkpoint: Any) -> Any:
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


@contextlib.contextmanager
def cpu_ddp() -> Iterator[None]:
    """Within the block, Detectron2's ``create_ddp_model`` passes ``device_ids=None``.

    ``DefaultTrainer.__init__`` wraps the model with ``create_ddp_model``, which gives
    ``DistributedDataParallel`` ``device_ids=[local rank]``; PyTorch refuses that for a CPU
    module, and the trainer has no option to change it, so the name the trainer looks up in
    ``detectron2.engine.defaults`` is replaced for the time of its construction.
    """
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def empty_lvis_results(lvis_gt: Any) -> Any:
    """An ``lvis.LVISResults`` holding no detections, for ``LVISEval`` to score.

    ``LVISResults(gt, [])`` fails: it reads ``results[0]`` to tell box from mask results.
    Zero detections are still a valid input to the evaluation (a model may detect nothing),
    so build the object from one placeholder detection, remove it, and rebuild the indices
    with ``LVIS._create_index`` (private: the lvis package has no public way to re-index).
    """
    from lvis import LVISResults

    placeholder = {"image_id": lvis_gt.get_img_ids()[0], "category_id": lvis_gt.get_cat_ids()[0],
                   "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.0}
    results = LVISResults(lvis_gt, [placeholder], max_dets=-1)
    results.dataset["annotations"] = []
    results._create_index()
    return results


def reindex_lvis(lvis_gt: Any) -> None:
    """Rebuild an ``lvis.LVIS``'s indices after its ``dataset`` was changed in place
    (``LVIS._create_index``: the package has no public way; pycocotools' is ``createIndex``)."""
    lvis_gt._create_index()


def scale_wide_grayscale_images() -> None:
    """Detectron2 reads 16-bit grayscale images as pretraining does: scaled to 8 bits.

    ``detection_utils.read_image`` (every ``DatasetMapper``, for training and testing) ends in
    ``convert_PIL_to_numpy``, whose ``image.convert("RGB")`` clips a 16-bit grayscale PNG at
    255 (almost every pixel white); it has no option for another conversion, so the name
    ``read_image`` looks up in its module is replaced by one that first applies
    :func:`jobs.images.to_8bit` (once; the worker processes of a loader inherit it).
    """
    from detectron2.data import detection_utils

    from jobs.images import to_8bit

    original = detection_utils.convert_PIL_to_numpy
    if getattr(original, "scales_wide_grayscale", False):
        return

    def convert_PIL_to_numpy(image: Any, format: Any) -> Any:  # noqa: N802, A002 - its name
        return original(to_8bit(image), format)

    convert_PIL_to_numpy.scales_wide_grayscale = True  # type: ignore[attr-defined]
    detection_utils.convert_PIL_to_numpy = convert_PIL_to_numpy
