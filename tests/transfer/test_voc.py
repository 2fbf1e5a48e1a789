"""Pascal VOC: the VOC07+12 C4 protocol, VOC datasets under DETECTRON2_DATASETS, the VOC07 metric.

The dataset is a VOC-format slice of real COCO images (``transfer.voc_slice``); Detectron2's
``PascalVOCDetectionEvaluator`` is checked against a second implementation written here from
the VOC devkit's definition, and against hand-computed cases.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import voc_ap
from detectron2.structures import Boxes, Instances

from transfer.__main__ import main
from transfer.config import load_config
from transfer.datasets import VOC_CLASSES, register_dataset, resolve_dataset
from transfer.errors import TransferError
from transfer.report import VOC_METRICS, run_table, summarize
from transfer.trainer import Trainer
from transfer.voc_slice import make_voc_slice


@pytest.fixture(scope="module")
def voc_root(coco_mini: Path, module_tmp: Callable[[str], Path]) -> Path:
    """VOC2007 (trainval, test) and VOC2012 (trainval) cut from coco_mini, 20 images each."""
    root = module_tmp("voc")
    make_voc_slice(coco_mini, root)
    return root


# ---- the protocol -------------------------------------------------------------------------

def test_voc0712_config_is_mocos_pascal_voc_r50_c4_24k() -> None:
    """moco/detection/configs/pascal_voc_R_50_C4_24k.yaml on Base-RCNN-C4-BN.yaml."""
    cfg = load_config("pascal_voc_R_50_C4_24k", ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON is False
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert cfg.INPUT.MIN_SIZE_TEST == 800
    assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert tuple(cfg.DATASETS.TEST) == ("voc_2007_test",)
    assert (tuple(cfg.SOLVER.STEPS), cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS) == (
        (18000, 22000), 24000, 100)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.02)
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.TEST.PRECISE_BN.ENABLED
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    voc07 = load_config("pascal_voc07_R_50_C4_24k", ["MODEL.DEVICE", "cpu"])
    assert tuple(voc07.DATASETS.TRAIN) == ("voc_2007_trainval",)
    assert voc07.SOLVER.MAX_ITER == 24000 and tuple(voc07.DATASETS.TEST) == ("voc_2007_test",)


def test_both_coco_fpn_protocols_ship_under_their_names() -> None:
    """moco#34: SyncBN only in backbone and FPN, standard heads; PyContrast's R_50_FPN_1x.yaml:
    SyncBN also in the 4conv1fc box head and the mask head (our mask_rcnn_R_50_FPN_1x)."""
    moco = load_config("mask_rcnn_R_50_FPN_1x_moco", ["MODEL.DEVICE", "cuda"], world_size=8)
    assert (moco.MODEL.RESNETS.NORM, moco.MODEL.FPN.NORM) == ("SyncBN", "SyncBN")
    assert (moco.MODEL.ROI_BOX_HEAD.NUM_CONV, moco.MODEL.ROI_BOX_HEAD.NUM_FC) == (0, 2)
    assert moco.MODEL.ROI_BOX_HEAD.NORM == "" and moco.MODEL.ROI_MASK_HEAD.NORM == ""
    for name in ("mask_rcnn_R_50_FPN_1x_pixpro", "mask_rcnn_R_50_FPN_1x"):
        ours = load_config(name, ["MODEL.DEVICE", "cuda"], world_size=8)
        assert (ours.MODEL.ROI_BOX_HEAD.NUM_CONV, ours.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
        assert {ours.MODEL.RESNETS.NORM, ours.MODEL.FPN.NORM, ours.MODEL.ROI_BOX_HEAD.NORM,
                ours.MODEL.ROI_MASK_HEAD.NORM} == {"SyncBN"}
    for cfg in (moco, ours):
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (90000, (60000, 80000))


# ---- the datasets -------------------------------------------------------------------------

def test_voc_splits_are_found_in_detectron2s_layout(voc_root: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETECTRON2_DATASETS", str(voc_root))
    spec = resolve_dataset("voc_2007_test")
    assert (spec.kind, spec.voc_split, spec.voc_year, spec.num_images) == ("voc", "test", 2007, 20)
    assert spec.thing_classes == list(VOC_CLASSES) and spec.num_classes == 20
    assert all(c["image_count"] >= 1 for c in spec.class_image_count)  # all 20 classes
    register_dataset(spec)
    meta = MetadataCatalog.get("voc_2007_test")
    assert meta.evaluator_type == "pascal_voc" and meta.year == 2007
    assert Path(meta.dirname) == (voc_root / "VOC2007").resolve()
    assert isinstance(Trainer.build_evaluator(load_config("pascal_voc_R_50_C4_24k"),
                                              "voc_2007_test"), PascalVOCDetectionEvaluator)
    assert resolve_dataset("voc_2012_trainval", root=str(voc_root)).voc_year == 2012


def test_slice_maps_coco_names_and_flags_difficult_boxes(voc_root: Path) -> None:
    names, difficult = set(), 0
    for xml in (voc_root / "VOC2007" / "Annotations").glob("*.xml"):
        for obj in ET.parse(xml).findall("object"):
            names.add(obj.findtext("name"))
            difficult += int(obj.findtext("difficult"))
    assert names <= set(VOC_CLASSES) and {"aeroplane", "tvmonitor", "sofa"} <= names
    assert difficult > 0


def test_bad_voc_layouts_fail_in_one_line(voc_root: Path, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match=r"image list of voc_2007_test not found.*VOC2007/"):
        resolve_dataset("voc_2007_test", root=str(tmp_path))
    bad = tmp_path / "VOC2007"
    (bad / "ImageSets" / "Main").mkdir(parents=True)
    (bad / "Annotations").mkdir()
    (bad / "ImageSets" / "Main" / "test.txt").write_text("x1\n")
    (bad / "Annotations" / "x1.xml").write_text(
        "<annotation><size><width>10</width><height>10</height></size><object><name>zebra"
        "</name></object></annotation>")
    with pytest.raises(TransferError, match="'zebra', not one of the 20 VOC classes"):
        resolve_dataset("voc_2007_test", root=str(tmp_path))
    with pytest.raises(TransferError, match="PascalVOCDetectionEvaluator"):
        from transfer.evaluate import evaluate_predictions
        evaluate_predictions("voc_2007_test", [], dataset_root=str(voc_root))


# ---- the metric ---------------------------------------------------------------------------

def reference_ap(gt: dict[str, list[tuple[list[float], bool]]],
                 dets: list[tuple[str, float, list[float]]], iou: float,
                 eleven_point: bool) -> float:
    """VOC AP of one class, from the devkit's definition: detections by falling score; a
    detection matching (IoU > ``iou``, 1-based inclusive pixels) a not yet matched box is a
    true positive, a second match a false positive; matches to difficult boxes count neither
    way; recall over the non-difficult boxes. 11-point: mean over r in 0, 0.1, ..., 1 of the
    highest precision at recall >= r; all-point: the area under the precision envelope."""
    npos = sum(not d for boxes in gt.values() for _, d in boxes)
    used = {image: [False] * len(boxes) for image, boxes in gt.items()}
    tp, fp = [], []
    for image, _, box in sorted(dets, key=lambda d: -d[1]):
        best, best_j = 0.0, -1
        for j, (g, _) in enumerate(gt.get(image, [])):
            w = min(box[2], g[2]) - max(box[0], g[0]) + 1
            h = min(box[3], g[3]) - max(box[1], g[1]) + 1
            if w > 0 and h > 0:
                inter = w * h
                union = ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                         + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter)
                if inter / union > best:
                    best, best_j = inter / union, j
        if best > iou and gt[image][best_j][1]:
            continue  # a difficult box: ignored
        hit = best > iou and not used[image][best_j]
        if hit:
            used[image][best_j] = True
        tp.append(int(hit))
        fp.append(int(not hit))
    tps, fps = np.cumsum(tp), np.cumsum(fp)
    recall = tps / npos
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    if eleven_point:
        return float(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                              for r in np.arange(0.0, 1.1, 0.1)]))  # as the devkit: 0:0.1:1
    area, previous = 0.0, 0.0
    for k in range(len(recall)):
        if recall[k] > previous:
            area += (recall[k] - previous) * precision[k:].max()
            previous = recall[k]
    return area


def test_eleven_point_and_all_point_ap_by_hand() -> None:
    """Two boxes; detections TP (0.9), FP (0.8), TP (0.7): precision 1, 1/2, 2/3 at recall
    1/2, 1/2, 1. All-point: 1/2 * 1 + 1/2 * 2/3 = 5/6. 11-point: recall 0..0.5 (6 points) at
    precision 1, 0.6..1 (5 points) at 2/3: (6 + 10/3) / 11 = 28/33."""
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 6)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(28 / 33)
    gt = {"a": [([1, 1, 10, 10], False), ([20, 20, 30, 30], False), ([40, 40, 50, 50], True)]}
    dets = [("a", 0.9, [1, 1, 10, 10]), ("a", 0.8, [60, 60, 70, 70]),
            ("a", 0.75, [40, 40, 50, 50]),  # the difficult box: neither TP nor FP
            ("a", 0.7, [20, 20, 30, 30])]
    assert reference_ap(gt, dets, 0.5, False) == pytest.approx(5 / 6)
    assert reference_ap(gt, dets, 0.5, True) == pytest.approx(28 / 33)


def _read_gt(dirname: Path, split: str) -> dict[str, dict[str, list[tuple[list[float], bool]]]]:
    """Per class, per image id: the boxes and difficult flags of a VOC split."""
    out: dict[str, dict[str, list[tuple[list[float], bool]]]] = {c: {} for c in VOC_CLASSES}
    for image in (dirname / "ImageSets" / "Main" / f"{split}.txt").read_text().split():
        for cls in VOC_CLASSES:
            out[cls].setdefault(image, [])
        for obj in ET.parse(dirname / "Annotations" / f"{image}.xml").findall("object"):
            box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            out[obj.findtext("name")][image].append((box, obj.findtext("difficult") == "1"))
    return out


def test_detectron2_voc_evaluator_matches_a_second_implementation(voc_root: Path) -> None:
    """Jittered ground-truth boxes, duplicates, hits on difficult boxes and misplaced boxes
    with random scores on the slice's voc_2007_test: Detectron2's AP50 (11-point), AP75 and
    AP (mean over IoU 0.50:0.95) equal the reference's, and the all-point AP differs."""
    register_dataset(resolve_dataset("voc_2007_test", root=str(voc_root)))
    gt = _read_gt(voc_root / "VOC2007", "test")
    rng = np.random.default_rng(0)
    evaluator = PascalVOCDetectionEvaluator("voc_2007_test")
    evaluator.reset()
    dets: dict[str, list[tuple[str, float, list[float]]]] = {c: [] for c in VOC_CLASSES}
    images = sorted(gt["person"])
    for image in images:
        boxes, scores, classes = [], [], []
        for k, cls in enumerate(VOC_CLASSES):
            for box, _ in gt[cls][image]:
                for _ in range(int(rng.integers(0, 3))):  # 0 (a miss), 1 or 2 (a duplicate)
                    jitter = rng.normal(0, 0.08 * (box[2] - box[0] + 1), 4)
                    boxes.append([b + j for b, j in zip(box, jitter, strict=True)])
                    scores.append(float(rng.uniform(0.05, 1.0)))
                    classes.append(k)
            if rng.uniform() < 0.3:  # a false positive somewhere
                boxes.append([5.0, 5.0, 60.0, 80.0])
                scores.append(float(rng.uniform(0.05, 1.0)))
                classes.append(k)
        scores = [round(s, 3) for s in scores]  # the evaluator writes scores with 3 decimals
        # Detectron2 boxes are 0-based continuous; the evaluator adds 1 to xmin/ymin
        d2 = [[b[0] - 1, b[1] - 1, b[2], b[3]] for b in boxes]
        d2 = [[round(v, 1) for v in b] for b in d2]
        inst = Instances((1000, 1000), pred_boxes=Boxes(torch.tensor(d2, dtype=torch.float64)
                                                        .reshape(-1, 4)),
                         scores=torch.tensor(scores), pred_classes=torch.tensor(classes))
        evaluator.process([{"image_id": image}], [{"instances": inst}])
        for b, s, k in zip(d2, scores, classes, strict=True):
            dets[VOC_CLASSES[k]].append((image, s, [b[0] + 1, b[1] + 1, b[2], b[3]]))
    got = evaluator.evaluate()["bbox"]

    def mean_ap(iou: float, eleven: bool) -> float:
        return 100 * float(np.mean([reference_ap(gt[c], dets[c], iou, eleven)
                                    for c in VOC_CLASSES]))

    assert got["AP50"] == pytest.approx(mean_ap(0.5, True), abs=1e-6)
    assert got["AP75"] == pytest.approx(mean_ap(0.75, True), abs=1e-6)
    assert got["AP"] == pytest.approx(np.mean([mean_ap(t / 100, True)
                                               for t in range(50, 100, 5)]), abs=1e-6)
    assert 0 < got["AP75"] < got["AP50"] < 100
    assert abs(mean_ap(0.5, False) - got["AP50"]) > 0.01  # 11-point, not all-point


def test_voc_report_columns_are_ap50_ap_ap75() -> None:
    runs = [{"method": "m", "config": "pascal_voc_R_50_C4_24k", "test_dataset": "voc_2007_test",
             "seed": s, "bbox": {"AP": 50.0 + s, "AP50": 80.0 + s, "AP75": 55.0}}
            for s in range(5)]
    group = summarize(runs)[("pascal_voc_R_50_C4_24k", "voc_2007_test")]
    assert [n for _, n in group["metrics"]] == list(VOC_METRICS) == ["AP50", "AP", "AP75"]
    mean, std = group["rows"]["m"][("bbox", "AP50")]
    assert mean == 82.0 and std == pytest.approx(np.std([80, 81, 82, 83, 84], ddof=1))
    assert run_table(runs[0]).splitlines()[0] == "| task | AP50 | AP | AP75 |"


# ---- a fine-tuning ------------------------------------------------------------------------

@pytest.mark.slow
def test_voc_fine_tuning_writes_voc_metrics(coco_mini: Path, r50_pkl: Path,
                                            tiny: tuple[str, ...],
                                            module_tmp: Callable[[str], Path]) -> None:
    """``m2t-transfer train --config pascal_voc_R_50_C4_24k`` on 4+4 training and 4 test
    images of a slice, 2 iterations at 128 px: results.json has AP50/AP/AP75 and names the
    evaluator and the Detectron2 that ran."""
    root = module_tmp("voc_small")
    make_voc_slice(coco_mini, root, test_images=4, train_images=4)
    run = module_tmp("voc_run")
    code = main(["train", "--config", "pascal_voc_R_50_C4_24k", "--weights", str(r50_pkl),
                 "--dataset-root", str(root), "--output-dir", str(run), *tiny])
    assert code == 0
    results = json.loads((run / "results.json").read_text())
    assert set(results["bbox"]) == set(VOC_METRICS)
    assert all(0.0 <= v <= 100.0 for v in results["bbox"].values())
    assert results["train_datasets"] == ["voc_2007_trainval", "voc_2012_trainval"]
    assert results["test_dataset"] == "voc_2007_test" and results["evaluator"] == "pascal_voc"
    assert results["detectron2"]["version"] and results["detectron2"]["sampler_seeding"]
    log = (run / "log.txt").read_text()
    assert "running on detectron2 " in log and "using 2007 metric" in log
    assert "| bbox | " in (run / "report.md").read_text()
