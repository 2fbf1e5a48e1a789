"""The fast evaluator reports what the official APIs report (issue 16).

The oracle is the official API itself, called here directly: pycocotools' ``COCOeval`` and
the lvis package's ``LVISEval`` under Detectron2's convention (segm scored without boxes, so
areas are mask areas; LVIS cut to 300 detections per image). Every number the scorers report
(AP, AP50, AP75, APs/m/l, APr/c/f and the precision array behind per-category AP and the
curves) must agree to 1e-6, for perfect, noisy and empty predictions, on real COCO and LVIS
data and on the generated shapes.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from transfer import scoring
from transfer.scoring import COCO_NAMES, LVIS_NAMES, Scorer, TaskScore
from transfer.shapes import make_shapes

TOL = 1e-6


# ----------------------------------------------------------------------------- predictions

def _rle(seg: Any, h: int, w: int) -> dict[str, Any]:
    rle = mask_util.frPyObjects(seg, h, w)
    rle = mask_util.merge(rle) if isinstance(rle, list) else rle
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")
            if isinstance(rle["counts"], bytes) else rle["counts"]}


def perfect_detections(gt: dict[str, Any]) -> list[dict[str, Any]]:
    """Every non-crowd ground-truth object as a score-1 detection with its RLE mask."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0, "segmentation": _rle(a["segmentation"], *sizes[a["image_id"]])}
            for a in gt["annotations"] if not a.get("iscrowd")]


def noisy_detections(gt: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """What a mediocre detector writes: jittered boxes and polygons, missed objects, wrong
    classes, duplicates, false positives of any category, scores with many ties, and one
    image with 330 detections (past COCO's 100 and LVIS's 300 per image)."""
    rng = random.Random(seed)
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    cat_ids = [c["id"] for c in gt["categories"]]
    dets = []
    for a in gt["annotations"]:
        if a.get("iscrowd") or rng.random() < 0.15:
            continue
        h, w = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        seg = a["segmentation"]
        if isinstance(seg, list):
            seg = [[v + rng.gauss(0, 0.05 * max(bw, bh, 1)) for v in poly] for poly in seg]
        for copy in range(2 if rng.random() < 0.2 else 1):
            dets.append({
                "image_id": a["image_id"],
                "category_id": a["category_id"] if rng.random() < 0.9 else rng.choice(cat_ids),
                "bbox": [x + rng.gauss(0, 0.1 * bw), y + rng.gauss(0, 0.1 * bh),
                         bw * math.exp(rng.gauss(0, 0.15)), bh * math.exp(rng.gauss(0, 0.15))],
                "score": round(rng.random(), 2) / (copy + 1),
                "segmentation": _rle(seg, h, w)})
    for index, img in enumerate(gt["images"]):
        h, w = img["height"], img["width"]
        for _ in range(330 if index == 0 else 4):
            bw, bh = rng.uniform(2, w / 2), rng.uniform(2, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            dets.append({"image_id": img["id"], "category_id": rng.choice(cat_ids),
                         "bbox": [x, y, bw, bh], "score": round(rng.random(), 1),
                         "segmentation": _rle([box], h, w)})
    return dets


# ----------------------------------------------------------------------------- the oracle

def degenerate_detections(gt: dict[str, Any]) -> list[dict[str, Any]]:
    """The noisy detections plus, in every third image, two top-scoring detections of a
    category present there with nothing inside: an empty mask and a zero-width box (what a
    detector's mask head and box clipping can produce). The lvis package leaves results of
    area 0 out of its evaluation; pycocotools keeps them."""
    import numpy as np

    dets = noisy_detections(gt, seed=1)
    present: dict[int, int] = {}
    for a in gt["annotations"]:
        present.setdefault(a["image_id"], a["category_id"])
    for img in gt["images"][::3]:
        if img["id"] not in present:
            continue
        h, w = img["height"], img["width"]
        empty = mask_util.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0]
        empty = {"size": empty["size"], "counts": empty["counts"].decode("ascii")}
        for bbox, mask in (([5.0, 5.0, 0.0, 20.0], empty),
                           ([5.0, 5.0, 20.0, 20.0], empty)):
            dets.append({"image_id": img["id"], "category_id": present[img["id"]],
                         "bbox": bbox, "score": 0.999, "segmentation": mask})
    return dets


def official_coco(json_file: str, dets: list[dict[str, Any]],
                  task: str) -> tuple[dict[str, float], np.ndarray]:
    """pycocotools as Detectron2's COCOEvaluator runs it (empty: an empty result set)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = [{k: v for k, v in d.items() if not (task == "segm" and k == "bbox")} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(json_file)
        if dets:
            dt = gt.loadRes(dets)
        else:
            dt = COCO()
            dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                          "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, task)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics = {n: ev.stats[i] * 100 if ev.stats[i] >= 0 else math.nan
               for i, n in enumerate(COCO_NAMES)}
    return metrics, ev.eval["precision"][..., -1]


def official_lvis(json_file: str, dets: list[dict[str, Any]],
                  task: str) -> tuple[dict[str, float], np.ndarray]:
    """The lvis package as Detectron2's LVISEvaluator runs it. It cannot load an empty
    list; "no detections" is then one detection of a category that is neither positive nor
    negative in its image, which the federated evaluation drops before matching."""
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(json_file)
    dets = [{k: v for k, v in d.items() if not (task == "segm" and k == "bbox")} for d in dets]
    if not dets:
        img = gt.dataset["images"][0]
        present = {a["category_id"] for a in gt.dataset["annotations"]
                   if a["image_id"] == img["id"]} | set(img["neg_category_ids"])
        unknown = next(c for c in gt.get_cat_ids() if c not in present)
        dets = [{"image_id": img["id"], "category_id": unknown, "score": 0.5,
                 "bbox" if task == "bbox" else "segmentation":
                     [1, 1, 5, 5] if task == "bbox" else _rle([[1, 1, 6, 1, 6, 6, 1, 6]],
                                                              img["height"], img["width"])}]
    ev = LVISEval(gt, LVISResults(gt, dets, max_dets=300), task)
    ev.run()
    res = ev.get_results()
    metrics = {n: res[n] * 100 if res[n] >= 0 else math.nan for n in LVIS_NAMES}
    return metrics, ev.eval["precision"]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def datasets(coco_mini: Path, lvis_mini: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    shapes = make_shapes(tmp_path_factory.mktemp("shapes"), n_train=0, n_val=12, size=96)
    lvis_json = lvis_mini / "lvis_v0.5_val_subset.json"
    # the lvis package leaves ground truth of area 0 out of the evaluation; lvis_mini has none
    gt = json.loads(lvis_json.read_text())
    for ann in gt["annotations"][::5]:
        ann["area"] = 0
    area_0 = tmp_path_factory.mktemp("lvis_area_0") / "lvis_area_0.json"
    area_0.write_text(json.dumps(gt))
    return {"coco_mini": (str(coco_mini / "annotations/instances_val2017.json"), "coco"),
            "lvis_mini": (str(lvis_json), "lvis"),
            "lvis_mini, a fifth of the objects of area 0": (str(area_0), "lvis"),
            "shapes": (str(shapes["val_json"]), "coco")}


@cache
def _detections(json_file: str, predictions: str) -> list[dict[str, Any]]:
    gt = json.loads(Path(json_file).read_text())
    return {"perfect": perfect_detections, "noisy": noisy_detections,
            "degenerate": degenerate_detections, "empty": lambda gt: []}[predictions](gt)


@cache
def _oracle(json_file: str, kind: str, predictions: str,
            task: str) -> tuple[dict[str, float], np.ndarray]:
    dets = _detections(json_file, predictions)
    return (official_lvis if kind == "lvis" else official_coco)(json_file, dets, task)


@cache
def _scorer(json_file: str, kind: str, evaluator: str) -> Scorer:
    return Scorer(json_file, kind, evaluator)


def assert_same(score: TaskScore, metrics: dict[str, float], precision: np.ndarray) -> None:
    assert list(score.metrics) == list(metrics)
    for name, expected in metrics.items():
        got = score.metrics[name]
        assert (math.isnan(got) and math.isnan(expected)) or abs(got - expected) <= TOL, (
            name, got, expected)
    assert score.precision.shape == precision.shape
    np.testing.assert_allclose(score.precision, precision, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- the claims

@pytest.mark.parametrize("task", ["bbox", "segm"])
@pytest.mark.parametrize("predictions", ["perfect", "noisy", "degenerate", "empty"])
@pytest.mark.parametrize("dataset", ["coco_mini", "lvis_mini", "shapes"])
@pytest.mark.parametrize("evaluator", ["fast, all pairs", "fast, by category", "official"])
def test_every_number_equals_the_official_apis(datasets: dict[str, tuple[str, str]],
                                               evaluator: str, dataset: str, predictions: str,
                                               task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways of the fast evaluator (one pass over every (image, category) pair, or one
    category at a time on its own images) are held to the official APIs."""
    json_file, kind = datasets[dataset]
    if evaluator.startswith("fast"):
        monkeypatch.setattr(scoring, "PER_CATEGORY_BELOW", 1.01 if "category" in evaluator else 0)
        evaluator = "fast"
    dets = _detections(json_file, predictions)
    before = json.dumps(dets)
    score = _scorer(json_file, kind, evaluator).score(dets, task)
    assert json.dumps(dets) == before  # the caller's detections are left alone
    assert_same(score, *_oracle(json_file, kind, predictions, task))
    if predictions == "perfect":
        assert score.metrics["AP"] == pytest.approx(100.0)
    if predictions == "empty":  # AP 0 where there is ground truth, not "no result"
        assert score.metrics["AP"] == 0.0


@pytest.mark.parametrize("task", ["bbox", "segm"])
@pytest.mark.parametrize("predictions", ["perfect", "noisy"])
@pytest.mark.parametrize("by_category", [True, False])
def test_lvis_ground_truth_of_area_0_is_left_out_as_the_lvis_package_does(
        datasets: dict[str, tuple[str, str]], by_category: bool, predictions: str, task: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    json_file, kind = datasets["lvis_mini, a fifth of the objects of area 0"]
    monkeypatch.setattr(scoring, "PER_CATEGORY_BELOW", 1.01 if by_category else 0)
    dets = _detections(json_file, predictions)
    score = Scorer(json_file, kind, "fast").score(dets, task)
    assert_same(score, *_oracle(json_file, kind, predictions, task))
    if predictions == "perfect":  # the detections of the objects left out are false positives
        assert score.metrics["AP"] < 95


@pytest.mark.parametrize(("dataset", "by_category"), [("lvis_mini", True), ("shapes", False)])
def test_the_fast_evaluator_goes_by_category_where_most_pairs_are_empty(
        datasets: dict[str, tuple[str, str]], dataset: str, by_category: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """lvis_mini: 62 images × 139 categories with ground truth, each category in a few images;
    shapes: 3 categories, each in most images."""
    json_file, kind = datasets[dataset]
    scorer = Scorer(json_file, kind, "fast")
    calls: list[list[int]] = []
    evaluate = scorer._evaluate

    def spy(*args: Any) -> Any:
        calls.append(args[4])
        return evaluate(*args)

    monkeypatch.setattr(scorer, "_evaluate", spy)
    scorer.score(_detections(json_file, "noisy"), "bbox")
    with_gt = {a["category_id"] for a in json.loads(Path(json_file).read_text())["annotations"]}
    assert sorted(c for ids in calls for c in ids) == sorted(with_gt)
    assert len(calls) == (len(with_gt) if by_category else 1)


def test_noisy_predictions_are_far_from_perfect_and_cut_per_image(
        datasets: dict[str, tuple[str, str]]) -> None:
    """The fixture exercises what it should: mid-range AP and images past the limits."""
    for name in ("coco_mini", "lvis_mini"):
        json_file, kind = datasets[name]
        per_image = defaultdict(int)
        for det in _detections(json_file, "noisy"):
            per_image[det["image_id"]] += 1
        assert max(per_image.values()) > 300
        ap = _oracle(json_file, kind, "noisy", "bbox")[0]["AP"]
        assert 10.0 < ap < 90.0, (name, ap)


def test_curves_and_category_ap_reproduce_the_headline_numbers(
        datasets: dict[str, tuple[str, str]]) -> None:
    """Each curve averages to its metric (IoU 0.50 -> AP50, small -> APs, ...) and the
    per-category APs average to AP: the pictures show the numbers, not something near them."""
    for name in ("coco_mini", "lvis_mini"):
        json_file, kind = datasets[name]
        score = _scorer(json_file, kind, "fast").score(_detections(json_file, "noisy"), "segm")
        curves = score.curves()
        for curve, metric in (("IoU=0.50", "AP50"), ("IoU=0.75", "AP75"), ("small", "APs"),
                              ("medium", "APm"), ("large", "APl")):
            assert np.mean(curves[curve]) * 100 == pytest.approx(score.metrics[metric], abs=TOL)
        per_category = [ap for ap in score.category_ap() if not math.isnan(ap)]
        assert np.mean(per_category) == pytest.approx(score.metrics["AP"], abs=TOL)


def test_unknown_evaluator_is_refused_with_the_choices(coco_mini: Path) -> None:
    with pytest.raises(ValueError, match="choose one of: fast, official"):
        Scorer(str(coco_mini / "annotations/instances_val2017.json"), "coco", "pycocotools")


# ------------------------------------------------- the trainer's evaluator is a drop-in

def _model_outputs(gt: dict[str, Any], dets: list[dict[str, Any]], image_ids: list[int],
                   to_contiguous: dict[int, int]) -> tuple[list[dict], list[dict]]:
    """Detections as a Detectron2 model returns them (Instances with boxes, masks, classes)."""
    from detectron2.structures import Boxes, Instances

    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    inputs, outputs = [], []
    for image_id in image_ids:
        mine = [d for d in dets if d["image_id"] == image_id]
        h, w = sizes[image_id]
        inst = Instances((h, w))
        xywh = torch.tensor([d["bbox"] for d in mine], dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        inst.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float32)
        inst.pred_classes = torch.tensor([to_contiguous[d["category_id"]] for d in mine],
                                         dtype=torch.int64)
        masks = [mask_util.decode(d["segmentation"]) for d in mine]
        inst.pred_masks = (torch.from_numpy(np.stack(masks)).bool() if masks
                           else torch.zeros((0, h, w), dtype=torch.bool))
        inputs.append({"image_id": image_id, "height": h, "width": w})
        outputs.append({"instances": inst})
    return inputs, outputs


def _subset(json_file: str, folder: Path, images: int) -> Path:
    """The first ``images`` images of a ground truth, as a file of their own."""
    data = json.loads(Path(json_file).read_text())
    data["images"] = data["images"][:images]
    keep = {img["id"] for img in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = folder / Path(json_file).name
    path.write_text(json.dumps(data))
    return path


def _same_results(ours: dict[str, dict[str, float]], theirs: dict[str, dict[str, float]]) -> None:
    assert list(ours) == list(theirs)
    for task in ours:
        assert list(ours[task]) == list(theirs[task]), task
        for name, value in theirs[task].items():
            value = math.nan if value < 0 else value  # LVISEvaluator reports -1 as -100
            got = ours[task][name]
            assert (math.isnan(got) and math.isnan(value)) or abs(got - value) <= TOL, (
                task, name, got, value)


@pytest.mark.parametrize("dataset", ["coco_mini", "lvis_mini"])
def test_trainer_evaluator_returns_what_detectron2s_own_evaluator_returns(
        datasets: dict[str, tuple[str, str]], dataset: str, tmp_path: Path) -> None:
    """Same detections from a "model", same dict back: metrics and COCO's AP-<class>, with
    either evaluator; and the results file written is the one Detectron2 writes."""
    from detectron2.evaluation import COCOEvaluator, LVISEvaluator

    from transfer.datasets import register_dataset, resolve_dataset
    from transfer.evaluate import DETAILS_FILE
    from transfer.evaluator import DetectionEvaluator

    json_file, kind = datasets[dataset]
    subset = _subset(json_file, tmp_path, images=8)
    spec = resolve_dataset(str(subset), check_images=False)
    name = register_dataset(spec)
    gt = json.loads(subset.read_text())
    to_contiguous = spec.id_map or {c["id"]: c["id"] - 1 for c in gt["categories"]}
    dets = noisy_detections(gt, seed=1)
    inputs, outputs = _model_outputs(gt, dets, [img["id"] for img in gt["images"]],
                                     to_contiguous)
    tasks = ("bbox", "segm")
    if kind == "lvis":
        theirs = LVISEvaluator(name, tasks, distributed=False, output_dir=str(tmp_path / "d2"),
                               max_dets_per_image=300)
    else:
        theirs = COCOEvaluator(name, tasks, distributed=False, output_dir=str(tmp_path / "d2"),
                               use_fast_impl=False)
    theirs.reset()
    theirs.process(inputs, outputs)
    expected = theirs.evaluate()
    results_file = f"{kind}_instances_results.json"
    for evaluator in ("fast", "official"):
        ours = DetectionEvaluator(name, tasks, output_dir=str(tmp_path / evaluator),
                                  evaluator=evaluator, max_dets_per_image=300,
                                  distributed=False)
        ours.reset()
        ours.process(inputs, outputs)
        _same_results(ours.evaluate(), expected)
        assert (json.loads((tmp_path / evaluator / results_file).read_text())
                == json.loads((tmp_path / "d2" / results_file).read_text()))
        written = json.loads((tmp_path / evaluator / DETAILS_FILE).read_text())
        assert set(written["per_category"]) == set(tasks) == set(written["pr_curves"])


@pytest.mark.parametrize("dataset", ["coco_mini", "lvis_mini"])
def test_trainer_evaluator_scores_a_model_that_detects_nothing_as_the_official_api_does(
        datasets: dict[str, tuple[str, str]], dataset: str, tmp_path: Path) -> None:
    """Detectron2's evaluators give NaN for everything here; the official evaluation gives
    AP 0 wherever there is ground truth, and so does ours, with either evaluator."""
    from transfer.datasets import register_dataset, resolve_dataset
    from transfer.evaluator import DetectionEvaluator

    json_file, kind = datasets[dataset]
    subset = _subset(json_file, tmp_path, images=8)
    spec = resolve_dataset(str(subset), check_images=False)
    name = register_dataset(spec)
    gt = json.loads(subset.read_text())
    inputs, outputs = _model_outputs(gt, [], [img["id"] for img in gt["images"]], {})
    oracle = official_lvis if kind == "lvis" else official_coco
    for evaluator in ("fast", "official"):
        ours = DetectionEvaluator(name, ("bbox", "segm"), evaluator=evaluator,
                                  distributed=False)
        ours.reset()
        ours.process(inputs, outputs)
        results = ours.evaluate()
        for task in ("bbox", "segm"):
            metrics, _ = oracle(str(subset), [], task)
            assert results[task]["AP"] == 0.0
            for metric, value in metrics.items():
                got = results[task][metric]
                assert (math.isnan(got) and math.isnan(value)) or got == value, (task, metric)
