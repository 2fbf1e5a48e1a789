"""What the evaluator choice and the richer scoring change for a user (issue 16).

``--evaluator`` on ``evaluate``, ``train`` and ``eval`` (same numbers either way, choices
checked at the CLI), per-category AP and precision–recall curves in ``results.json``, a
per-category table in ``report.md`` (LVIS by frequency group) and curves in ``report.png``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from transfer.__main__ import main
from transfer.evaluate import evaluate_predictions
from transfer.report import write_report, write_run_results
from transfer.scoring import CURVES, RECALL

from .test_evaluate_backends import noisy_detections, perfect_detections

#: A ResNet-18 backbone in the R50 configs, as in test_train.py.
R18 = ("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
       "MODEL.FPN.OUT_CHANNELS", "128")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def coco_gt(coco_mini: Path) -> Path:
    return coco_mini / "annotations/instances_val2017.json"


@pytest.fixture(scope="module")
def lvis_gt(lvis_mini: Path) -> Path:
    return lvis_mini / "lvis_v0.5_val_subset.json"


def _write(path: Path, dets: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dets))
    return path


def test_evaluate_prints_the_same_table_with_either_evaluator(
        capsys: pytest.CaptureFixture[str], coco_gt: Path, tmp_path: Path) -> None:
    predictions = _write(tmp_path / "noisy.json",
                         noisy_detections(json.loads(coco_gt.read_text())))
    tables = {}
    for evaluator in ("fast", "official"):
        out = tmp_path / evaluator
        assert main(["evaluate", "--dataset", str(coco_gt), "--predictions", str(predictions),
                     "--evaluator", evaluator, "--output-dir", str(out)]) == 0
        tables[evaluator] = capsys.readouterr().out
        results = json.loads((out / "results.json").read_text())
        assert results["evaluator"] == evaluator
    assert tables["fast"] == tables["official"]
    assert "| segm |" in tables["fast"]


def test_an_unknown_evaluator_is_refused_at_the_cli(capsys: pytest.CaptureFixture[str],
                                                    coco_gt: Path, tmp_path: Path) -> None:
    for command in (["evaluate", "--dataset", str(coco_gt), "--predictions", "x.json"],
                    ["eval", "--config", "mask_rcnn_R_50_FPN_1x", "--weights", "w.pkl"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--evaluator", "pycocotools"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--evaluator: invalid choice: 'pycocotools'" in err and "Traceback" not in err


def test_an_unknown_evaluator_in_the_config_is_one_line_naming_the_config(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["eval", "--config", "mask_rcnn_R_50_FPN_1x", "--weights",
                 str(tmp_path / "w.pkl"), "TRANSFER.EVALUATOR", "pycocotools"])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]
    assert "mask_rcnn_R_50_FPN_1x.yaml: TRANSFER.EVALUATOR is 'pycocotools'; choose one of: " \
           "fast, official" in lines[0]


def test_empty_results_file_is_still_refused_by_evaluate(capsys: pytest.CaptureFixture[str],
                                                         coco_gt: Path, tmp_path: Path) -> None:
    """A results file without detections is more likely a mistake than a verdict."""
    empty = _write(tmp_path / "empty.json", [])
    assert main(["evaluate", "--dataset", str(coco_gt), "--predictions", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {empty}: no detections to score"


def test_results_hold_per_category_ap_and_curves_and_report_lists_categories(
        coco_gt: Path, tmp_path: Path) -> None:
    gt = json.loads(coco_gt.read_text())
    metrics = evaluate_predictions(str(coco_gt), noisy_detections(gt), output_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bbox"] == metrics["bbox"]
    for task in ("bbox", "segm"):
        cats = results["per_category"][task]
        assert [c["id"] for c in cats] == sorted(c["id"] for c in gt["categories"])
        assert set(results["pr_curves"][task]) == set(CURVES)
        assert all(len(v) == len(RECALL) for v in results["pr_curves"][task].values())
        # the curve at IoU 0.50 averages to AP50 (rounding of the stored values aside)
        curve = results["pr_curves"][task]["IoU=0.50"]
        assert sum(curve) / len(curve) * 100 == pytest.approx(metrics[task]["AP50"], abs=0.01)
    person = next(c for c in results["per_category"]["bbox"] if c["name"] == "person")
    report = (tmp_path / "report.md").read_text()
    assert "## Per-category AP" in report and "| category | AP<sup>box</sup> | AP<sup>mask" \
        in report
    assert f"| person | {person['AP']:.1f} |" in report


def test_lvis_report_groups_categories_by_frequency(lvis_gt: Path, tmp_path: Path) -> None:
    gt = json.loads(lvis_gt.read_text())
    evaluate_predictions(str(lvis_gt), noisy_detections(gt), output_dir=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    cats = results["per_category"]["segm"]
    assert len(cats) == len(gt["categories"]) and {c["frequency"] for c in cats} == set("rcf")
    report = (tmp_path / "report.md").read_text()
    with_gt = {a["category_id"] for a in gt["annotations"]}
    for group, code in (("rare", "r"), ("common", "c"), ("frequent", "f")):
        n = sum(1 for c in gt["categories"] if c["frequency"] == code and c["id"] in with_gt)
        if n:
            assert f"<summary>AP per category: {group} categories ({n})</summary>" in report
    left_out = len(gt["categories"]) - len(with_gt)
    assert f"{left_out} categories without ground truth in the test set are not listed" in report


def test_side_by_side_report_draws_curves_and_compares_categories(coco_gt: Path,
                                                                  tmp_path: Path) -> None:
    gt = json.loads(coco_gt.read_text())
    runs = []
    for method, dets in (("good", perfect_detections(gt)), ("noisy", noisy_detections(gt))):
        predictions = _write(tmp_path / "predictions" / f"{method}.json", dets)
        evaluate_predictions(str(coco_gt), predictions, output_dir=tmp_path / method)
        runs.append(tmp_path / method)
    md, png = write_report(runs, tmp_path / "report")
    text = md.read_text()
    assert "### Per-category AP (mean over each method's runs)" in text
    assert "| category | good AP<sup>box</sup> | noisy AP<sup>box</sup> | good AP<sup>mask" in text
    assert "| person | 100.0 |" in text
    # The same runs without their details: the bar chart alone, a much shorter figure.
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        write_run_results(tmp_path / "plain" / run.name, {t: results[t] for t in ("bbox", "segm")},
                          {"method": results["method"], "test_dataset": results["test_dataset"]})
    plain_md, plain_png = write_report([tmp_path / "plain"], tmp_path / "plain_report")
    assert "Per-category" not in plain_md.read_text()
    (width, height), (_, plain_height) = png_size(png), png_size(plain_png)
    assert height > 2.5 * plain_height and width >= 1500


@pytest.mark.slow
def test_eval_run_gives_the_same_results_with_either_evaluator_even_without_detections(
        shapes_dataset: Path, tiny: tuple[str, ...], tmp_path: Path) -> None:
    """``m2t-transfer eval``: the trainer's evaluator, both ways; a model that finds nothing
    (score threshold above 1) scores AP 0, as the official evaluation has it, not NaN."""
    import torch
    from detectron2.modeling import build_model

    from transfer.config import load_config
    from transfer.train import run_evaluation

    # A whole detector (untrained heads: eval refuses backbone-only weights), saved as a
    # Detectron2 checkpoint of the shapes' 3 classes.
    overrides = (*tiny, *R18, "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.DEVICE", "cpu")
    torch.manual_seed(0)
    model = build_model(load_config("mask_rcnn_R_50_FPN_1x", overrides))
    weights = tmp_path / "detector.pth"
    torch.save({"model": model.state_dict()}, weights)
    runs = {}
    for evaluator in ("fast", "official"):
        for label, extra in (("some", ()), ("none", ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"))):
            runs[evaluator, label] = run_evaluation(
                "mask_rcnn_R_50_FPN_1x", str(weights), output_dir=str(tmp_path / evaluator / label),
                test_dataset=str(shapes_dataset), overrides=(*overrides, *extra),
                evaluator=evaluator)
    for label in ("some", "none"):
        fast, official = runs["fast", label], runs["official", label]
        assert (fast["evaluator"], official["evaluator"]) == ("fast", "official")
        for key in ("bbox", "segm", "per_category", "pr_curves"):
            assert fast[key] == official[key], (label, key)
    assert runs["fast", "some"]["bbox"]["AP50"] is not None
    none = runs["fast", "none"]
    detections = tmp_path / "fast/none/inference/instances_train/coco_instances_results.json"
    assert json.loads(detections.read_text()) == []
    assert none["bbox"]["AP"] == 0.0 and none["segm"]["AP"] == 0.0


@pytest.mark.parametrize("evaluator", ["fast", "official"])
def test_masks_that_do_not_fit_their_image_are_one_line_naming_the_file(
        capsys: pytest.CaptureFixture[str], coco_gt: Path, tmp_path: Path,
        evaluator: str) -> None:
    image = json.loads(coco_gt.read_text())["images"][0]
    h, w = image["height"], image["width"]
    base = {"image_id": image["id"], "category_id": 1, "score": 0.5, "bbox": [1, 1, 5, 5]}
    fine = {**base, "segmentation": {"size": [h, w], "counts": "0"}}  # an empty mask
    cases = {
        "RLE mask of size [10, 10], but image": {"size": [10, 10], "counts": "PPYo0"},
        "uncompressed RLE whose counts add up to 8 pixels": {"size": [h, w], "counts": [5, 3]},
        "RLE mask whose counts do not fit its size": {"size": [h, w], "counts": "abc!!~~~"},
    }
    for what, mask in cases.items():
        path = _write(tmp_path / "bad.json", [fine, {**base, "segmentation": mask}])
        code = main(["evaluate", "--dataset", str(coco_gt), "--predictions", str(path),
                     "--evaluator", evaluator])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {path}: detection 1 ") and what in err, err


def test_uncompressed_rle_scores_as_its_compressed_form(coco_gt: Path) -> None:
    import numpy as np
    import pycocotools.mask as mask_util

    gt = json.loads(coco_gt.read_text())
    compressed = noisy_detections(gt)[:300]
    uncompressed = []
    for det in compressed:
        mask = mask_util.decode(det["segmentation"]).ravel(order="F")
        changes = np.flatnonzero(np.diff(np.concatenate([[0], mask, [1 - mask[-1]]])))
        counts = np.diff(np.concatenate([[0], changes])).tolist()
        uncompressed.append({**det, "segmentation": {"size": det["segmentation"]["size"],
                                                     "counts": counts}})
    assert uncompressed[0]["segmentation"]["counts"] != compressed[0]["segmentation"]["counts"]
    assert (evaluate_predictions(str(coco_gt), uncompressed)
            == evaluate_predictions(str(coco_gt), compressed))
