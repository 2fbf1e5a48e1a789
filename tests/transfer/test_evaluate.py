"""``evaluate``: pycocotools / lvis as the oracle: ground truth scored as detections is 100 AP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pycocotools.coco import COCO

from transfer.evaluate import evaluate_predictions
from transfer.report import COCO_METRICS, LVIS_METRICS


def coco_gt_as_detections(json_file: Path) -> list[dict[str, Any]]:
    """Every non-crowd ground-truth object as a score-1 detection with an RLE mask."""
    coco = COCO(str(json_file))
    dets = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd"):
            continue
        rle = coco.annToRLE(ann)
        rle["counts"] = rle["counts"].decode("ascii")
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                     "bbox": ann["bbox"], "score": 1.0, "segmentation": rle})
    return dets


def test_coco_ground_truth_as_detections_scores_100_ap(coco_mini: Path, tmp_path: Path) -> None:
    gt = coco_mini / "annotations/instances_val2017.json"
    predictions = tmp_path / "gt_as_results.json"
    predictions.write_text(json.dumps(coco_gt_as_detections(gt)))
    metrics = evaluate_predictions(str(gt), predictions, output_dir=tmp_path / "out")
    for task in ("bbox", "segm"):
        assert set(metrics[task]) == set(COCO_METRICS)
        assert all(v == pytest.approx(100.0) for v in metrics[task].values()), metrics[task]
    written = json.loads((tmp_path / "out/results.json").read_text())
    assert written["bbox"] == metrics["bbox"] and written["segm"] == metrics["segm"]
    assert "| bbox | 100.0 |" in (tmp_path / "out/report.md").read_text()


def test_coco_detections_that_miss_half_the_objects_score_less(coco_mini: Path) -> None:
    gt = coco_mini / "annotations/instances_val2017.json"
    dets = coco_gt_as_detections(gt)[::2]
    metrics = evaluate_predictions(str(gt), dets)
    assert 20.0 < metrics["bbox"]["AP"] < 80.0


def test_lvis_v05_ground_truth_as_detections_scores_100_ap_in_every_frequency(
        lvis_mini: Path) -> None:
    gt = lvis_mini / "lvis_v0.5_val_subset.json"
    data = json.loads(gt.read_text())
    # Polygons straight from the annotation file: converted to RLE by evaluate.
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0, "segmentation": a["segmentation"]} for a in data["annotations"]]
    metrics = evaluate_predictions(str(gt), dets)
    for task in ("bbox", "segm"):
        assert set(metrics[task]) == set(LVIS_METRICS)
        for name in ("AP", "APr", "APc", "APf"):
            assert metrics[task][name] == pytest.approx(100.0), (task, name)


def test_box_only_results_give_box_metrics_only(coco_mini: Path) -> None:
    gt = coco_mini / "annotations/instances_val2017.json"
    dets = [{k: v for k, v in d.items() if k != "segmentation"}
            for d in coco_gt_as_detections(gt)]
    assert list(evaluate_predictions(str(gt), dets)) == ["bbox"]


def test_detections_of_unknown_images_or_categories_are_refused(coco_mini: Path,
                                                                tmp_path: Path) -> None:
    from transfer.errors import TransferError

    gt = str(coco_mini / "annotations/instances_val2017.json")
    with pytest.raises(TransferError, match="not in the ground truth \\(first: image_id 1\\)"):
        evaluate_predictions(gt, [{"image_id": 1, "category_id": 1, "score": 1.0,
                                   "bbox": [0, 0, 1, 1]}])
    with pytest.raises(TransferError, match="category ids that are not in the ground truth"):
        evaluate_predictions(gt, [{"image_id": 139, "category_id": 0, "score": 1.0,
                                   "bbox": [0, 0, 1, 1]}])
    not_a_list = tmp_path / "results.json"
    not_a_list.write_text('{"bbox": {}}')
    with pytest.raises(TransferError, match="not a COCO-format results file"):
        evaluate_predictions(gt, not_a_list)
    with pytest.raises(TransferError, match="would overwrite the predictions"):
        evaluate_predictions(gt, not_a_list, output_dir=tmp_path)
