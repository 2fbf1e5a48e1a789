"""A small Pascal VOC-format dataset cut from COCO images, for tests and trial runs.

The 20 VOC classes are COCO classes under other names (:data:`VOC_TO_COCO`), so COCO's boxes
of those classes are VOC annotations. :func:`make_voc_slice` writes, under ``out``, what
Detectron2's builtin ``voc_2007_trainval``, ``voc_2007_test`` and ``voc_2012_trainval`` read
from ``$DETECTRON2_DATASETS``::

    VOC2007/JPEGImages/<id>.jpg          (links to the COCO images)
    VOC2007/Annotations/<id>.xml         (size; per object: name, pose, truncated, difficult,
                                          bndbox in 1-based inclusive pixels)
    VOC2007/ImageSets/Main/{trainval,test}.txt
    VOC2012/...                           (trainval only)

Test images come from ``<coco>/val2017``, training images from ``<coco>/train2017`` (the
first half of the eligible ones for VOC2007, the rest for VOC2012); every split first takes
one image per class it can find, so that a small slice still holds all 20 classes. COCO has
no "difficult" flag: crowd boxes and boxes under :data:`DIFFICULT_AREA` pixels are marked
difficult (ignored by the VOC evaluation), and a box touching the image border truncated.

``python -m transfer.voc_slice --coco ../shared/data/coco_mini --out datasets_voc``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectron2.data.datasets.pascal_voc import CLASS_NAMES as VOC_CLASSES

from jobs.atomic import write_text

#: VOC class name -> COCO class name (the classes named alike are left out).
VOC_TO_COCO = {"aeroplane": "airplane", "diningtable": "dining table",
               "motorbike": "motorcycle", "pottedplant": "potted plant", "sofa": "couch",
               "tvmonitor": "tv"}
#: Boxes smaller than this (pixels) are marked difficult.
DIFFICULT_AREA = 16 * 16


def voc_boxes(coco: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Per COCO image id, its objects of the VOC classes as VOC annotates them:
    ``{"name", "box": (xmin, ymin, xmax, ymax) 1-based inclusive, "difficult", "truncated"}``."""
    to_voc = {VOC_TO_COCO.get(c, c): c for c in VOC_CLASSES}
    names = {c["id"]: to_voc.get(c["name"]) for c in coco["categories"]}
    sizes = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in coco["annotations"]:
        name = names.get(ann["category_id"])
        if name is None:
            continue
        width, height = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        xmin, ymin = min(width, math.floor(x) + 1), min(height, math.floor(y) + 1)
        xmax = max(xmin, min(width, math.ceil(x + w)))
        ymax = max(ymin, min(height, math.ceil(y + h)))
        out[ann["image_id"]].append({
            "name": name, "box": (xmin, ymin, xmax, ymax),
            "difficult": int(bool(ann.get("iscrowd")) or w * h < DIFFICULT_AREA),
            "truncated": int(xmin == 1 or ymin == 1 or xmax == width or ymax == height)})
    return out


def annotation_xml(file_stem: str, width: int, height: int,
                   objects: Sequence[dict[str, Any]]) -> str:
    """The VOC annotation XML of one image."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC"
    ET.SubElement(root, "filename").text = f"{file_stem}.jpg"
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = obj["name"]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = str(obj["truncated"])
        ET.SubElement(node, "difficult").text = str(obj["difficult"])
        box = ET.SubElement(node, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"], strict=True):
            ET.SubElement(box, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def choose(candidates: Sequence[int], boxes: dict[int, list[dict[str, Any]]],
           limit: int) -> list[int]:
    """Up to ``limit`` image ids: first one holding each class (in class order, where one is
    left), then the others in order."""
    chosen: list[int] = []
    for cls in VOC_CLASSES:
        if len(chosen) == limit:
            break
        if any(o["name"] == cls for i in chosen for o in boxes[i]):
            continue
        for i in candidates:
            if i not in chosen and any(o["name"] == cls for o in boxes[i]):
                chosen.append(i)
                break
    chosen += [i for i in candidates if i not in chosen][:limit - len(chosen)]
    return chosen


def _write_split(coco: dict[str, Any], image_dir: Path, ids: Sequence[int],
                 boxes: dict[int, list[dict[str, Any]]], devkit: Path, split: str) -> list[str]:
    images = {img["id"]: img for img in coco["images"]}
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (devkit / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in ids:
        img = images[i]
        stem = Path(img["file_name"]).stem
        link = devkit / "JPEGImages" / f"{stem}.jpg"
        if not link.exists():
            os.symlink((image_dir / img["file_name"]).resolve(), link)
        write_text(devkit / "Annotations" / f"{stem}.xml",
                   annotation_xml(stem, img["width"], img["height"], boxes[i]))
        stems.append(stem)
    write_text(devkit / "ImageSets" / "Main" / f"{split}.txt", "\n".join(stems) + "\n")
    return stems


def make_voc_slice(coco_root: str | Path, out: str | Path, *, test_images: int = 20,
                   train_images: int = 20) -> dict[str, list[str]]:
    """Write the VOC slice of ``coco_root`` (``annotations/instances_{train,val}2017.json``
    over ``train2017/`` and ``val2017/``) under ``out``; return the image ids of each builtin
    split (``{"voc_2007_test": [...], "voc_2007_trainval": [...], "voc_2012_trainval": [...]}``).
    """
    coco_root, out = Path(coco_root), Path(out)
    splits: dict[str, list[str]] = {}
    for coco_split, parts in (("val2017", (("VOC2007", "test", test_images),)),
                              ("train2017", (("VOC2007", "trainval", train_images),
                                             ("VOC2012", "trainval", train_images)))):
        coco = json.loads((coco_root / "annotations" / f"instances_{coco_split}.json").read_text())
        boxes = voc_boxes(coco)
        eligible = [img["id"] for img in coco["images"] if boxes.get(img["id"])]
        pools = [eligible] if len(parts) == 1 else [eligible[: len(eligible) // 2],
                                                    eligible[len(eligible) // 2:]]
        for (folder, split, limit), pool in zip(parts, pools, strict=True):
            ids = choose(pool, boxes, limit)
            name = f"voc_{folder[3:]}_{split}"
            splits[name] = _write_split(coco, coco_root / coco_split, ids, boxes, out / folder,
                                        split)
    return splits


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", required=True, help="COCO folder (annotations/, train2017/, "
                                                      "val2017/), e.g. ../shared/data/coco_mini")
    parser.add_argument("--out", required=True, help="dataset root to write VOC2007/, VOC2012/ "
                                                     "into (use it as $DETECTRON2_DATASETS)")
    parser.add_argument("--test-images", type=int, default=20)
    parser.add_argument("--train-images", type=int, default=20, help="per training split")
    args = parser.parse_args(argv)
    splits = make_voc_slice(args.coco, args.out, test_images=args.test_images,
                            train_images=args.train_images)
    for name, ids in splits.items():
        print(f"{name}: {len(ids)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
