"""The two evaluators behind every COCO / LVIS number: ``fast`` (the default) and ``official``.

- ``fast``: faster-coco-eval's ``COCOeval_faster`` (C++ matching and accumulation), in COCO
  mode or in LVIS mode (``lvis_style``: federated filtering by each image's positive and
  negative categories, no false positives on not-exhaustively annotated categories,
  APr/APc/APf by frequency group).
- ``official``: pycocotools' ``COCOeval`` and the lvis package's ``LVISEval`` (pure Python),
  the APIs Detectron2's ``COCOEvaluator`` (``use_fast_impl=False``) and ``LVISEvaluator`` call.

Both run under Detectron2's conventions (SPEC §4): segm results are scored without their
``bbox`` field, so that an instance's area (APs/APm/APl) is its mask area; COCO counts at most
1/10/100 detections per image; LVIS first keeps each image's ``max_dets_per_image`` (300)
highest-scoring detections, the lvis package's own rule, then matches at most 300 per image
and category. Given the same input the two return the same numbers (``tests/transfer/
test_evaluate_backends.py`` holds them to 1e-6 of each other, on real COCO and LVIS data).

Zero detections: neither official API can load an empty result list (both read
``results[0]``), but the evaluation itself is defined: every category with ground truth is
missed entirely, so AP is 0 where there is ground truth and not measurable (NaN) where there
is none. Both evaluators return exactly that.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compat  # noqa: F401  (np.float for the lvis package)

#: The evaluator names, the default first.
EVALUATORS = ("fast", "official")
COCO_MAX_DETS = (1, 10, 100)
#: LVIS's limit, per image (the results are cut to it) and per image and category (matching).
LVIS_MAX_DETS = 300
COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_NAMES = COCO_NAMES + ("APr", "APc", "APf")
#: The precision–recall curves kept for reports: all areas at IoU 0.50 and 0.75, and each
#: area range averaged over IoU 0.50:0.95 (so that each curve's mean is AP50, AP75, APs, ...).
CURVES = ("IoU=0.50", "IoU=0.75", "small", "medium", "large")
#: Recall at which every curve is sampled (COCO's 101 points, as in its accumulate()).
RECALL = np.linspace(0.0, 1.0, 101)
#: The fast evaluator scores category by category when fewer than this share of the (image,
#: category) pairs hold ground truth or a detection (on the benchmark's files: COCO-val-sized
#: 40%, one pass over all pairs is faster; LVIS-sized 1.5%, category by category is).
PER_CATEGORY_BELOW = 0.25
_FAST_NAMES = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small",
               "APm": "AP_medium", "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf"}


def check_evaluator(name: str) -> str:
    """``name`` if it is one of :data:`EVALUATORS`, else ``ValueError`` listing them."""
    if name not in EVALUATORS:
        raise ValueError(f"unknown evaluator {name!r}; choose one of: {', '.join(EVALUATORS)}")
    return name


@dataclass
class TaskScore:
    """What one task (``bbox`` or ``segm``) scored.

    ``metrics`` are in percent (NaN where not measurable, as Detectron2 reports them);
    ``precision`` is COCO's accumulated array at the largest detection limit, indexed
    [IoU threshold (0.50:0.05:0.95), recall threshold (:data:`RECALL`), category, area range
    (all, small, medium, large)], -1 where a category has no ground truth in that range.
    """

    task: str
    metrics: dict[str, float]
    precision: np.ndarray
    categories: list[dict[str, Any]] = field(default_factory=list)

    def category_ap(self) -> list[float]:
        """AP (percent) of each category in :attr:`categories` order, over all areas; NaN
        without ground truth (Detectron2's per-category formula)."""
        out = []
        for k in range(self.precision.shape[2]):
            p = self.precision[:, :, k, 0]
            p = p[p > -1]
            out.append(float(np.mean(p)) * 100 if p.size else math.nan)
        return out

    def curves(self) -> dict[str, list[float]]:
        """Precision at each :data:`RECALL` point, averaged over the categories with ground
        truth, for each of :data:`CURVES` (NaN where no category has ground truth)."""
        iou = np.linspace(0.5, 0.95, 10)
        picks = {"IoU=0.50": (np.isclose(iou, 0.5), 0), "IoU=0.75": (np.isclose(iou, 0.75), 0),
                 "small": (slice(None), 1), "medium": (slice(None), 2), "large": (slice(None), 3)}
        out = {}
        for name, (t, a) in picks.items():
            p = self.precision[t, :, :, a]  # [T, R, K]
            valid = p[0, 0] > -1
            if not valid.any():
                out[name] = [math.nan] * len(RECALL)
            else:
                out[name] = [float(x) for x in p[:, :, valid].mean(axis=(0, 2))]
        return out


def _metric(value: float) -> float:
    return float(value) * 100 if value >= 0 else math.nan


def top_per_image(detections: Iterable[dict[str, Any]], max_dets: int) -> list[dict[str, Any]]:
    """The lvis package's cut (``LVISResults.limit_dets_per_image``): each image's ``max_dets``
    highest-scoring detections, grouped by image in order of first appearance."""
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for det in detections:
        by_image[det["image_id"]].append(det)
    for image_id, dets in by_image.items():
        if len(dets) > max_dets:
            by_image[image_id] = sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]
    return [d for dets in by_image.values() for d in dets]


class Scorer:
    """Scores detections against one ground-truth file with the chosen evaluator.

    Args:
        json_file: a COCO- or LVIS-format annotation file.
        kind: ``"coco"`` or ``"lvis"`` (LVIS: federated evaluation and APr/APc/APf).
        evaluator: one of :data:`EVALUATORS`.
        max_dets_per_image: LVIS only, the per-image cut (default 300, LVIS's own).

    The ground truth is loaded once and shared by the tasks, as Detectron2's evaluators do.
    """

    def __init__(self, json_file: str, kind: str = "coco", evaluator: str = "fast",
                 max_dets_per_image: int | None = None) -> None:
        if kind not in ("coco", "lvis"):
            raise ValueError(f"kind must be 'coco' or 'lvis', not {kind!r}")
        self.kind = kind
        self.evaluator = check_evaluator(evaluator)
        self.max_dets_per_image = max_dets_per_image or LVIS_MAX_DETS
        with contextlib.redirect_stdout(io.StringIO()):
            if evaluator == "fast":
                from faster_coco_eval import COCO as FastCOCO

                with warnings.catch_warnings():  # id 0 is renumbered below (_renumber)
                    warnings.filterwarnings("ignore", message="Found annotation id 0")
                    self.gt = FastCOCO(json_file)
                anns = self.gt.dataset["annotations"]
                if kind == "lvis" and any(a["area"] <= 0 for a in anns):
                    # LVISEval reads the ground truth through LVIS.get_ann_ids too, which keeps
                    # 0 < area only: an object of area 0 is neither found nor missed
                    self.gt.dataset["annotations"] = [a for a in anns if a["area"] > 0]
                    self.gt.createIndex()
            elif kind == "lvis":
                from lvis import LVIS

                self.gt = LVIS(json_file)
            else:
                from pycocotools.coco import COCO

                self.gt = COCO(json_file)
            self._image_ids = _renumber(self.gt)
        cats = self.gt.dataset["categories"]
        if kind == "lvis" and any(c.get("frequency") not in ("r", "c", "f") for c in cats):
            raise ValueError(f"{json_file}: LVIS evaluation needs each category's 'frequency' "
                             f"(r, c or f), for APr, APc and APf")
        self.categories = [{k: c[k] for k in ("id", "name", "frequency") if k in c}
                           for c in sorted(cats, key=lambda c: c["id"])]
        self._judged: dict[int, set[int]] | None = None
        # A category without ground truth has no AP (precision -1 throughout, whatever was
        # detected), so the fast evaluator scores only the others: its per-(image, category)
        # set-up costs images × categories, and LVIS has 1,230 or 1,203 categories.
        self._gt_by_category: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in self.gt.dataset["annotations"]:
            self._gt_by_category[ann["category_id"]].append(ann)
        self._scored = [i for i, c in enumerate(self.categories)
                        if c["id"] in self._gt_by_category]
        if kind == "lvis" and evaluator == "fast":
            # LVIS judges an image only on its positive and negative categories.
            judged: dict[int, set[int]] = defaultdict(set)
            for img in self.gt.dataset["images"]:
                judged[img["id"]].update(img.get("neg_category_ids", []))
            for ann in self.gt.dataset["annotations"]:
                judged[ann["image_id"]].add(ann["category_id"])
            self._judged = dict(judged)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return LVIS_NAMES if self.kind == "lvis" else COCO_NAMES

    def score(self, detections: Sequence[Mapping[str, Any]], task: str) -> TaskScore:
        """Score ``detections`` (COCO results format, dataset category ids) for ``task``.

        The input is not modified; an empty list is valid (see the module docstring).
        """
        if task not in ("bbox", "segm"):
            raise ValueError(f"task must be 'bbox' or 'segm', not {task!r}")
        with _collector_paused():
            return self._score(list(detections), task)

    def _score(self, dets: list[Mapping[str, Any]], task: str) -> TaskScore:
        if self._image_ids is not None:  # the ground truth's renumbering (see _renumber)
            dets = [dict(d, image_id=self._image_ids[d["image_id"]]) for d in dets]
        if self.evaluator == "fast" and self.kind == "lvis" and self._judged is not None:
            dets = self._federated(dets)
        # The APIs write area, id, ... into each result: give them shallow copies. For segm,
        # drop the box so that areas are mask areas (Detectron2's convention).
        dets = [dict(d) for d in dets]
        if task == "segm":
            for d in dets:
                d.pop("bbox", None)
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logger("lvis.results"):
            if self.evaluator == "fast":
                metrics, precision = self._fast(dets, task)
            elif self.kind == "lvis":
                metrics, precision = self._official_lvis(dets, task)
            else:
                metrics, precision = self._official_coco(dets, task)
        return TaskScore(task, metrics, precision, self.categories)

    def _fast(self, dets: list[dict[str, Any]], task: str) -> tuple[dict[str, float], np.ndarray]:
        """faster-coco-eval's evaluation and accumulation, then its ``summarize`` over the
        precision and recall of every category.

        A category's precision and recall depend only on the images where it has ground truth
        or a detection (COCOeval skips every other image). One evaluation over all categories
        loops over every (image, category) pair, in Python and in C++; where most pairs are
        empty (LVIS: on v1 val 24 million pairs, about 1% of them with anything in them) each
        category is evaluated on its own images instead, which gives the same arrays.
        """
        from faster_coco_eval import COCO as FastCOCO
        from faster_coco_eval import COCOeval_faster

        lvis = self.kind == "lvis"
        dets, areas = self._results(dets, task)
        whole = COCOeval_faster(self.gt, None, task, lvis_style=lvis, print_function=_quiet)
        whole.params.maxDets = [LVIS_MAX_DETS] if lvis else list(COCO_MAX_DETS)
        whole.params.catIds = [c["id"] for c in self.categories]
        p = whole.params
        shape = (len(p.iouThrs), len(p.recThrs), len(self.categories), len(p.areaRng),
                 len(p.maxDets))
        # -1: no ground truth (COCOeval's own filler), which every summary leaves out
        precision, recall = np.full(shape, -1.0), np.full(shape[:1] + shape[2:], -1.0)

        scored = [self.categories[k]["id"] for k in self._scored]
        by_category: dict[int, list[int]] = defaultdict(list)
        for i, d in enumerate(dets):
            by_category[d["category_id"]].append(i)
        images = {c: {a["image_id"] for a in self._gt_by_category[c]}.union(
            dets[i]["image_id"] for i in by_category[c]) for c in scored}
        pairs = len(self.gt.imgs) * len(scored)
        if sum(map(len, images.values())) < PER_CATEGORY_BELOW * pairs:
            for k, c in zip(self._scored, scored, strict=True):
                gt = FastCOCO({"images": [self.gt.imgs[i] for i in sorted(images[c])],
                               "categories": [self.gt.cats[c]],
                               "annotations": self._gt_by_category[c]})
                mine = by_category[c]
                precision[:, :, [k]], recall[:, [k]] = self._evaluate(
                    gt, [dets[i] for i in mine],
                    None if areas is None else [areas[i] for i in mine], task, [c], p.maxDets)
        elif scored:
            precision[:, :, self._scored], recall[:, self._scored] = self._evaluate(
                self.gt, dets, areas, task, scored, p.maxDets)

        whole.eval = {"precision": precision, "recall": recall}
        if lvis:  # the category indices of each frequency group, as LVIS mode's own set-up
            whole.freq_groups = [[k for k, c in enumerate(self.categories)
                                  if c.get("frequency") == label] for label in p.imgCountLbl]
        whole.summarize()
        stats = whole.stats_as_dict
        metrics = {name: _metric(stats[_FAST_NAMES[name]]) for name in self.metric_names}
        return metrics, precision[..., -1]

    def _evaluate(self, gt: Any, dets: list[dict[str, Any]], areas: list[float] | None,
                  task: str, category_ids: list[int],
                  max_dets: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """faster-coco-eval's precision [T, R, K, A, M] and recall [T, K, A, M] of
        ``category_ids`` (in that order) for ``dets`` against ``gt``."""
        from faster_coco_eval import COCOeval_faster

        results = gt.loadRes(dets)
        if areas is not None:  # the mask areas, see _results
            for d, area in zip(results.dataset["annotations"], areas, strict=True):
                d["area"] = area
        ev = COCOeval_faster(gt, results, task, lvis_style=self.kind == "lvis",
                             print_function=_quiet)
        ev.params.maxDets = list(max_dets)
        ev.params.catIds = list(category_ids)
        ev.evaluate()
        ev.accumulate()
        return ev.eval["precision"], ev.eval["recall"]

    def _federated(self, dets: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """LVIS's per-image cut, then its federated rule: detections of a category neither
        positive nor negative in their image are not evaluated. faster-coco-eval 1.8.0
        applies the rule too, but fails (IndexError "unordered_map::at") when such a detection
        is in an image with no ground truth and no kept detection; applying it here, after the
        cut as LVISEval does, changes no number, avoids that, and keeps those detections out
        of every later step."""
        judged = self._judged or {}
        return [d for d in top_per_image(dets, self.max_dets_per_image)
                if d["category_id"] in judged.get(d["image_id"], ())]

    def _results(self, dets: list[dict[str, Any]],
                 task: str) -> tuple[list[dict[str, Any]], list[float] | None]:
        """The results to load, and for segm their mask areas.

        ``loadRes`` would take each mask's area and box in a Python loop (about 30 µs a
        detection). Instead the areas come from one call over all the masks, and each result
        gets an empty box, so that loadRes takes its box branch (which keeps the mask and sets
        id and iscrowd); :meth:`_evaluate` then puts the mask areas in place of the box areas.
        The segm evaluation reads no box: IoUs come from the masks, and the matching reads
        area, score and the crowd and ignore flags.

        LVIS: ``LVISEval`` reads results through ``LVIS.get_ann_ids``, which keeps 0 < area
        only, so an empty mask (or a box of no width) is not evaluated at all, where
        faster-coco-eval would count it as a false positive: such results are left out.
        """
        lvis = self.kind == "lvis"
        if task != "segm":
            if lvis:
                dets = [d for d in dets if d["bbox"][2] * d["bbox"][3] > 0]
            return dets, None
        from faster_coco_eval.core import mask as mask_api

        areas = mask_api.area([d["segmentation"] for d in dets]) if dets else np.zeros(0)
        if lvis:
            keep = areas > 0
            dets, areas = [d for d, k in zip(dets, keep.tolist(), strict=True) if k], areas[keep]
        for d in dets:
            d["bbox"] = [0.0, 0.0, 0.0, 0.0]
        return dets, areas.tolist()

    def _official_coco(self, dets: list[dict[str, Any]],
                       task: str) -> tuple[dict[str, float], np.ndarray]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if dets:
            dt = self.gt.loadRes(dets)
        else:  # loadRes reads dets[0]; an empty result set built the way loadRes builds one
            dt = COCO()
            dt.dataset = {"images": list(self.gt.dataset["images"]),
                          "categories": list(self.gt.dataset["categories"]), "annotations": []}
            dt.createIndex()
        ev = COCOeval(self.gt, dt, task)
        ev.params.maxDets = list(COCO_MAX_DETS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        metrics = {name: _metric(ev.stats[i]) for i, name in enumerate(COCO_NAMES)}
        return metrics, np.asarray(ev.eval["precision"])[..., -1]

    def _official_lvis(self, dets: list[dict[str, Any]],
                       task: str) -> tuple[dict[str, float], np.ndarray]:
        from lvis import LVISEval, LVISResults

        from ._private import empty_lvis_results

        if dets:
            dt = LVISResults(self.gt, dets, max_dets=self.max_dets_per_image)
        else:
            dt = empty_lvis_results(self.gt)
        ev = LVISEval(self.gt, dt, task)
        ev.run()
        results = ev.get_results()
        metrics = {name: _metric(results[name]) for name in LVIS_NAMES}
        return metrics, np.asarray(ev.eval["precision"])


#: Ids outside these bounds are renumbered before scoring (see :func:`_renumber`).
_ID_RANGE = (1, 2**31 - 1)


def _renumber(gt: Any) -> dict[Any, int] | None:
    """Renumber, in place, ground-truth ids the scoring code cannot take as they are.

    - Annotation ids below 1 or past 32 bits: both evaluators record a match as the matched
      object's id, and read id 0 as "no match" (pycocotools, lvis), a negative one or one past
      64 bits wrongly too (faster-coco-eval), so such a file scored lower than it should. An
      annotation's id is only its name: they become 1..N in the file's order.
    - Image ids below 0 or past 32 bits: faster-coco-eval's C++ takes no negative id (a
      TypeError that printed the whole ground truth), and pycocotools' ``np.unique`` of ids
      past 2**53 makes floats of them, which no longer find their images. They become their
      rank among the sorted ids, which keeps every image's order (COCOeval sorts by id), so
      that the numbers are those of the same file with ordinary ids; returns that mapping,
      for the detections.

    Files whose ids are in range (every real dataset's) are left untouched: returns None.
    """
    low, high = _ID_RANGE
    anns, images = gt.dataset["annotations"], gt.dataset["images"]
    changed = False
    if any(not low <= a["id"] <= high for a in anns):
        for k, ann in enumerate(anns, start=1):
            ann["id"] = k
        changed = True
    mapping = None
    if any(not 0 <= img["id"] <= high for img in images):
        mapping = {i: k for k, i in enumerate(sorted(img["id"] for img in images))}
        for img in images:
            img["id"] = mapping[img["id"]]
        for ann in anns:
            ann["image_id"] = mapping[ann["image_id"]]
        changed = True
    if changed and hasattr(gt, "createIndex"):  # pycocotools, faster-coco-eval
        gt.createIndex()
    elif changed:  # the lvis package
        from ._private import reindex_lvis

        reindex_lvis(gt)
    return mapping


def _quiet(*args: Any, **kwargs: Any) -> None:
    """faster-coco-eval's print_function: its progress lines are not ours to print."""


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off within the block, for either evaluator.

    Scoring builds a few dicts per detection, millions in all, few of them in reference
    cycles (those are collected after the block). A full collection walks every live object,
    and the collector starts one each time the live objects grew by a quarter: 15–20% of the
    fast evaluator's time on the LVIS-sized benchmark (``benchmarks/eval_speed.py``).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Within the block, ``name`` logs errors only (lvis warns on every in-memory result list
    that it assumes the format is right; ours is checked)."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def details(scores: Mapping[str, TaskScore], digits: int = 4) -> dict[str, Any]:
    """What reports draw from a scoring besides the headline metrics, JSON-ready:

    ``{"per_category": {task: [{"id", "name", ["frequency",] "AP"}, ...]},
    "pr_curves": {task: {curve: [101 precisions]}}}``; AP in percent, precision in [0, 1],
    ``None`` where not measurable; recall points are :data:`RECALL`.
    """
    def clean(x: float) -> float | None:
        return None if math.isnan(x) else round(x, digits)

    per_category: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, dict[str, list[float | None]]] = {}
    for task, score in scores.items():
        per_category[task] = [dict(cat, AP=clean(ap))
                              for cat, ap in zip(score.categories, score.category_ap(),
                                                 strict=True)]
        curves[task] = {name: [clean(x) for x in values]
                        for name, values in score.curves().items()}
    return {"per_category": per_category, "pr_curves": curves}
