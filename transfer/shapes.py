"""A generated instance-segmentation dataset: coloured circles, squares and triangles.

Each image has a few non-overlapping shapes on a noisy background; every shape is drawn from
the polygon stored as its mask, so the ground truth is exact. Written in COCO format
(``annotations/instances_{train,val}.json`` + ``train/``, ``val/``), so every COCO tool and
``m2t-transfer train --train-dataset JSON --train-images DIR`` reads it. Made for demos and
tests where real data is absent or too slow to learn from on a CPU.

    python -m transfer.shapes OUT_DIR --train 300 --val 50 --size 128
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from jobs.atomic import write_text

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"},
              {"id": 3, "name": "triangle"}]


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[float]:
    """Flat [x0, y0, x1, y1, ...] outline of a shape of circumradius ``r``."""
    sides = {"circle": 24, "square": 4, "triangle": 3}[kind]
    return [v for i in range(sides)
            for v in (cx + r * math.cos(angle + 2 * math.pi * i / sides),
                      cy + r * math.sin(angle + 2 * math.pi * i / sides))]


def polygon_area(poly: list[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    return 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs))))


def make_image(rng: random.Random, size: int, max_shapes: int) -> tuple[Image.Image, list[dict]]:
    base = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    pixels = img.load()
    for _ in range(size * size // 8):  # speckle noise
        x, y = rng.randrange(size), rng.randrange(size)
        pixels[x, y] = tuple(min(255, c + rng.randint(0, 60)) for c in base)
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []
    anns = []
    for _ in range(rng.randint(1, max_shapes)):
        for _attempt in range(20):
            r = rng.uniform(0.1, 0.22) * size
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cat = rng.choice(CATEGORIES)
        poly = shape_polygon(cat["name"], cx, cy, r, rng.uniform(0, 2 * math.pi))
        colour = tuple(rng.randint(120, 255) for _ in range(3))
        draw.polygon(poly, fill=colour)
        xs, ys = poly[0::2], poly[1::2]
        x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
        x1, y1 = min(max(xs), float(size)), min(max(ys), float(size))
        anns.append({"category_id": cat["id"], "segmentation": [[round(v, 2) for v in poly]],
                     "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                     "area": round(polygon_area(poly), 2), "iscrowd": 0})
    return img, anns


def make_shapes(out: str | Path, n_train: int = 300, n_val: int = 50, size: int = 128,
                max_shapes: int = 4, seed: int = 0) -> dict[str, Path]:
    """Write the dataset under ``out``; returns the paths of its JSON files and image folders."""
    out = Path(out)
    rng = random.Random(seed)
    paths: dict[str, Path] = {}
    ann_id = 1
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n_train), ("val", n_val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            img, anns = make_image(rng, size, max_shapes)
            name = f"{split}_{i:05d}.jpg"
            img.save(folder / name, quality=95)
            image_id = i + 1
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
            for a in anns:
                annotations.append({**a, "id": ann_id, "image_id": image_id})
                ann_id += 1
        data = {"info": {"description": "momentum2 generated shapes"}, "images": images,
                "annotations": annotations, "categories": CATEGORIES}
        json_path = out / "annotations" / f"instances_{split}.json"
        write_text(json_path, json.dumps(data))
        paths[f"{split}_json"], paths[f"{split}_images"] = json_path, folder
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer.shapes", description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--train", type=int, default=300, help="training images")
    p.add_argument("--val", type=int, default=50, help="validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--max-shapes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.train < 1 or a.val < 1 or a.size < 32:
        print("error: --train and --val must be >= 1 and --size >= 32", file=sys.stderr)
        return 2
    try:
        paths = make_shapes(a.out, a.train, a.val, a.size, a.max_shapes, a.seed)
    except OSError as exc:
        print(f"error: {a.out}: cannot write the dataset ({exc.strerror or exc})", file=sys.stderr)
        return 2
    for key, value in paths.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
