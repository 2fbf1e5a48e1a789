"""The trainer's COCO / LVIS evaluator: Detectron2's ``DatasetEvaluator`` interface over
:class:`~transfer.scoring.Scorer` (kept apart from :mod:`transfer.evaluate`, so that scoring
a results file does not import Detectron2's training stack)."""

from __future__ import annotations

import itertools
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from jobs.atomic import write_text

from .evaluate import DETAILS_FILE
from .scoring import Scorer, TaskScore, check_evaluator, details

logger = logging.getLogger(__name__)


class DetectionEvaluator(DatasetEvaluator):
    """The trainer's COCO / LVIS evaluator (boxes and masks), with a choice of evaluator.

    A drop-in for Detectron2's ``COCOEvaluator`` (``use_fast_impl=False``) and
    ``LVISEvaluator``: the same detections (``instances_to_coco_json``), gathered from every
    process, mapped back to the dataset's category ids and written to
    ``coco_instances_results.json`` / ``lvis_instances_results.json`` in ``output_dir``; the
    same returned dict (``{task: {"AP": ..., ...}}`` in percent, NaN where not measurable, and
    ``AP-<class>`` per category for COCO). Two differences: the scoring goes through
    :class:`~transfer.scoring.Scorer` (``fast`` by default), and a model that detects nothing
    gets the numbers the official evaluation gives for that (AP 0 where there is ground
    truth) instead of NaN everywhere. Per-category AP and precision–recall curves go to
    ``output_dir/evaluation_details.json`` (see :func:`read_details`).

    Args:
        dataset_name: a registered dataset whose metadata has ``json_file`` and
            ``evaluator_type`` (``"coco"`` or ``"lvis"``), as :func:`register_dataset` sets.
        tasks: ``("bbox",)`` or ``("bbox", "segm")``.
        output_dir: where the results file and the details go (none written if ``None``).
        evaluator: ``"fast"`` or ``"official"``.
        max_dets_per_image: LVIS's per-image cut (default 300).
        distributed: gather the detections of every process and score on the main one.
    """

    def __init__(self, dataset_name: str, tasks: Sequence[str] = ("bbox", "segm"),
                 output_dir: str | None = None, *, evaluator: str = "fast",
                 max_dets_per_image: int | None = None, distributed: bool = True) -> None:
        meta = MetadataCatalog.get(dataset_name)
        self.kind = "lvis" if meta.get("evaluator_type") == "lvis" else "coco"
        self.json_file = meta.json_file
        self.tasks = tuple(tasks)
        self.output_dir = output_dir
        self.evaluator = check_evaluator(evaluator)
        self.max_dets_per_image = max_dets_per_image
        self.distributed = distributed
        mapping = meta.get("thing_dataset_id_to_contiguous_id", None)
        # Detectron2's rule: the dataset's mapping if it has one, else LVIS's ids 1..N.
        self.dataset_ids = {v: k for k, v in mapping.items()} if mapping else None
        self.class_names = list(meta.get("thing_classes", []))
        self.details: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self._detections: list[dict[str, Any]] = []

    def process(self, inputs: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs, strict=True):
            if "instances" in out:
                self._detections.extend(instances_to_coco_json(out["instances"].to("cpu"),
                                                               inp["image_id"]))

    def evaluate(self) -> dict[str, dict[str, float]]:
        if self.distributed:
            comm.synchronize()
            gathered = comm.gather(self._detections, dst=0)
            if not comm.is_main_process():
                return {}
            detections = list(itertools.chain(*gathered))
        else:
            detections = list(self._detections)
        for det in detections:
            cat = det["category_id"]
            det["category_id"] = self.dataset_ids[cat] if self.dataset_ids else cat + 1
        if self.output_dir:
            Path(self.output_dir).mkdir(parents=True, exist_ok=True)
            path = Path(self.output_dir) / f"{self.kind}_instances_results.json"
            write_text(path, json.dumps(detections))

        scorer = Scorer(self.json_file, self.kind, self.evaluator, self.max_dets_per_image)
        results: dict[str, dict[str, float]] = OrderedDict()
        scores: dict[str, TaskScore] = {}
        for task in sorted(self.tasks):
            score = scores[task] = scorer.score(detections, task)
            logger.info(f"Evaluation results for {task} ({len(detections)} detections, "
                        f"{self.evaluator} evaluator):\n" + create_small_table(score.metrics))
            results[task] = dict(score.metrics)
            if self.kind == "coco" and len(self.class_names) > 1:
                results[task].update({f"AP-{name}": ap for name, ap in
                                      zip(self.class_names, score.category_ap(), strict=True)})
        self.details = details(scores)
        if self.output_dir:
            write_text(Path(self.output_dir) / DETAILS_FILE, json.dumps(self.details) + "\n")
        return results
