"""Private names of third-party libraries that the evaluation relies on, each with its reason.

Underscore names change without notice; gathering them here (issue 17) makes a library
upgrade a check of this one file. Add to it only what has no public way.
"""

from __future__ import annotations

from typing import Any


def empty_lvis_results(lvis_gt: Any) -> Any:
    """An ``lvis.LVISResults`` holding no detections, for ``LVISEval`` to score.

    ``LVISResults(gt, [])`` fails: it reads ``results[0]`` to tell box from mask results.
    Zero detections are still a valid input to the evaluation (a model may detect nothing),
    so build the object from one placeholder detection, remove it, and rebuild the indices
    with ``LVIS._create_index`` (private: the lvis package has no public way to re-index).
    """
    from lvis import LVISResults

    placeholder = {"image_id": lvis_gt.get_img_ids()[0], "category_id": lvis_gt.get_cat_ids()[0],
                   "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.0}
    results = LVISResults(lvis_gt, [placeholder], max_dets=-1)
    results.dataset["annotations"] = []
    results._create_index()
    return results
