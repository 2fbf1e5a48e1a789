"""Fixtures of the transfer tests: converted weights, tiny-run overrides, small datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

#: Overrides that make a Detectron2 run take seconds on a CPU: 128 px images, batch 2,
#: 2 iterations, few proposals, score threshold 0 so the evaluator has detections to score.
TINY = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "2",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
    "TEST.PRECISE_BN.NUM_ITER", "1", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "30",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "MODEL.FCOS.SCORE_THRESH_TEST", "0.0", "MODEL.FCOS.TOPK_CANDIDATES_TEST", "100",
    "TEST.DETECTIONS_PER_IMAGE", "10", "SEED", "0",
]


def _convert(model: torch.nn.Module, folder: Path, name: str) -> Path:
    from convert import convert_checkpoint

    torch.manual_seed(0)
    source = folder / f"{name}.pth"
    torch.save(model.state_dict(), source)
    out = folder / f"{name}.pkl"
    convert_checkpoint(str(source), str(out), force=True)
    return out


@pytest.fixture(scope="session")
def r50_pkl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-50 (random init) converted to Detectron2 by ``convert``."""
    torch.manual_seed(0)
    return _convert(torchvision.models.resnet50(), tmp_path_factory.mktemp("w50"), "tv_r50")


@pytest.fixture(scope="session")
def r18_pkl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-18 converted to Detectron2 by ``convert``."""
    torch.manual_seed(0)
    return _convert(torchvision.models.resnet18(), tmp_path_factory.mktemp("w18"), "tv_r18")


@pytest.fixture(scope="session")
def coco_val_subset(coco_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 3 images of coco_mini val2017 as an annotation JSON of their own."""
    data = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
    images = data["images"][:3]
    ids = {img["id"] for img in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = tmp_path_factory.mktemp("val3") / "val3.json"
    path.write_text(json.dumps(data))
    return path


SHAPES = ("square", "circle", "triangle")


def make_shapes_dataset(folder: Path, num_images: int = 6, size: int = 128,
                        seed: int = 0) -> Path:
    """Generated images of coloured squares, circles and triangles, with a COCO JSON.

    Layout: ``folder/images/*.png`` and ``folder/annotations.json`` (category ids 1-3,
    polygon masks). Returns the JSON path.
    """
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(2):
            cls = int(rng.integers(0, 3))
            s = int(rng.integers(24, 44))
            x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            colour = tuple(int(v) for v in rng.integers(120, 256, 3))
            if SHAPES[cls] == "square":
                poly = [x, y, x + s, y, x + s, y + s, x, y + s]
            elif SHAPES[cls] == "circle":
                t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
                pts = np.stack([x + s / 2 + s / 2 * np.cos(t), y + s / 2 + s / 2 * np.sin(t)], 1)
                poly = [float(v) for v in pts.ravel()]
            else:
                poly = [x + s / 2, y, x + s, y + s, x, y + s]
            draw.polygon(poly, fill=colour)
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": cls + 1, "bbox": box, "area": box[2] * box[3],
                                "iscrowd": 0, "segmentation": [poly]})
        name = f"shape_{i:03d}.png"
        img.save(folder / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(SHAPES)]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    return make_shapes_dataset(tmp_path / "shapes")


@pytest.fixture(scope="session")
def tiny() -> tuple[str, ...]:
    """The :data:`TINY` overrides."""
    return tuple(TINY)


@pytest.fixture
def shapes_factory():
    """:func:`make_shapes_dataset`, for tests that need to alter the generated files."""
    return make_shapes_dataset
