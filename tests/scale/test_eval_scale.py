"""LVIS v1 at its size: 20,000 validation images × 300 detections over 1,203 categories, scored
by the fast evaluator, and the report of runs over its 1,203 categories."""

from __future__ import annotations

from .conftest import measure

IMAGES, DETS = 20_000, 300

#: A synthetic LVIS v1 val (1,203 categories: 337 rare, 461 common, 405 frequent; ~12 objects
#: an image over 3 categories, 5 negative categories an image), ``dets`` detections an image
#: (40 % near an object of a category present, 20 % of a negative category, the rest of any
#: category, anywhere), scored for bbox by ``Scorer(gt, "lvis", "fast")``.
LVIS = """
    import json, tempfile
    import numpy as np
    from transfer.scoring import Scorer
    I, C, D = {images}, 1203, {dets}
    rng = np.random.default_rng(0)
    freq = ["r"] * 337 + ["c"] * 461 + ["f"] * 405
    weight = np.array([{{"r": 0.4, "c": 4.0, "f": 40.0}}[f] for f in freq])
    weight /= weight.sum()
    cats = [{{"id": k + 1, "name": f"category_{{k}}", "frequency": freq[k],
              "synset": f"synset_{{k}}.n.01"}} for k in range(C)]
    images, anns, dets = [], [], []
    for i in range(1, I + 1):
        present = rng.choice(C, 3, replace=False, p=weight) + 1
        negative = [int(c) for c in rng.choice(C, 5) + 1 if c + 1 not in present]
        images.append({{"id": i, "height": 480, "width": 640, "neg_category_ids": negative,
                        "not_exhaustive_category_ids": [int(present[0])] if i % 10 == 0 else []}})
        wh = rng.uniform(16, 200, (12, 2))
        xy = rng.uniform(0, 1, (12, 2)) * ([640, 480] - wh)
        labels = present[rng.integers(0, 3, 12)]
        for (x, y), (w, h), c in zip(xy.tolist(), wh.tolist(), labels.tolist()):
            anns.append({{"id": len(anns) + 1, "image_id": i, "category_id": c,
                          "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                          "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}})
        near = int(0.4 * D)
        k = rng.integers(0, 12, near)
        boxes = np.concatenate([np.c_[xy[k] + rng.normal(0, 8, (near, 2)),
                                      wh[k] * np.exp(rng.normal(0, 0.2, (near, 2)))],
                                np.c_[rng.uniform(0, 440, (D - near, 2)),
                                      rng.uniform(8, 200, (D - near, 2))]])
        labels_d = np.concatenate([labels[k], rng.choice(negative or [1], int(0.2 * D)),
                                   rng.integers(1, C + 1, D - near - int(0.2 * D))])
        scores = rng.uniform(0, 1, D)
        for b, c, s in zip(boxes.round(2).tolist(), labels_d.tolist(), scores.tolist()):
            dets.append({{"image_id": i, "category_id": c, "bbox": b, "score": s}})
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({{"images": images, "annotations": anns, "categories": cats,
                    "info": {{}}, "licenses": []}}, f)
    del images, anns
    base()
    t = time.perf_counter()
    score = Scorer(f.name, "lvis", "fast").score(dets, "bbox")
    done(seconds=time.perf_counter() - t, dets=len(dets), metrics=score.metrics)
    """


def test_lvis_sized_evaluation_fits_in_8_gib() -> None:
    r = measure(LVIS.format(images=IMAGES, dets=DETS), timeout=1800)
    assert r["dets"] == IMAGES * DETS
    assert set(r["metrics"]) >= {"AP", "APr", "APc", "APf"}
    assert 0 < r["metrics"]["AP"] < 100
    # the 6M detections as Python dicts (the results file loaded) are ~3 GiB of it
    assert r["peak_mib"] < 8 * 1024, r


#: Five pretraining methods × three seeds on LVIS v1 (1,203 categories, bbox and segm, each
#: run's per-category AP and precision–recall curves), side by side by ``write_report``.
REPORT = """
    import tempfile
    from pathlib import Path
    import numpy as np
    from transfer.report import write_report, write_run_results
    from transfer.scoring import CURVES, RECALL
    freq = ["r"] * 337 + ["c"] * 461 + ["f"] * 405
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp())
    runs = []
    for method in ("m2t", "byol", "eman", "supervised", "random"):
        for seed in range(3):
            metrics = {t: {n: float(rng.uniform(5, 40)) for n in
                           ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")}
                       for t in ("bbox", "segm")}
            cats = {t: [{"id": k + 1, "name": f"category_{k}", "frequency": freq[k],
                         "AP": None if k % 50 == 7 else float(rng.uniform(0, 60))}
                        for k in range(1203)] for t in ("bbox", "segm")}
            curves = {t: {c: rng.uniform(0, 1, len(RECALL)).tolist() for c in CURVES}
                      for t in ("bbox", "segm")}
            run = tmp / f"{method}-s{seed}"
            write_run_results(run, metrics, {"method": method, "config": "mask_rcnn_lvis",
                                             "seed": seed, "test_dataset": "lvis_v1_val"},
                              {"per_category": cats, "pr_curves": curves})
            runs.append(run)
    base()
    t = time.perf_counter()
    md, png = write_report(runs, tmp / "report")
    text = md.read_text()
    done(seconds=time.perf_counter() - t, text=text, kib=len(text.encode()) / 1024,
         png_kib=png.stat().st_size / 1024)
    """


def test_the_report_over_1203_categories_is_quick_and_folds_its_tables() -> None:
    r = measure(REPORT)
    assert r["seconds"] < 60, r["seconds"]
    assert r["peak_mib"] - r["base_mib"] < 512, r
    lines = r["text"].splitlines()
    # the headline table (a row a method, mean ± std over seeds) and the per-seed one come
    # first, unfolded; the per-category tables after them, folded
    head = lines[:lines.index("<details>")]
    assert sum(line.startswith("| m2t | 3 |") for line in head) == 1
    assert sum(line.startswith("| m2t | ") for line in head) == 1 + 3
    assert head[-2:] == ["### Per-category AP (mean over each method's runs)", ""]
    # then one folded table a frequency group, each category once (those with an AP)
    summaries = [line for line in lines if line.startswith("<summary>")]
    assert summaries == ["<summary>AP per category: rare categories (330)</summary>",
                         "<summary>AP per category: common categories (452)</summary>",
                         "<summary>AP per category: frequent categories (397)</summary>"]
    rows = [line for line in lines if line.startswith("| category_")]
    assert len(rows) == 1203 - 24  # every 50th category (from the 8th) has no AP
    assert all(rows.count(row) == 1 for row in rows[:20])
    assert "24 categories without ground truth in the test set are not listed." in lines
