"""COCO / LVIS evaluation time and memory: the fast evaluator against the official APIs.

    .venv/bin/python benchmarks/eval_speed.py                   # about 10 min on 2 CPU cores
    .venv/bin/python benchmarks/eval_speed.py --coco-images 500 --lvis-images 200   # smoke run

Two results files are generated from the real annotations in ``../shared/data`` with noise:

- **COCO-val-sized**: ``--coco-images`` (5,000, COCO val2017's count) images with
  ``--coco-dets`` (100) detections each, boxes and RLE masks: the 206 ``coco_mini`` val images
  repeated with fresh noise, each image's objects found with jittered boxes and outlines
  (10 % missed, 20 % duplicated), the rest false positives, mostly of the image's own
  categories, half of them near an object;
- **LVIS-sized**: ``--lvis-images`` images (2,000 by default, a tenth of LVIS v1 val's
  19,809: the official API on the full size would not fit this benchmark's budget on 2 cores)
  with ``--lvis-dets`` (300, LVIS's limit) detections each over the 62 ``lvis_mini`` images
  (v0.5, 1,230 categories; each repeat renames every category to another of the same
  frequency, so that ground truth covers about half the categories, not 139), false positives
  of positive, negative and unjudged categories (the last are dropped by the federated
  evaluation, as a real detector's are).

Scores are unrounded floats, as a detector's are (few ties).

Each (dataset, evaluator) pair is scored in a fresh process (``transfer.scoring.Scorer``:
load the ground truth, then ``bbox`` and ``segm``, as ``m2t-transfer evaluate`` and the
trainer do), the evaluators alternating; the child reports wall and CPU time per step and its
peak resident memory (``ru_maxrss``) before and after scoring. The numbers every evaluator
reports are compared: the fast ones must equal the official ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import REPO, machine, md_table, write_results  # noqa: E402

DATA = Path(os.environ.get("MOMENTUM2_DATA", REPO.parent / "shared" / "data"))
COCO_SOURCE = DATA / "coco_mini" / "annotations" / "instances_val2017.json"
LVIS_SOURCE = DATA / "lvis_mini" / "lvis_v0.5_val_subset.json"
EVALUATORS = ("official", "fast")
#: Images in COCO val2017 and in LVIS v1 val, the sizes the files imitate.
REAL_IMAGES = {"coco": 5000, "lvis": 19809}
TASKS = ("bbox", "segm")


# ----------------------------------------------------------------------------- generation

def _rle(polygons: list[list[float]], h: int, w: int, merge: bool = True) -> list[dict] | dict:
    import pycocotools.mask as mask_util

    rles = mask_util.frPyObjects(polygons, h, w)
    if merge:
        rles = [mask_util.merge(rles)]
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles[0] if merge else rles


def _jitter_polygons(seg: list[list[float]], dx: float, dy: float, scale: float,
                     cx: float, cy: float, rng: random.Random, wobble: float) -> list[list[float]]:
    return [[(cx + (v - cx) * scale + dx + rng.gauss(0, wobble)) if i % 2 == 0 else
             (cy + (v - cy) * scale + dy + rng.gauss(0, wobble)) for i, v in enumerate(poly)]
            for poly in seg]


def generate(source: Path, images: int, dets_per_image: int, seed: int,
             lvis: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ground truth of ``images`` images (the source's, repeated) and its noisy results."""
    src = json.loads(source.read_text())
    rng = random.Random(seed)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in src["annotations"]:
        by_image[ann["image_id"]].append(ann)
    cat_ids = [c["id"] for c in src["categories"]]
    same_frequency: dict[Any, list[int]] = defaultdict(list)
    for c in src["categories"]:
        same_frequency[c.get("frequency")].append(c["id"])
    gt_images, gt_anns, dets = [], [], []
    relabel: dict[int, int] = {}
    for i in range(images):
        s = src["images"][i % len(src["images"])]
        if lvis and i % len(src["images"]) == 0:
            # each repeat of the LVIS images renames every category to another of the same
            # frequency, so that ground truth spreads over many categories as in LVIS val,
            # not over the 139 of the 62 lvis_mini images only
            relabel = {}
            for ids in same_frequency.values():
                relabel.update(zip(ids, rng.sample(ids, len(ids)) if i else ids, strict=True))
        image_id = i + 1
        objects = [{**a, "category_id": relabel.get(a["category_id"], a["category_id"])}
                   for a in by_image[s["id"]]]
        image = {**s, "id": image_id}
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in s:
                image[key] = [relabel.get(c, c) for c in s[key]]
        gt_images.append(image)
        h, w = s["height"], s["width"]
        for ann in objects:
            gt_anns.append({**ann, "id": len(gt_anns) + 1, "image_id": image_id})
        present = sorted({a["category_id"] for a in objects})
        negative = list(image.get("neg_category_ids", []))
        mine: list[dict[str, Any]] = []
        for ann in objects:
            if ann.get("iscrowd") or not isinstance(ann["segmentation"], list):
                continue
            for copy in range(2 if rng.random() < 0.2 else 1):
                if rng.random() < 0.1:
                    continue
                x, y, bw, bh = ann["bbox"]
                dx, dy = rng.gauss(0, 0.08 * bw), rng.gauss(0, 0.08 * bh)
                scale = math.exp(rng.gauss(0, 0.08 * (copy + 1)))
                seg = _jitter_polygons(ann["segmentation"], dx, dy, scale, x + bw / 2,
                                       y + bh / 2, rng, 0.02 * max(bw, bh))
                mine.append({"image_id": image_id, "category_id": ann["category_id"],
                             "bbox": [x + bw / 2 * (1 - scale) + dx, y + bh / 2 * (1 - scale) + dy,
                                      bw * scale, bh * scale],
                             "score": rng.uniform(0.3, 1.0) / (copy + 1),
                             "segmentation": _rle(seg, h, w)})
        boxes = []
        while len(mine) + len(boxes) < dets_per_image:
            r = rng.random()
            if lvis:
                cat = (rng.choice(present) if r < 0.4 and present else
                       rng.choice(negative) if r < 0.6 and negative else rng.choice(cat_ids))
            else:
                cat = rng.choice(present) if r < 0.6 and present else rng.choice(cat_ids)
            if objects and rng.random() < 0.5:
                x, y, bw, bh = rng.choice(objects)["bbox"]
                x += rng.uniform(-0.8, 0.8) * bw
                y += rng.uniform(-0.8, 0.8) * bh
                bw *= math.exp(rng.gauss(0, 0.3))
                bh *= math.exp(rng.gauss(0, 0.3))
            else:
                bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            x, y = min(max(x, 0.0), w - 2.0), min(max(y, 0.0), h - 2.0)
            bw, bh = max(1.0, min(bw, w - x)), max(1.0, min(bh, h - y))
            boxes.append((cat, [x, y, bw, bh], rng.uniform(0.0, 0.6)))
        rects = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh] for _, (x, y, bw, bh), _ in boxes]
        masks = _rle(rects, h, w, merge=False) if rects else []
        for (cat, box, score), mask in zip(boxes, masks, strict=True):
            mine.append({"image_id": image_id, "category_id": cat, "bbox": box, "score": score,
                         "segmentation": mask})
        dets.extend(mine[:dets_per_image])
    gt = {key: value for key, value in src.items() if key not in ("images", "annotations")}
    gt.update(images=gt_images, annotations=gt_anns)
    return gt, dets


# ----------------------------------------------------------------------------- measuring

def _usage() -> tuple[float, float]:
    """(CPU seconds of this process so far, peak resident MiB so far)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_maxrss / 1024


def child(gt: str, dets_file: str, kind: str, evaluator: str) -> dict[str, Any]:
    """Score one results file in this (fresh) process; what it cost, and what it reported."""
    from transfer.scoring import Scorer

    dets = json.loads(Path(dets_file).read_text())
    cpu0, rss_before = _usage()
    out: dict[str, Any] = {"evaluator": evaluator, "kind": kind, "detections": len(dets),
                           "rss_before_mib": round(rss_before, 1), "wall_s": {}, "cpu_s": {},
                           "metrics": {}}
    start = time.perf_counter()
    scorer = Scorer(gt, kind, evaluator)
    out["wall_s"]["ground truth"] = time.perf_counter() - start
    out["cpu_s"]["ground truth"] = _usage()[0] - cpu0
    for task in TASKS:
        cpu, t = _usage()[0], time.perf_counter()
        out["metrics"][task] = scorer.score(dets, task).metrics
        out["wall_s"][task] = time.perf_counter() - t
        out["cpu_s"][task] = _usage()[0] - cpu
    out["wall_s"]["total"] = time.perf_counter() - start
    out["cpu_s"]["total"] = _usage()[0] - cpu0
    out["peak_rss_mib"] = round(_usage()[1], 1)
    return out


def run_child(gt: Path, dets: Path, kind: str, evaluator: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", str(gt), str(dets), kind, evaluator]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"the {evaluator} {kind} evaluation failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind} {evaluator}: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                 result["wall_s"].items())
          + f"; peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def _max_difference(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> float:
    diffs = []
    for task in a:
        for name, x in a[task].items():
            y = b[task][name]
            if math.isnan(x) or math.isnan(y):
                diffs.append(0.0 if math.isnan(x) and math.isnan(y) else math.inf)
            else:
                diffs.append(abs(x - y))
    return max(diffs)


# ----------------------------------------------------------------------------- report

def _section(label: str, size: str, runs: dict[str, dict[str, Any]]) -> tuple[str, dict]:
    off, fast = runs["official"], runs["fast"]
    rows = []
    for name in ("official", "fast"):
        r = runs[name]
        rows.append([name, f"{r['wall_s']['ground truth']:.1f}", f"{r['wall_s']['bbox']:.1f}",
                     f"{r['wall_s']['segm']:.1f}", f"**{r['wall_s']['total']:.1f}**",
                     f"{r['cpu_s']['total']:.1f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f}"])
    ratio = {step: off["wall_s"][step] / fast["wall_s"][step] for step in off["wall_s"]}
    cpu_ratio = off["cpu_s"]["total"] / fast["cpu_s"]["total"]
    mem_ratio = ((off["peak_rss_mib"] - off["rss_before_mib"])
                 / max(1e-9, fast["peak_rss_mib"] - fast["rss_before_mib"]))
    rows.append(["official / fast", f"{ratio['ground truth']:.2f}×", f"{ratio['bbox']:.2f}×",
                 f"{ratio['segm']:.2f}×", f"**{ratio['total']:.2f}×**", f"{cpu_ratio:.2f}×",
                 f"{off['peak_rss_mib'] / fast['peak_rss_mib']:.2f}×", f"{mem_ratio:.2f}×"])
    diff = _max_difference(fast["metrics"], off["metrics"])
    names = list(off["metrics"]["bbox"])
    metric_rows = [[f"{task} {evaluator}"] + [f"{runs[evaluator]['metrics'][task][n]:.4f}"
                                              for n in names]
                   for task in TASKS for evaluator in ("official", "fast")]
    text = "\n".join([
        f"### {label}", "", size, "",
        md_table(["evaluator", "ground truth (s)", "bbox (s)", "segm (s)", "total, wall (s)",
                  "total, CPU (s)", "peak RSS (MiB)", "RSS growth while scoring (MiB)"], rows), "",
        f"Every number reported ({len(names)} per task, {2 * len(names)} in all): largest "
        f"difference fast − official = {diff:.1e} (percentage points).", "",
        md_table(["task, evaluator", *names], metric_rows), ""])
    return text, {"speedup_wall": ratio, "speedup_cpu": cpu_ratio,
                  "memory_growth_ratio": mem_ratio, "max_metric_difference": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco-images", type=int, default=5000)
    parser.add_argument("--coco-dets", type=int, default=100)
    parser.add_argument("--lvis-images", type=int, default=2000,
                        help="LVIS v1 val has 19,809; the default is scaled down so that the "
                             "official API fits the benchmark's ~10 minutes on 2 cores")
    parser.add_argument("--lvis-dets", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results)")
    parser.add_argument("--render", type=Path, metavar="EVAL_SPEED_JSON",
                        help="measure nothing: rewrite the summary of a finished run from its "
                             "saved .json")
    parser.add_argument("--child", nargs=4, metavar=("GT", "DETS", "KIND", "EVALUATOR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.render:
        print(render(args.render).read_text())
        return
    for source in (COCO_SOURCE, LVIS_SOURCE):
        if not source.is_file():
            raise SystemExit(f"error: {source}: real annotations not found (set MOMENTUM2_DATA "
                             f"to the folder holding coco_mini/ and lvis_mini/)")
    load_before = os.getloadavg()
    plan = [("coco", COCO_SOURCE, args.coco_images, args.coco_dets),
            ("lvis", LVIS_SOURCE, args.lvis_images, args.lvis_dets)]
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    sizes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, source, images, per_image in plan:
            start = time.perf_counter()
            gt, dets = generate(source, images, per_image, args.seed, lvis=kind == "lvis")
            gt_file, dets_file = Path(tmp) / f"{kind}_gt.json", Path(tmp) / f"{kind}_dets.json"
            gt_file.write_text(json.dumps(gt))
            dets_file.write_text(json.dumps(dets))
            sizes[kind] = {"images": len(gt["images"]), "annotations": len(gt["annotations"]),
                           "categories": len(gt["categories"]),
                           "categories_with_gt": len({a["category_id"]
                                                      for a in gt["annotations"]}),
                           "detections": len(dets),
                           "per_image": per_image,
                           "results_file_mib": round(dets_file.stat().st_size / 2**20, 1),
                           "generation_s": round(time.perf_counter() - start, 1)}
            print(f"{kind}: {sizes[kind]}", flush=True)
            del gt, dets
            # alternate which evaluator runs first, so neither always follows the other
            order = EVALUATORS if kind == "coco" else EVALUATORS[::-1]
            measured[kind] = {ev: run_child(gt_file, dets_file, kind, ev) for ev in order}
    print(write_report({"sizes": sizes, "runs": measured}, machine(), load_before,
                       args.out).read_text())


def write_report(data: dict[str, Any], info: dict[str, Any],
                 load_before: Any, out: Path | None) -> Path:
    """Summarise the measurements into ``eval_speed.md`` and ``.json``; the goals are judged
    on CPU time, which waiting for a CPU taken by other jobs does not inflate."""
    sizes, measured = data["sizes"], data["runs"]
    body, data = [], {"sizes": sizes, "runs": measured, "summary": {}}
    labels = {"coco": "COCO-val-sized", "lvis": "LVIS-sized"}
    sources = {"coco": COCO_SOURCE, "lvis": LVIS_SOURCE}
    for kind in ("coco", "lvis"):
        s = sizes[kind]
        per_image = s.get("per_image", s["detections"] // s["images"])
        size = (f"{s['images']:,} images (the {sources[kind].relative_to(DATA).parts[0]} images "
                f"repeated with fresh noise), {s['annotations']:,} ground-truth objects, "
                f"{s['categories']:,} categories"
                + (f" ({s['categories_with_gt']:,} with ground truth)"
                   if "categories_with_gt" in s else "")
                + f", {s['detections']:,} detections "
                f"({per_image} per image, boxes and RLE masks; results file "
                f"{s['results_file_mib']} MiB).")
        real_images = REAL_IMAGES[kind]
        if s["images"] < real_images:
            size += (f" **Scaled down**: {real_images:,} images would be the real size; this "
                     f"is {s['images'] / real_images:.1%} of it.")
        text, part = _section(f"{labels[kind]} ({kind.upper()} mode)", size, measured[kind])
        body.append(text)
        data["summary"][kind] = part
    summary = data["summary"]

    def goal(kind: str, target: float) -> list[str]:
        cpu, wall = summary[kind]["speedup_cpu"], summary[kind]["speedup_wall"]["total"]
        return [f"{kind.upper()} ≥ {target:g}× faster", f"{cpu:.2f}×", f"{wall:.2f}×",
                "yes" if cpu >= target else "no"]

    goals = md_table(["goal", "measured, CPU time", "measured, wall time", "met (CPU time)"], [
        goal("coco", 4), goal("lvis", 5),
        ["identical AP", "largest difference " + ", ".join(
            f"{k.upper()} {v['max_metric_difference']:.1e}" for k, v in summary.items()),
         "", "yes" if all(v["max_metric_difference"] <= 1e-6 for v in summary.values())
         else "no"]])
    shares = "; ".join(f"{kind.upper()} {ev} {runs[ev]['cpu_s']['total'] / runs[ev]['wall_s']['total']:.0%}"
                       for kind, runs in measured.items() for ev in EVALUATORS)
    intro = ("Wall time of a fresh process per evaluator (ground-truth load, then bbox, then "
             "segm), CPU time (user + system) of the same steps, and peak resident memory "
             "(`ru_maxrss`; the growth column subtracts the peak before scoring, i.e. Python, "
             "imports and the parsed results). Speed-ups are official / fast from one run of "
             "each, taken one after the other. **The goals are judged on CPU time**: on a "
             "shared machine a process also waits for a CPU, and that waiting is in its wall "
             f"time, not in its CPU time. CPU time as a share of wall time: {shares} (the fast "
             "evaluator computes mask IoUs on up to 2 threads, so its share can pass 100 %).")
    return write_results("eval_speed", "COCO/LVIS evaluation: fast (faster-coco-eval) vs the "
                         "official APIs", "\n".join([intro, "", goals, "", *body]), data, info,
                         load_before, out)


def render(saved: Path) -> Path:
    """Rewrite the Markdown and JSON of a finished run from its saved measurements (after a
    change to how they are summarised), keeping that run's command, machine and load."""
    data = json.loads(saved.read_text())
    sys.argv = [sys.argv[0], *data["command"].split()[2:]]  # the run's own command line
    return write_report({"sizes": data["sizes"], "runs": data["runs"]}, data["machine"],
                        data["load_average_at_start"], saved.parent)


if __name__ == "__main__":
    main()
