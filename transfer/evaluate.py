"""Score detections against a COCO or LVIS ground truth: a results file, or a model's outputs.

- :func:`evaluate_predictions` (``m2t-transfer evaluate``) scores a results file: the
  standard list ``[{"image_id", "category_id", "score", "bbox": [x, y, w, h],
  "segmentation": RLE or polygons}, ...]`` with the dataset's own category ids, as Detectron2
  writes it (``coco_instances_results.json``, ``lvis_instances_results.json``) and as most
  detection codebases do.
- :class:`transfer.evaluator.DetectionEvaluator` is the evaluator the trainer builds
  (``m2t-transfer train`` and ``eval``): Detectron2's ``COCOEvaluator`` / ``LVISEvaluator`` in what it collects, writes
  and returns, scoring through the same :class:`~transfer.scoring.Scorer`, so that a run's
  numbers and a rescoring of its results file agree.

Both score with the ``fast`` evaluator (faster-coco-eval, C++) unless asked for the
``official`` one (pycocotools / lvis); :mod:`transfer.scoring` has the conventions and why
the two agree.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pycocotools.mask as mask_util

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
from .report import clean_metrics, write_run_results
from .scoring import Scorer, check_evaluator, details

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
        if "bbox" in det and min(det["bbox"][2:]) < 0:
            raise TransferError(source, f"detection {i} has a bbox of negative width or height "
                                        f"({det['bbox'][2]:g} × {det['bbox'][3]:g}); boxes are "
                                        f"[x, y, width, height], not corner coordinates")
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
    sizes = {img["id"]: [img.get("height"), img.get("width")] for img in gt["images"]}
    for i, det in enumerate(detections):
        seg = det.get("segmentation")
        if not isinstance(seg, dict):
            continue
        h, w = size = sizes[det["image_id"]]
        if seg["size"] != size:
            raise TransferError(source, f"detection {i} has an RLE mask of size {seg['size']}, "
                                        f"but image {det['image_id']} is {h}×{w} (height × "
                                        f"width); masks must be of their image's size")
        if isinstance(seg["counts"], list) and sum(seg["counts"]) != h * w:
            raise TransferError(source, f"detection {i} has an uncompressed RLE whose counts "
                                        f"add up to {sum(seg['counts'])} pixels, not the "
                                        f"{h}×{w} of image {det['image_id']}")


def _check_rle_counts(source: str, detections: Sequence[dict[str, Any]]) -> None:
    """Raise unless every compressed RLE's counts fit its size (checked by faster-coco-eval's
    C++ decoder, all masks in one call; pycocotools' has no bounds check)."""
    from faster_coco_eval.core import mask as fast_mask

    rles = [(i, d["segmentation"]) for i, d in enumerate(detections)
            if isinstance(d.get("segmentation"), dict)]
    try:
        fast_mask.area([rle for _, rle in rles])
        return
    except (ValueError, RuntimeError):
        pass
    for i, rle in rles:
        try:
            fast_mask.area([rle])
        except (ValueError, RuntimeError):
            raise TransferError(source, f"detection {i} has an RLE mask whose counts do not fit "
                                        f"its size {rle['size']}") from None


def _to_rle(detections: list[dict[str, Any]], gt: dict[str, Any]) -> None:
    """Polygons and uncompressed RLE -> compressed RLE in place (the APIs score results as
    compressed RLE)."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    for det in detections:
        seg = det.get("segmentation")
        if isinstance(seg, list) or (isinstance(seg, dict) and isinstance(seg["counts"], list)):
            h, w = sizes[det["image_id"]]
            rle = mask_util.frPyObjects(seg, h, w)
            rle = mask_util.merge(rle) if isinstance(rle, list) else rle
            det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def evaluate_predictions(
    dataset: str | DatasetSpec,
    predictions: str | Path | Sequence[dict[str, Any]],
    *,
    dataset_root: str | None = None,
    output_dir: str | Path | None = None,
    evaluator: str = "fast",
) -> dict[str, dict[str, float | None]]:
    """AP metrics of ``predictions`` on ``dataset``: ``{"bbox": {...}, "segm": {...}}``.

    Args:
        dataset: a builtin name (``coco_2017_val``, ``lvis_v1_val``), the path of a
            COCO/LVIS-format annotation JSON, or a resolved :class:`DatasetSpec`.
        predictions: a results-file path or the list of detections itself (not empty:
            a results file without detections is refused as a likely mistake).
        dataset_root: where builtin datasets live (default ``$DETECTRON2_DATASETS``).
        output_dir: if given, ``results.json`` (with per-category AP and precision–recall
            curves) and ``report.md`` are written there.
        evaluator: ``"fast"`` (faster-coco-eval) or ``"official"`` (pycocotools / lvis);
            the numbers are the same.

    Returns:
        per task (``bbox`` always when boxes are present, ``segm`` when masks are), AP, AP50,
        AP75, APs, APm, APl in percent, plus APr, APc, APf for LVIS (at most 300 detections
        per image); ``None`` where the ground truth has nothing to measure.
    """
    try:
        check_evaluator(evaluator)
    except ValueError as err:
        raise TransferError("--evaluator", str(err)) from None
    if output_dir is not None and isinstance(predictions, (str, Path)):
        target = Path(output_dir) / "results.json"
        if target.resolve() == Path(predictions).resolve():
            raise TransferError(predictions, "--output-dir would overwrite the predictions file "
                                             "with the metrics; choose another folder")
    if output_dir is not None and (Path(output_dir) / "results.json").exists():
        raise TransferError(output_dir, "already holds results.json (a run's results); writing "
                                        "the metrics there would replace them: choose another "
                                        "--output-dir")
    spec = dataset if isinstance(dataset, DatasetSpec) else resolve_dataset(
        dataset, root=dataset_root, check_images=False)
    if spec.kind == "voc":
        raise TransferError(spec.name, "a Pascal VOC dataset has no COCO-format ground truth to "
                                       "score a results file against; VOC is scored by "
                                       "Detectron2's PascalVOCDetectionEvaluator in "
                                       "m2t-transfer train and eval")
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
    if evaluator == "official":  # pycocotools reads such counts past the mask's end
        _check_rle_counts(source, detections)
    scorer = Scorer(spec.json_file, spec.kind, evaluator)
    try:
        scores = {task: scorer.score([d for d in detections
                                      if task == "bbox" or "segmentation" in d], task)
                  for task in tasks}
    except (ValueError, RuntimeError) as err:  # what faster-coco-eval's decoders raise
        _check_rle_counts(source, detections)
        reason = " ".join(str(err).split())[:200]
        raise TransferError(source, f"a mask could not be decoded ({reason}); segmentations "
                                    f"must be polygons or RLE of their image") from None
    metrics = {task: clean_metrics(score.metrics) for task, score in scores.items()}
    if output_dir is not None:
        write_run_results(output_dir, metrics, {
            "method": Path(source).stem, "test_dataset": spec.name, "predictions": source,
            "num_detections": len(detections), "evaluator": evaluator}, details(scores))
    return metrics


#: Where the trainer's evaluator (:class:`transfer.evaluator.DetectionEvaluator`) writes
#: per-category AP and curves, beside the results.
DETAILS_FILE = "evaluation_details.json"


def read_details(folder: str | Path) -> dict[str, Any] | None:
    """The per-category AP and curves the trainer's evaluator wrote to ``folder``."""
    path = Path(folder) / DETAILS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
