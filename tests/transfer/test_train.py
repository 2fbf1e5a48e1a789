"""Fine-tuning from converted weights: 2 iterations on real COCO images, then evaluation."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from transfer.__main__ import main
from transfer.evaluate import evaluate_predictions
from transfer.report import COCO_METRICS, LVIS_METRICS
from transfer.train import run_evaluation, run_training

pytestmark = pytest.mark.slow

#: A ResNet-18 backbone in the R50 configs: the same code path, a quarter of the compute.
R18 = ("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")


def _check_metrics(results: dict, tasks: tuple[str, ...]) -> None:
    """All six metrics per task; AP, AP50, AP75 computed (area ranges may have no objects)."""
    for task in tasks:
        assert set(results[task]) == set(COCO_METRICS), task
        for name, value in results[task].items():
            assert (value is None and name in ("APs", "APm", "APl")) or 0.0 <= value <= 100.0


@pytest.fixture(scope="module")
def mask_rcnn_run(coco_mini: Path, coco_val_subset: Path, r50_pkl: Path, tiny: tuple[str, ...],
                  module_tmp: Callable[[str], Path]) -> Path:
    """``m2t-transfer train`` of Mask R-CNN R50-FPN, 2 iterations on coco_mini train2017."""
    run = module_tmp("mask_rcnn_run")
    code = main(["train", "--config", "mask_rcnn_R_50_FPN_1x", "--weights", str(r50_pkl),
                 "--dataset-root", str(coco_mini), "--test-dataset", str(coco_val_subset),
                 "--test-images", str(coco_mini / "val2017"), "--output-dir", str(run), *tiny])
    assert code == 0
    return run


def test_mask_rcnn_trains_and_writes_box_and_mask_results(mask_rcnn_run: Path,
                                                          coco_val_subset: Path) -> None:
    results = json.loads((mask_rcnn_run / "results.json").read_text())
    _check_metrics(results, ("bbox", "segm"))
    assert results["method"] == "tv_r50" and results["config"] == "mask_rcnn_R_50_FPN_1x"
    assert results["train_datasets"] == ["coco_2017_train"]
    assert results["test_dataset"] == str(coco_val_subset.resolve())
    assert results["iterations"] == 2
    assert "| segm |" in (mask_rcnn_run / "report.md").read_text()
    # Detectron2's own outputs: config, JSON-lines metrics with the losses, the log.
    config = yaml.safe_load((mask_rcnn_run / "config.yaml").read_text())
    assert config["MODEL"]["RESNETS"]["NORM"] == "BN"  # SyncBN fallback on one process
    lines = [json.loads(x) for x in (mask_rcnn_run / "metrics.json").read_text().splitlines()]
    assert any("loss_mask" in x and "total_loss" in x for x in lines)
    assert "iter: 1  total_loss:" in (mask_rcnn_run / "log.txt").read_text()


def test_backbone_starts_from_the_converted_weights(mask_rcnn_run: Path, r50_pkl: Path) -> None:
    with open(r50_pkl, "rb") as f:
        converted = pickle.load(f)["model"]
    trained = torch.load(mask_rcnn_run / "model_final.pth", map_location="cpu")["model"]
    assert "matched with submodule backbone.bottom_up - Total num: 53" in (
        mask_rcnn_run / "log.txt").read_text()
    correlations = []
    for name, array in converted.items():
        if array.ndim == 4:  # the 53 convolutions; 2 SGD steps barely move them
            after = trained[f"backbone.bottom_up.{name}"].numpy()
            correlations.append(np.corrcoef(after.ravel(), array.ravel())[0, 1])
    assert len(correlations) == 53
    assert min(correlations) > 0.5 and np.median(correlations) > 0.99  # random init: ~0
    np.testing.assert_allclose(trained["backbone.bottom_up.res5.2.conv3.weight"].numpy(),
                               converted["res5.2.conv3.weight"], atol=1e-3)


def test_eval_of_the_final_checkpoint_matches_scoring_its_results_file(
        mask_rcnn_run: Path, coco_mini: Path, coco_val_subset: Path, tmp_path: Path) -> None:
    # The run's own config.yaml (tiny settings included) serves as the config.
    results = run_evaluation(str(mask_rcnn_run / "config.yaml"),
                             str(mask_rcnn_run / "model_final.pth"),
                             test_dataset=str(coco_val_subset),
                             test_images=str(coco_mini / "val2017"), output_dir=str(tmp_path))
    _check_metrics(results, ("bbox", "segm"))
    # Labels come from the run the checkpoint and config belong to.
    assert results["method"] == "tv_r50" and results["config"] == "mask_rcnn_R_50_FPN_1x"
    trained = json.loads((mask_rcnn_run / "results.json").read_text())
    assert results["bbox"] == trained["bbox"] and results["segm"] == trained["segm"]
    detections = tmp_path / "inference" / coco_val_subset.stem / "coco_instances_results.json"
    rescored = evaluate_predictions(str(coco_val_subset), detections)
    for task in ("bbox", "segm"):
        assert rescored[task] == pytest.approx(results[task])


def test_fcos_trains_and_writes_box_results(coco_mini: Path, coco_val_subset: Path,
                                            r50_pkl: Path, tiny: tuple[str, ...],
                                            tmp_path: Path) -> None:
    results = run_training("fcos_R_50_FPN_1x", str(r50_pkl), output_dir=str(tmp_path),
                           dataset_root=str(coco_mini), test_dataset=str(coco_val_subset),
                           test_images=str(coco_mini / "val2017"), method="fcos-smoke",
                           overrides=tiny)
    _check_metrics(results, ("bbox",))
    assert "segm" not in results and results["method"] == "fcos-smoke"
    assert json.loads((tmp_path / "results.json").read_text()) == results
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["MODEL"]["META_ARCHITECTURE"] == "FCOS"
    assert "loss_fcos_ctr" in (tmp_path / "metrics.json").read_text()
    log = (tmp_path / "log.txt").read_text()
    assert "matched with submodule backbone.bottom_up - Total num: 53" in log


def test_custom_coco_format_dataset_trains_and_evaluates_by_path(
        shapes_dataset: Path, r18_pkl: Path, tiny: tuple[str, ...], tmp_path: Path) -> None:
    out = tmp_path / "run"
    results = run_training(
        "mask_rcnn_R_50_FPN_1x", str(r18_pkl), output_dir=str(out),
        train_dataset=str(shapes_dataset), test_dataset=str(shapes_dataset),
        overrides=(*tiny, *R18, "MODEL.FPN.OUT_CHANNELS", "128"))
    _check_metrics(results, ("bbox", "segm"))
    assert results["train_datasets"] == [str(shapes_dataset.resolve())]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 3  # from the JSON's categories
    detections = json.loads(
        (out / "inference" / "instances_train" / "coco_instances_results.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {1, 2, 3}
    assert {d["image_id"] for d in detections} <= set(range(1, 7))



def test_lvis_mask_rcnn_with_federated_loss_reports_frequency_metrics(
        lvis_mini: Path, r18_pkl: Path, tiny: tuple[str, ...], tmp_path: Path) -> None:
    data = json.loads((lvis_mini / "lvis_v0.5_val_subset.json").read_text())
    keep = {img["id"] for img in data["images"][:3]}
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    subset = tmp_path / "lvis_v0.5_subset.json"
    subset.write_text(json.dumps(data))
    out = tmp_path / "run"
    results = run_training("lvis_v1_mask_rcnn_R_50_FPN_1x_fedloss", str(r18_pkl),
                           output_dir=str(out), train_dataset=str(subset),
                           train_images=str(lvis_mini), test_dataset=str(subset),
                           test_images=str(lvis_mini), overrides=(*tiny, *R18))
    for task in ("bbox", "segm"):
        assert set(results[task]) == set(LVIS_METRICS)
        assert results[task]["AP"] is not None
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 1230  # the v0.5 file's categories
    log = (out / "log.txt").read_text()
    assert "Using training sampler RepeatFactorTrainingSampler" in log
    assert (out / "inference" / subset.stem / "lvis_instances_results.json").is_file()


def test_two_processes_train_through_detectron2_launch_with_naive_sync_bn(
        shapes_dataset: Path, r18_pkl: Path, tiny: tuple[str, ...], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers share 2 cores
    out = tmp_path / "run"
    results = run_training("fcos_R_50_FPN_1x", str(r18_pkl), output_dir=str(out),
                           train_dataset=str(shapes_dataset), test_dataset=str(shapes_dataset),
                           num_gpus=2, overrides=(*tiny, *R18))
    _check_metrics(results, ("bbox",))
    assert results["world_size"] == 2
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["MODEL"]["RESNETS"]["NORM"] == config["MODEL"]["FPN"]["NORM"] == "naiveSyncBN"
    assert "World size: 2" in (out / "log.txt").read_text()
