"""Fixtures of the transfer tests: converted weights, tiny-run overrides, small datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from transfer.shapes import make_shapes

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


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    """6 generated 128 px training images of circles, squares and triangles (COCO format):
    ``shapes/annotations/instances_train.json`` over ``shapes/train/``."""
    return make_shapes(tmp_path / "shapes", n_train=6, n_val=1, size=128, max_shapes=2)[
        "train_json"]


@pytest.fixture(scope="session")
def tiny() -> tuple[str, ...]:
    """The :data:`TINY` overrides."""
    return tuple(TINY)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Run the transfer tests on one intra-op thread.

    On a small machine shared with other jobs, two OpenMP threads spin-waiting for each
    other make a Detectron2 forward pass about 6x slower than one thread does.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
