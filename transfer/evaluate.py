"""Score a COCO-format results file against a COCO or LVIS ground truth.

The results file is the standard list ``[{"image_id", "category_id", "score", "bbox":
[x, y, w, h], "segmentation": RLE or polygons}, ...]`` with the dataset's own category ids,
as Detectron2 writes it (``coco_instances_results.json``, ``lvis_instances_results.json``)
and as most detection codebases do. The scoring is the one Detectron2's ``COCOEvaluator``
(official pycocotools ``COCOeval``, not the C++ one) and ``LVISEvaluator`` (the ``lvis``
package, federated, 300 detections per image) run after training, so numbers agree with
``m2t-transfer train``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pycocotools.mask as mask_util
from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
from detectron2.evaluation.lvis_evaluation import _evaluate_predictions_on_lvis
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from . import compat  # noqa: F401  (np.float for the lvis package)
from .datasets import (
    DatasetSpec,
    is_box,
    is_id,
    is_number,
    is_segmentation,
    read_annotation_json,
    resolve_dataset,
)
from .errors import TransferError
from .report import COCO_METRICS, clean_metrics, write_run_results

logger = logging.getLogger(__name__)


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """A results file as a list of detections; :class:`TransferError` if it is not one."""
    if not path.is_file():
        raise TransferError(path, "predictions file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransferError(path, f"not valid JSON ({err})") from None
    except RecursionError:
        raise TransferError(path, "not valid JSON (nested too deeply)") from None
    if not isinstance(data, list):
        raise TransferError(path, "not a COCO-format results file: expected a JSON list of "
                                  "detections {image_id, category_id, score, bbox/segmentation}")
    return data


def check_predictions(source: str, detections: Sequence[dict[str, Any]],
                      gt: dict[str, Any]) -> None:
    """Raise unless every detection is well formed and refers to the ground truth's ids."""
    if not detections:
        raise TransferError(source, "no detections to score")
    img_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, det in enumerate(detections):
        if not isinstance(det, dict) or any(k not in det for k in ("image_id", "category_id",
                                                                      "score")):
            raise TransferError(source, f"detection {i} lacks image_id, category_id or score")
        if "bbox" not in det and "segmentation" not in det:
            raise TransferError(source, f"detection {i} has neither bbox nor segmentation")
        if not (is_id(det["image_id"]) and is_id(det["category_id"])
                and is_number(det["score"])):
            raise TransferError(source, f"detection {i} needs integer image_id and category_id "
                                        f"and a numeric score")
        if "bbox" in det and not is_box(det["bbox"]):
            raise TransferError(source, f"detection {i} has a bbox that is not [x, y, w, h]")
        if "segmentation" in det and not is_segmentation(det["segmentation"]):
            raise TransferError(source, f"detection {i} has a segmentation that is neither "
                                        f"polygons nor RLE")
    bad_img = [d["image_id"] for d in detections if d["image_id"] not in img_ids]
    if bad_img:
        raise TransferError(source, f"{len(bad_img)} detections name images that are not in the "
                                    f"ground truth (first: image_id {bad_img[0]})")
    bad_cat = [d["category_id"] for d in detections if d["category_id"] not in cat_ids]
    if bad_cat:
        raise TransferError(source, f"{len(bad_cat)} detections have category ids that are not "
                                    f"in the ground truth (first: {bad_cat[0]}); results must "
                                    f"use the dataset's own category ids")


def _to_rle(detections: list[dict[str, Any]], gt: dict[str, Any]) -> None:
    """Polygon segmentations -> RLE in place (pycocotools scores results as RLE)."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    for det in detections:
        seg = det.get("segmentation")
        if isinstance(seg, list):
            h, w = sizes[det["image_id"]]
            rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
            rle["counts"] = rle["counts"].decode("ascii")
            det["segmentation"] = rle


def evaluate_predictions(
    dataset: str | DatasetSpec,
    predictions: str | Path | Sequence[dict[str, Any]],
    *,
    dataset_root: str | None = None,
    output_dir: str | Path | None = None,
) -> dict[str, dict[str, float | None]]:
    """AP metrics of ``predictions`` on ``dataset``: ``{"bbox": {...}, "segm": {...}}``.

    Args:
        dataset: a builtin name (``coco_2017_val``, ``lvis_v1_val``), the path of a
            COCO/LVIS-format annotation JSON, or a resolved :class:`DatasetSpec`.
        predictions: a results-file path or the list of detections itself.
        dataset_root: where builtin datasets live (default ``$DETECTRON2_DATASETS``).
        output_dir: if given, ``results.json`` and ``report.md`` are written there.

    Returns:
        per task (``bbox`` always when boxes are present, ``segm`` when masks are), AP, AP50,
        AP75, APs, APm, APl in percent, plus APr, APc, APf for LVIS; ``None`` where the
        ground truth has nothing to measure.
    """
    if output_dir is not None and isinstance(predictions, (str, Path)):
        target = Path(output_dir) / "results.json"
        if target.resolve() == Path(predictions).resolve():
            raise TransferError(predictions, "--output-dir would overwrite the predictions file "
                                             "with the metrics; choose another folder")
    spec = dataset if isinstance(dataset, DatasetSpec) else resolve_dataset(
        dataset, root=dataset_root, check_images=False)
    if isinstance(predictions, (str, Path)):
        source = str(predictions)
        detections = read_predictions(Path(predictions))
    else:
        source, detections = "<predictions>", copy.deepcopy(list(predictions))
    gt = read_annotation_json(Path(spec.json_file))
    check_predictions(source, detections, gt)
    _to_rle(detections, gt)

    tasks = [t for t, key in (("bbox", "bbox"), ("segm", "segmentation"))
             if any(key in d for d in detections)]
    metrics: dict[str, dict[str, float | None]] = {}
    if spec.kind == "lvis":
        from lvis import LVIS

        with contextlib.redirect_stdout(io.StringIO()):
            lvis_gt = LVIS(spec.json_file)
        for task in tasks:
            dets = [d for d in detections if task == "bbox" or "segmentation" in d]
            raw = _evaluate_predictions_on_lvis(lvis_gt, dets, task, max_dets_per_image=300)
            metrics[task] = clean_metrics(raw)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(spec.json_file)
        for task in tasks:
            dets = [d for d in detections if task == "bbox" or "segmentation" in d]
            coco_eval = _evaluate_predictions_on_coco(coco_gt, dets, task, cocoeval_fn=COCOeval)
            raw = {name: float(coco_eval.stats[i] * 100) for i, name in enumerate(COCO_METRICS)}
            metrics[task] = clean_metrics(raw)
    if output_dir is not None:
        write_run_results(output_dir, metrics, {
            "method": Path(source).stem, "test_dataset": spec.name, "predictions": source,
            "num_detections": len(detections)})
    return metrics
