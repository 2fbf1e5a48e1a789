"""Datasets by builtin name or by path, checked at the boundary, registered for Detectron2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from transfer.datasets import register_dataset, resolve_dataset
from transfer.errors import TransferError


def test_builtin_coco_name_is_found_under_detectron2_datasets(
        coco_mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "coco").symlink_to(coco_mini.resolve())
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    spec = resolve_dataset("coco_2017_val")
    assert spec.name == "coco_2017_val" and spec.kind == "coco"
    assert Path(spec.json_file) == (coco_mini / "annotations/instances_val2017.json").resolve()
    assert spec.num_classes == 80 and spec.num_images == 206
    # A root that is the COCO folder itself works as well.
    flat = resolve_dataset("coco_2017_train", root=str(coco_mini))
    assert Path(flat.image_root) == (coco_mini / "train2017").resolve()


def test_registered_coco_json_maps_official_ids_to_contiguous(coco_mini: Path) -> None:
    spec = resolve_dataset(str(coco_mini / "annotations/instances_val2017.json"))
    assert Path(spec.image_root) == (coco_mini / "val2017").resolve()
    name = register_dataset(spec)
    dicts = DatasetCatalog.get(name)
    meta = MetadataCatalog.get(name)
    assert len(dicts) == 206
    assert meta.thing_dataset_id_to_contiguous_id[90] == 79  # toothbrush, the last id
    assert meta.evaluator_type == "coco"
    labels = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert labels <= set(range(80))
    assert all(Path(d["file_name"]).is_file() for d in dicts)


def test_lvis_v05_json_by_path_is_read_as_lvis(lvis_mini: Path) -> None:
    spec = resolve_dataset(str(lvis_mini / "lvis_v0.5_val_subset.json"))
    assert spec.kind == "lvis" and spec.num_classes == 1230 and spec.num_images == 62
    name = register_dataset(spec)
    dicts = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).evaluator_type == "lvis"
    assert all(Path(d["file_name"]).is_file() for d in dicts)
    assert min(a["category_id"] for d in dicts for a in d["annotations"]) >= 0
    assert any(d["neg_category_ids"] for d in dicts)
    counts = MetadataCatalog.get(name).class_image_count
    assert len(counts) == 1230 and {"id", "image_count"} <= set(counts[0])


def test_custom_dataset_takes_its_categories_from_the_json(shapes_dataset: Path) -> None:
    spec = resolve_dataset(str(shapes_dataset))
    assert spec.thing_classes == ["circle", "square", "triangle"]
    assert Path(spec.image_root) == (shapes_dataset.parents[1] / "train").resolve()
    assert spec.has_masks


def test_missing_dataset_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="dataset root does not exist") as err:
        resolve_dataset("coco_2017_train", root=str(tmp_path / "nowhere"))
    assert err.value.path == str(tmp_path / "nowhere")


def test_missing_builtin_json_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="instances_train2017.json: annotation file of "
                                            "coco_2017_train not found"):
        resolve_dataset("coco_2017_train", root=str(tmp_path))


def test_missing_json_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="annotation file not found"):
        resolve_dataset(str(tmp_path / "train.json"))


@pytest.mark.parametrize(("content", "what"), [
    ("not json at all", "not valid JSON"),
    ("[1, 2, 3]", "not a COCO-format annotation file: expected a JSON object"),
    ('{"images": [], "annotations": []}', "no 'categories' list"),
    ('{"images": [{"id": 1, "height": 2, "width": 2, "file_name": "a.png"}], "annotations": '
     '[{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]}], "categories": '
     '[{"id": 1, "name": "a"}]}', "image_id 7, not in images"),
])
def test_json_that_is_not_coco_format_is_an_error(tmp_path: Path, content: str,
                                                  what: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TransferError, match=what):
        resolve_dataset(str(path))


def test_missing_images_are_counted(shapes_dataset: Path) -> None:
    images = shapes_dataset.parents[1] / "train"
    (images / "train_00002.jpg").unlink()
    (images / "train_00004.jpg").unlink()
    with pytest.raises(TransferError, match=r"2 of 6 images listed in .* are missing "
                                            r"\(first: train_00002.jpg\)"):
        resolve_dataset(str(shapes_dataset))


def test_unknown_dataset_name_is_an_error() -> None:
    with pytest.raises(TransferError, match="unknown dataset; .*coco_2017_train"):
        resolve_dataset("coco_2019_train")


def test_lvis_category_ids_must_be_contiguous(lvis_mini: Path, tmp_path: Path) -> None:
    data = json.loads((lvis_mini / "lvis_v0.5_val_subset.json").read_text())
    data["categories"][0]["id"] = 5000
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 1]
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TransferError, match="LVIS category ids must be 1..N"):
        resolve_dataset(str(path), image_root=str(lvis_mini))

