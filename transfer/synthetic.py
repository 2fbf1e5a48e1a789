"""A generated COCO-format instance-segmentation dataset: coloured shapes on dark backgrounds.

Three classes (square, circle, triangle), a few non-overlapping objects per image, exact
polygon masks. Small enough to fine-tune on a CPU in minutes, hard enough that a detector
must learn shape rather than colour (colours are random). Used by the tests and handy for
demos: ``make_shapes_dataset("data/shapes_train", 64)`` writes ``annotations.json`` and
``images/``; ``m2t-transfer train --train-dataset data/shapes_train/annotations.json``
finds the images beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle")


def shape_polygon(kind: str, x: float, y: float, s: float) -> list[float]:
    """The outline ``[x1, y1, x2, y2, ...]`` of a shape in the box ``(x, y, s, s)``.

    >>> shape_polygon("triangle", 0, 0, 10)
    [5.0, 0.0, 10.0, 10.0, 0.0, 10.0]
    """
    if kind == "square":
        return [float(v) for v in (x, y, x + s, y, x + s, y + s, x, y + s)]
    if kind == "circle":
        points = []
        for k in range(24):
            t = 2 * math.pi * k / 24
            points += [x + s / 2 + s / 2 * math.cos(t), y + s / 2 + s / 2 * math.sin(t)]
        return points
    if kind == "triangle":
        return [float(v) for v in (x + s / 2, y, x + s, y + s, x, y + s)]
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")


def make_shapes_dataset(folder: str | Path, num_images: int = 6, size: int = 128,
                        objects_per_image: int = 2, seed: int = 0) -> Path:
    """Write ``folder/images/*.png`` and ``folder/annotations.json``; return the JSON path.

    Category ids are 1 (square), 2 (circle), 3 (triangle); image ids 1..num_images.
    """
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images: list[dict] = []
    annotations: list[dict] = []
    for i in range(num_images):
        background = tuple(int(v) for v in rng.integers(0, 60, 3))
        img = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(img)
        boxes: list[tuple[int, int, int]] = []
        for _ in range(objects_per_image * 20):  # rejection sampling of free spots
            if len(boxes) == objects_per_image:
                break
            s = int(rng.integers(size // 5, size // 3))
            x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            if any(x < bx + bs and bx < x + s and y < by + bs and by < y + s
                   for bx, by, bs in boxes):
                continue
            boxes.append((x, y, s))
            cls = int(rng.integers(0, len(SHAPES)))
            poly = shape_polygon(SHAPES[cls], x, y, s)
            draw.polygon(poly, fill=tuple(int(v) for v in rng.integers(110, 256, 3)))
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": cls + 1, "bbox": box,
                                "area": _polygon_area(poly), "iscrowd": 0,
                                "segmentation": [poly]})
        name = f"shape_{i:04d}.png"
        img.save(out / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"}
                  for k, n in enumerate(SHAPES)]
    path = out / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def _polygon_area(poly: list[float]) -> float:
    """Shoelace formula."""
    xs, ys = poly[0::2], poly[1::2]
    n = len(xs)
    return abs(sum(xs[k] * ys[(k + 1) % n] - xs[(k + 1) % n] * ys[k] for k in range(n))) / 2
