"""``m2t-transfer``: bad input ends with one line ``error: <path>: <what>`` and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transfer.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, path: str | Path, what: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert what in lines[0]
    assert "Traceback" not in err


def test_unknown_config_name(capsys: pytest.CaptureFixture[str], r50_pkl: Path) -> None:
    code, err = run_cli(capsys, "train", "--config", "mask_rcnn_R_50_FPN_3x",
                        "--weights", str(r50_pkl))
    assert code == 2
    assert_one_error_line(err, "mask_rcnn_R_50_FPN_3x", "unknown config")


def test_missing_dataset_root(capsys: pytest.CaptureFixture[str], r50_pkl: Path,
                              tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    code, err = run_cli(capsys, "train", "--config", "mask_rcnn_R_50_FPN_1x", "--weights",
                        str(r50_pkl), "--dataset-root", str(root))
    assert code == 2
    assert_one_error_line(err, root, "dataset root does not exist")


def test_missing_annotation_json(capsys: pytest.CaptureFixture[str], r50_pkl: Path,
                                 tmp_path: Path) -> None:
    missing = tmp_path / "train.json"
    code, err = run_cli(capsys, "train", "--config", "fcos_R_50_FPN_1x", "--weights",
                        str(r50_pkl), "--train-dataset", str(missing))
    assert code == 2
    assert_one_error_line(err, missing, "annotation file not found")


def test_json_that_is_not_coco_format(capsys: pytest.CaptureFixture[str], r50_pkl: Path,
                                      tmp_path: Path) -> None:
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "labels": []}))
    code, err = run_cli(capsys, "train", "--config", "fcos_R_50_FPN_1x", "--weights",
                        str(r50_pkl), "--train-dataset", str(bad))
    assert code == 2
    assert_one_error_line(err, bad, "not a COCO-format annotation file: no 'annotations' list")


def test_image_files_missing_for_some_entries(capsys: pytest.CaptureFixture[str], r50_pkl: Path,
                                              shapes_dataset: Path) -> None:
    images = shapes_dataset.parents[1] / "train"
    (images / "train_00005.jpg").unlink()
    code, err = run_cli(capsys, "train", "--config", "fcos_R_50_FPN_1x", "--weights",
                        str(r50_pkl), "--train-dataset", str(shapes_dataset),
                        "--test-dataset", str(shapes_dataset))
    assert code == 2
    assert_one_error_line(err, images,
                          "1 of 6 images listed in")


def test_weights_of_the_wrong_architecture(capsys: pytest.CaptureFixture[str], r18_pkl: Path,
                                           shapes_dataset: Path) -> None:
    code, err = run_cli(capsys, "train", "--config", "fcos_R_50_FPN_1x", "--weights",
                        str(r18_pkl), "--train-dataset", str(shapes_dataset),
                        "--test-dataset", str(shapes_dataset))
    assert code == 2
    assert_one_error_line(err, r18_pkl.resolve(), "do not fit the ResNet-50 backbone")


def test_missing_weights_file(capsys: pytest.CaptureFixture[str], shapes_dataset: Path,
                              tmp_path: Path) -> None:
    code, err = run_cli(capsys, "eval", "--config", "fcos_R_50_FPN_1x", "--weights",
                        str(tmp_path / "model_final.pth"), "--test-dataset", str(shapes_dataset))
    assert code == 2
    assert_one_error_line(err, tmp_path / "model_final.pth", "weights file not found")


def test_mask_config_on_a_box_only_dataset(capsys: pytest.CaptureFixture[str], r50_pkl: Path,
                                           shapes_dataset: Path) -> None:
    data = json.loads(shapes_dataset.read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]
    shapes_dataset.write_text(json.dumps(data))
    code, err = run_cli(capsys, "train", "--config", "mask_rcnn_R_50_FPN_1x", "--weights",
                        str(r50_pkl), "--train-dataset", str(shapes_dataset),
                        "--test-dataset", str(shapes_dataset))
    assert code == 2
    assert_one_error_line(err, shapes_dataset.resolve(), "without segmentation masks")


def test_evaluate_with_a_missing_predictions_file(capsys: pytest.CaptureFixture[str],
                                                  shapes_dataset: Path, tmp_path: Path) -> None:
    code, err = run_cli(capsys, "evaluate", "--dataset", str(shapes_dataset), "--predictions",
                        str(tmp_path / "results.json"))
    assert code == 2
    assert_one_error_line(err, tmp_path / "results.json", "predictions file not found")


def test_report_without_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(capsys, "report", str(tmp_path), "--output-dir", str(tmp_path / "r"))
    assert code == 2
    assert_one_error_line(err, tmp_path, "no results.json")


def test_evaluate_prints_the_metrics_table(capsys: pytest.CaptureFixture[str],
                                           shapes_dataset: Path, tmp_path: Path) -> None:
    data = json.loads(shapes_dataset.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in data["annotations"]]
    predictions = tmp_path / "dets.json"
    predictions.write_text(json.dumps(dets))
    assert main(["evaluate", "--dataset", str(shapes_dataset), "--predictions",
                 str(predictions)]) == 0
    assert "| bbox | 100.0 | 100.0 | 100.0 |" in capsys.readouterr().out


def test_the_console_script_exits_nonzero_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "transfer", "train", "--config", "no_such_config",
         "--weights", str(tmp_path / "w.pkl")], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no_such_config: unknown config")
    assert "Traceback" not in proc.stderr
