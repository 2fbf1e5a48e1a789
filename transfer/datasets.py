"""Datasets for transfer: COCO 2017 / LVIS / Pascal VOC by builtin name, or any COCO-format
JSON by path.

A dataset is named in ``DATASETS.TRAIN`` / ``DATASETS.TEST`` (or ``--train-dataset`` /
``--test-dataset``) either by one of Detectron2's builtin names (``coco_2017_train``,
``lvis_v1_val``, ``voc_2007_trainval``, ...) looked up under ``--dataset-root`` or
``$DETECTRON2_DATASETS`` (layout ``coco/{train2017,val2017,annotations}``,
``lvis/lvis_v1_{train,val}.json``, ``VOC2007/`` and ``VOC2012/`` as the VOC devkit unpacks
them: ``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/<split>.txt``), or by
the path of an annotation JSON. A JSON whose categories carry LVIS's ``frequency`` field is
read as LVIS (v0.5 or v1; images found by their ``coco_url`` split folder under the image
root); any other is read as COCO format, with its categories taken from the file.

:func:`resolve_dataset` checks everything before training starts (the file exists and is
COCO/LVIS format, every image listed is present) and returns a picklable
:class:`DatasetSpec` that :func:`register_dataset` registers in each worker process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TransferError


@functools.cache
def builtin_splits() -> dict[str, tuple[str, str]]:
    """Detectron2's builtin COCO and LVIS datasets: name -> (image root, annotation JSON),
    relative to the dataset root (read on first use: importing Detectron2's catalog takes
    seconds, and scoring a results file against a JSON path needs none of it)."""
    from ._private import builtin_splits as read

    return read()


@functools.cache
def builtin_voc_splits() -> dict[str, tuple[str, str, int]]:
    """Detectron2's builtin Pascal VOC datasets: name -> (folder under the dataset root,
    split, year), e.g. ``voc_2007_test -> ("VOC2007", "test", 2007)``.

    Read from the catalog entries Detectron2's ``register_all_pascal_voc`` made at import (the
    metadata with ``evaluator_type == "pascal_voc"``), whose folders are already joined to
    ``$DETECTRON2_DATASETS`` as it was then; ``--dataset-root`` may name another one.
    """
    from detectron2.data import MetadataCatalog

    out = {}
    for name in MetadataCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("evaluator_type") == "pascal_voc" and meta.get("dirname"):
            out[name] = (Path(meta.dirname).name, meta.split, int(meta.year))
    return dict(sorted(out.items()))


def voc_classes() -> tuple[str, ...]:
    """The 20 Pascal VOC classes, in Detectron2's order."""
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES

    return tuple(CLASS_NAMES)


def __getattr__(name: str) -> Any:
    """``BUILTIN``, ``VOC`` and ``VOC_CLASSES``, computed on first use (see
    :func:`builtin_splits`)."""
    lazy = {"BUILTIN": builtin_splits, "VOC": builtin_voc_splits, "VOC_CLASSES": voc_classes}
    if name in lazy:
        return lazy[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """A checked dataset: what to register, under which name, with which metadata."""

    name: str
    #: the annotation JSON; for VOC, the split's image list ``ImageSets/Main/<split>.txt``.
    json_file: str
    image_root: str
    kind: str  # "coco", "lvis" or "voc"
    thing_classes: list[str] = field(default_factory=list)
    #: COCO format: dataset category id -> contiguous id; empty for LVIS (ids are 1..N).
    id_map: dict[int, int] = field(default_factory=dict)
    #: [{"id": category id, "image_count": n}], used by the federated loss.
    class_image_count: list[dict[str, int]] = field(default_factory=list)
    num_images: int = 0
    #: annotations in the JSON (None: not counted, VOC)
    num_annotations: int | None = None
    #: whether every non-crowd annotation has a segmentation (needed by mask heads).
    has_masks: bool = False
    #: whether some non-crowd annotation's mask is RLE (needs ``INPUT.MASK_FORMAT bitmask``).
    has_rle_masks: bool = False
    #: images (``file_name`` as Detectron2 sees it) that could not be read: left out.
    skipped_images: tuple[str, ...] = ()
    #: VOC only: the devkit folder (``.../VOC2007``), the split and the year (2007: scored
    #: with the VOC07 11-point AP).
    voc_dirname: str = ""
    voc_split: str = ""
    voc_year: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.thing_classes)


def dataset_root(root: str | None = None) -> Path:
    """``root``, else ``$DETECTRON2_DATASETS``, else ``./datasets`` (Detectron2's rule)."""
    chosen = root if root is not None else os.environ.get("DETECTRON2_DATASETS", "datasets")
    path = Path(chosen).expanduser()
    if root is not None and not path.is_dir():
        raise TransferError(path, "dataset root does not exist")
    return path


def is_path_spec(spec: str) -> bool:
    """Whether a dataset spec names a file rather than a builtin dataset."""
    return spec.endswith(".json") or os.sep in spec or Path(spec).is_file()


def resolve_dataset(
    spec: str,
    root: str | None = None,
    image_root: str | None = None,
    check_images: bool = True,
) -> DatasetSpec:
    """Check a dataset named by ``spec`` and describe it; raise :class:`TransferError` if bad.

    Args:
        spec: a builtin name (``coco_2017_val``) or the path of a COCO/LVIS-format JSON.
        root: the dataset root for builtin names (default ``$DETECTRON2_DATASETS``).
        image_root: the image folder of a JSON given by path. Default: for
            ``<dir>/annotations/instances_<split>.json`` the folder ``<dir>/<split>``,
            for LVIS files the JSON's folder, otherwise ``<json stem>/`` or ``images/``
            beside the JSON, otherwise the JSON's own folder.
        check_images: verify that every image the JSON lists exists (not needed to score
            a results file).
    """
    if is_path_spec(spec):
        json_file = Path(spec).expanduser()
        data = read_annotation_json(json_file)
        kind = "lvis" if _is_lvis(data) else "coco"
        images = Path(image_root).expanduser() if image_root else _default_image_root(json_file,
                                                                                     kind)
        name = str(json_file.resolve())
    elif spec in builtin_splits():
        base = dataset_root(root)
        rel_images, rel_json = builtin_splits()[spec]
        json_file, images = _find_builtin(base, rel_json, rel_images)
        if not json_file.is_file():
            raise TransferError(json_file, f"annotation file of {spec} not found; builtin datasets "
                                           f"are looked up under --dataset-root or "
                                           f"$DETECTRON2_DATASETS (now {base}), laid out as "
                                           f"coco/{{train2017,val2017,annotations}} and "
                                           f"lvis/lvis_v1_{{train,val}}.json")
        data = read_annotation_json(json_file)
        kind = "lvis" if spec.startswith("lvis") else "coco"
        name = spec
    elif spec in builtin_voc_splits():
        return resolve_voc(spec, root, check_images)
    else:
        raise TransferError(spec, "unknown dataset; give the path of a COCO-format JSON or one "
                                  "of: " + ", ".join(sorted(builtin_splits())
                                                     + list(builtin_voc_splits())))
    if image_root and not images.is_dir():
        raise TransferError(images, "image folder does not exist")
    _check_format(json_file, data, kind)
    skipped: list[Path] = []
    if check_images:
        _check_images(json_file, data, images, kind)
        skipped = unreadable_images(json_file, data, images, kind)
    spec = _describe(name, json_file, images, kind, data)
    if skipped:
        spec = dataclasses.replace(spec, skipped_images=tuple(str(p) for p in skipped))
    return spec


def resolve_voc(name: str, root: str | None = None, check_images: bool = True) -> DatasetSpec:
    """Check a builtin Pascal VOC split (``voc_2007_test``, ...) under the dataset root.

    Everything Detectron2's ``load_voc_instances`` and ``PascalVOCDetectionEvaluator`` read
    is checked here, so that a bad file fails before training rather than in the evaluation
    at its end: the split's image list, one annotation XML and one JPEG per image, each object
    of one of the 20 VOC classes with ``difficult``, ``truncated``, ``pose`` and an integer
    ``bndbox``, image sizes as the XML says.
    """
    folder, split, year = builtin_voc_splits()[name]
    base = dataset_root(root)
    dirname = base / folder
    image_list = dirname / "ImageSets" / "Main" / f"{split}.txt"
    if not image_list.is_file():
        raise TransferError(image_list, f"image list of {name} not found; VOC datasets are "
                                        f"looked up under --dataset-root or $DETECTRON2_DATASETS "
                                        f"(now {base}) as the devkit unpacks them: "
                                        f"{folder}/{{JPEGImages,Annotations,ImageSets/Main}}")
    ids = image_list.read_text().split()
    if not ids:
        raise TransferError(image_list, "lists no images")
    images: list[dict[str, Any]] = []
    counts: dict[str, set[str]] = defaultdict(set)
    for i, fileid in enumerate(ids):
        xml = dirname / "Annotations" / f"{fileid}.xml"
        width, height, objects = _read_voc_xml(xml)
        for cls in objects:
            counts[cls].add(fileid)
        images.append({"id": i, "file_name": f"{fileid}.jpg", "width": width, "height": height})
    jpegs = dirname / "JPEGImages"
    skipped: list[Path] = []
    if check_images:
        data = {"images": images}
        _check_images(image_list, data, jpegs, "coco")
        skipped = unreadable_images(image_list, data, jpegs, "coco")
    return DatasetSpec(
        name=name, json_file=str(image_list.resolve()), image_root=str(jpegs.resolve()),
        kind="voc", thing_classes=list(voc_classes()),
        class_image_count=[{"id": k + 1, "image_count": len(counts[c])}
                           for k, c in enumerate(voc_classes())],
        num_images=len(ids), skipped_images=tuple(str(p) for p in skipped),
        voc_dirname=str(dirname.resolve()), voc_split=split, voc_year=year)


def _read_voc_xml(path: Path) -> tuple[int, int, list[str]]:
    """(width, height, object class names) of a VOC annotation file, checked as
    Detectron2's VOC loader and evaluator read it."""
    import xml.etree.ElementTree as ET

    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise TransferError(path, "annotation file not found (every image of the split needs "
                                  "one in Annotations/)") from None
    except (ET.ParseError, OSError) as err:
        raise TransferError(path, f"not a readable VOC annotation XML ({err})") from None
    try:
        width = int(tree.findtext("./size/width"))
        height = int(tree.findtext("./size/height"))
    except (TypeError, ValueError):
        raise TransferError(path, "needs integer size/width and size/height") from None
    names = []
    for k, obj in enumerate(tree.findall("object")):
        cls = obj.findtext("name")
        if cls not in voc_classes():
            raise TransferError(path, f"object {k} is a {cls!r}, not one of the 20 VOC classes: "
                                      f"{', '.join(voc_classes())}")
        try:
            int(obj.findtext("difficult"))
            int(obj.findtext("truncated"))
            box = [int(obj.findtext(f"bndbox/{c}")) for c in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise TransferError(path, f"object {k} needs integer difficult, truncated and "
                                      f"bndbox xmin, ymin, xmax, ymax (the VOC evaluation reads "
                                      f"them)") from None
        if obj.findtext("pose") is None:
            raise TransferError(path, f"object {k} has no pose (the VOC evaluation reads it)")
        if not (1 <= box[0] <= box[2] <= width and 1 <= box[1] <= box[3] <= height):
            raise TransferError(path, f"object {k} has bndbox {box}, not within the "
                                      f"{width}×{height} image (1-based, inclusive)")
        names.append(cls)
    return width, height, names


def read_annotation_json(path: Path) -> dict[str, Any]:
    """The parsed annotation file, or a :class:`TransferError` saying why it cannot be."""
    if not path.exists():
        raise TransferError(path, "annotation file not found")
    if not path.is_file():
        raise TransferError(path, "expected an annotation JSON file, found a folder")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransferError(path, f"not valid JSON ({err})") from None
    except RecursionError:
        raise TransferError(path, "not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise TransferError(path, "not a COCO-format annotation file: expected a JSON object "
                                  f"with images, annotations and categories, found a "
                                  f"{type(data).__name__}")
    return data


def _is_lvis(data: dict[str, Any]) -> bool:
    """Whether a JSON given by path is LVIS: a category carries LVIS's ``frequency``, or an
    image LVIS's ``neg_category_ids`` / ``not_exhaustive_category_ids`` (such a file without
    frequencies is then refused by the LVIS check, not scored as plain COCO)."""
    cats, imgs = data.get("categories"), data.get("images")
    return (isinstance(cats, list) and any(isinstance(c, dict) and "frequency" in c
                                           for c in cats)) or (
        isinstance(imgs, list) and any(isinstance(img, dict) and (
            "neg_category_ids" in img or "not_exhaustive_category_ids" in img) for img in imgs))


def _find_builtin(base: Path, rel_json: str, rel_images: str) -> tuple[Path, Path]:
    """The JSON and image root of a builtin split under ``base``.

    Besides Detectron2's layout (``base/coco/annotations/...``), accept ``base`` being the
    COCO folder itself (``base/annotations/...``), as a single-dataset root often is.
    """
    candidates = [(base / rel_json, base / rel_images)]
    if rel_json.startswith("coco/"):
        candidates.append((base / rel_json[5:], base / rel_images[5:]))
    else:  # LVIS: lvis/<file>.json over the COCO images
        candidates.append((base / Path(rel_json).name, base / rel_images))
        candidates.append((base / Path(rel_json).name, base))
    for json_file, images in candidates:
        if json_file.is_file() and images.is_dir():
            return json_file, images
    return candidates[0]


def _default_image_root(json_file: Path, kind: str) -> Path:
    folder = json_file.parent
    if kind == "lvis":
        return folder
    stem = json_file.stem
    if folder.name == "annotations" and stem.startswith("instances_"):
        return folder.parent / stem[len("instances_"):]
    for candidate in (folder / stem, folder / "images"):
        if candidate.is_dir():
            return candidate
    return folder


def _check_format(path: Path, data: dict[str, Any], kind: str) -> None:
    """Raise unless ``data`` has the COCO (or LVIS) instance-annotation structure."""
    def bad(what: str) -> TransferError:
        fmt = "LVIS" if kind == "lvis" else "COCO"
        return TransferError(path, f"not a {fmt}-format annotation file: {what}")

    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise bad(f"no '{key}' list")
    if not data["categories"]:
        raise bad("'categories' is empty")
    if not data["images"]:
        raise bad("'images' is empty")
    for key, required in (("categories", ("id", "name")), ("images", ("id", "height", "width")),
                          ("annotations", ("image_id", "category_id", "bbox"))):
        for i, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or any(r not in entry for r in required):
                raise bad(f"{key}[{i}] lacks one of {', '.join(required)}")
    for i, cat in enumerate(data["categories"]):
        if not is_id(cat["id"]) or not isinstance(cat["name"], str):
            raise bad(f"categories[{i}] needs an integer 'id' and a string 'name'")
        if "synonyms" in cat and not (isinstance(cat["synonyms"], list)
                                      and all(isinstance(s, str) for s in cat["synonyms"])):
            raise bad(f"categories[{i}] has 'synonyms' that are not a list of strings")
        if "image_count" in cat and not is_id(cat["image_count"]):
            raise bad(f"categories[{i}] has an 'image_count' that is not an integer")
        if kind == "lvis" and "frequency" not in cat:
            raise bad(f"categories[{i}] lacks 'frequency' (r, c or f), which LVIS evaluation "
                      f"groups categories by (APr, APc, APf)")
        if kind == "lvis" and cat.get("frequency") not in ("r", "c", "f"):
            raise bad(f"categories[{i}] has a 'frequency' other than r, c or f")
    image_key = "coco_url" if kind == "lvis" else "file_name"
    for i, img in enumerate(data["images"]):
        if image_key not in img:
            raise bad(f"images[{i}] has no '{image_key}'")
        if not isinstance(img[image_key], str) or not img[image_key]:
            raise bad(f"images[{i}] has a '{image_key}' that is not a file name")
        if not is_id(img["id"]) or not all(is_number(img[k]) and img[k] > 0
                                           for k in ("height", "width")):
            raise bad(f"images[{i}] needs an integer 'id' and positive 'height' and 'width'")
        for k in ("height", "width"):
            if not is_id(img[k]):  # 128.0: Detectron2 trains, then the evaluation crashes
                hint = f": write {int(img[k])}" if float(img[k]).is_integer() else ""
                raise bad(f"images[{i}] has a '{k}' of {img[k]!r}; image sizes are whole "
                          f"pixels written as integers (the evaluation's mask decoding takes "
                          f"nothing else){hint}")
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if key in img and not (isinstance(img[key], list) and all(map(is_id, img[key]))):
                raise bad(f"images[{i}] has '{key}' that is not a list of category ids")
    cat_ids = {c["id"] for c in data["categories"]}
    img_ids: dict[int, int] = {}
    for i, img in enumerate(data["images"]):
        if img["id"] in img_ids:
            raise bad(f"images[{i}] repeats id {img['id']} of images[{img_ids[img['id']]}]")
        img_ids[img["id"]] = i
    sizes = {img["id"]: [img["height"], img["width"]] for img in data["images"]}
    ann_ids: dict[int, int] = {}
    for i, ann in enumerate(data["annotations"]):
        if not is_id(ann["image_id"]) or not is_id(ann["category_id"]):
            raise bad(f"annotations[{i}] needs integer 'image_id' and 'category_id'")
        if ann["category_id"] not in cat_ids:
            raise bad(f"annotations[{i}] has category_id {ann['category_id']}, not in categories")
        if ann["image_id"] not in img_ids:
            raise bad(f"annotations[{i}] has image_id {ann['image_id']}, not in images")
        if not is_id(ann.get("id")):
            raise bad(f"annotations[{i}] needs an integer 'id'")
        if ann["id"] in ann_ids:
            raise bad(f"annotations[{i}] repeats id {ann['id']} of annotations[{ann_ids[ann['id']]}]"
                      f" (Detectron2 and COCO evaluation need unique ids)")
        ann_ids[ann["id"]] = i
        if "area" not in ann:
            raise bad(f"annotations[{i}] has no 'area' (COCO evaluation sorts objects by it)")
        if kind == "coco" and ann.get("iscrowd") not in (0, 1):
            raise bad(f"annotations[{i}] needs 'iscrowd' 0 or 1 (COCO evaluation reads it)")
        if not is_box(ann["bbox"]):
            raise bad(f"annotations[{i}] has a bbox that is not [x, y, width, height]")
        x, y, w, h = ann["bbox"]
        height, width = sizes[ann["image_id"]]
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            # Detectron2 clips it to nothing and drops the object without a word
            raise bad(f"annotations[{i}] has bbox {ann['bbox']}, entirely outside its "
                      f"{width}×{height} image {ann['image_id']} (boxes are [x, y, width, "
                      f"height] in pixels of the image as the JSON sizes it)")
        if "segmentation" in ann and not is_segmentation(ann["segmentation"]):
            raise bad(f"annotations[{i}] has a segmentation that is neither polygons nor RLE")
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            if [int(x) for x in seg["size"]] != [int(x) for x in sizes[ann["image_id"]]]:
                raise bad(f"annotations[{i}] has an RLE mask of size {seg['size']} on image "
                          f"{ann['image_id']} of size {sizes[ann['image_id']]} (height, width)")
            total = rle_length(seg["counts"])
            if total != seg["size"][0] * seg["size"][1]:
                raise bad(f"annotations[{i}] has RLE counts that cover "
                          f"{'an unreadable number of' if total is None else total} pixels, "
                          f"not the {seg['size'][0] * seg['size'][1]} of its mask")
        if not all(is_number(ann[k]) for k in ("area", "iscrowd") if k in ann):
            raise bad(f"annotations[{i}] has an 'area' or 'iscrowd' that is not a number")
    if kind == "lvis" and sorted(cat_ids) != list(range(1, len(cat_ids) + 1)):
        raise bad("LVIS category ids must be 1..N")


def is_id(value: Any) -> bool:
    """Whether ``value`` can be a COCO id (an integer; JSON has no other hashable number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_box(value: Any) -> bool:
    """``[x, y, width, height]`` of finite numbers."""
    return isinstance(value, list) and len(value) == 4 and all(map(is_number, value))


def is_segmentation(value: Any) -> bool:
    """COCO polygons (lists of at least 3 x, y pairs) or an RLE ``{"size", "counts"}``."""
    if isinstance(value, list):
        return all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                   and all(map(is_number, p)) for p in value)
    if isinstance(value, dict):
        size, counts = value.get("size"), value.get("counts")
        return (isinstance(size, list) and len(size) == 2 and all(map(is_id, size))
                and (isinstance(counts, str) or (isinstance(counts, list)
                                                 and all(map(is_id, counts)))))
    return False


def rle_length(counts: str | list[int]) -> int | None:
    """Pixels an RLE's ``counts`` cover (their sum); None if a compressed string is garbage.

    pycocotools decodes compressed counts without bounds checks (counts that sum past the
    mask overrun its buffer), and offers no validator; this reads the format of its
    ``rleFrString``: 5 bits per character (offset 48), bit 0x20 continues a number, the last
    character's 0x10 bit is the sign, and from the third count on each is a delta on the count
    two before.
    """
    if isinstance(counts, list):
        return sum(counts) if all(c >= 0 for c in counts) else None
    values: list[int] = []
    i = 0
    while i < len(counts):
        x, k, more = 0, 0, True
        while more:
            if i >= len(counts):
                return None
            c = ord(counts[i]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(values) > 2:
            x += values[-2]
        if x < 0:
            return None
        values.append(x)
    return sum(values)


def image_relpath(img: dict[str, Any], kind: str) -> str:
    """Where an image entry lives relative to the image root (LVIS: ``<split>/<file>``)."""
    if kind == "lvis":
        return "/".join(img["coco_url"].split("/")[-2:])
    return img["file_name"]


def _check_images(path: Path, data: dict[str, Any], images: Path, kind: str) -> None:
    if not images.is_dir():
        raise TransferError(images, f"image folder of {path} does not exist; give it with "
                                    f"--train-images / --test-images")
    listing: dict[Path, set[str]] = {}
    missing = []
    for img in data["images"]:
        rel = Path(image_relpath(img, kind))
        folder = images / rel.parent
        if folder not in listing:
            listing[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        if rel.name not in listing[folder]:
            missing.append(str(rel))
    if missing:
        raise TransferError(images, f"{len(missing)} of {len(data['images'])} images listed in "
                                    f"{path} are missing (first: {missing[0]}); give the image "
                                    f"folder with --train-images / --test-images")


def unreadable_images(path: Path, data: dict[str, Any], images: Path, kind: str) -> list[Path]:
    """Images that cannot be opened (empty, not an image, a folder named ``x.jpg``); raise
    :class:`TransferError` for one whose size differs from its JSON entry.

    Reads headers only. The size is the one Detectron2 checks (``check_image_size``), after the
    EXIF orientation it applies: a photo stored 640×480 with orientation 6 is 480×640.
    """
    from PIL import Image, UnidentifiedImageError

    bad = []
    for i, img in enumerate(data["images"]):
        file = images / image_relpath(img, kind)
        try:
            with Image.open(file) as im:
                width, height = im.size
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                    width, height = height, width
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            bad.append(file)
            continue
        if (width, height) != (img["width"], img["height"]):
            raise TransferError(path, f"images[{i}] ({image_relpath(img, kind)}) is "
                                      f"{img['width']}×{img['height']} in the JSON but "
                                      f"{width}×{height} on disk (EXIF orientation applied); "
                                      f"fix its width and height")
    return bad


def _describe(name: str, json_file: Path, images: Path, kind: str,
              data: dict[str, Any]) -> DatasetSpec:
    cats = sorted(data["categories"], key=lambda c: c["id"])
    if kind == "lvis":
        classes = [(c.get("synonyms") or [c["name"]])[0] for c in cats]
        id_map: dict[int, int] = {}
    else:
        classes = [c["name"] for c in cats]
        id_map = {c["id"]: i for i, c in enumerate(cats)}
    if all("image_count" in c for c in cats):
        counts = [{"id": c["id"], "image_count": int(c["image_count"])} for c in cats]
    else:
        per_cat: dict[int, set[int]] = defaultdict(set)
        for ann in data["annotations"]:
            per_cat[ann["category_id"]].add(ann["image_id"])
        counts = [{"id": c["id"], "image_count": len(per_cat[c["id"]])} for c in cats]
    return DatasetSpec(
        name=name,
        json_file=str(json_file.resolve()),
        image_root=str(images.resolve()),
        kind=kind,
        thing_classes=classes,
        id_map=id_map,
        class_image_count=counts,
        num_images=len(data["images"]),
        num_annotations=len(data["annotations"]),
        has_masks=bool(data["annotations"]) and all(
            ann.get("segmentation") for ann in data["annotations"] if not ann.get("iscrowd")),
        has_rle_masks=any(isinstance(ann.get("segmentation"), dict)
                          for ann in data["annotations"] if not ann.get("iscrowd")),
    )


def register_dataset(spec: DatasetSpec) -> str:
    """Register ``spec`` in Detectron2's catalogs (replacing any entry of that name).

    Builtin names are re-registered at the resolved location, keeping Detectron2's builtin
    metadata; path datasets get the metadata read from their JSON.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json, load_lvis_json, register_pascal_voc
    from detectron2.data.datasets.lvis import get_lvis_instances_meta
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    from ._private import coco_metadata

    if spec.name in DatasetCatalog.list():
        DatasetCatalog.remove(spec.name)
    if spec.name in MetadataCatalog.list():
        MetadataCatalog.remove(spec.name)
    json_file, image_root = spec.json_file, spec.image_root
    if spec.kind == "voc":
        register_pascal_voc(spec.name, spec.voc_dirname, spec.voc_split, spec.voc_year)
        if spec.skipped_images:  # the same loader, less the unreadable images
            DatasetCatalog.remove(spec.name)
            DatasetCatalog.register(spec.name, lambda: _without(load_voc_instances(
                spec.voc_dirname, spec.voc_split, voc_classes()), spec.skipped_images))
        MetadataCatalog.get(spec.name).set(evaluator_type="pascal_voc",
                                           class_image_count=spec.class_image_count)
    elif spec.kind == "lvis":
        # load_lvis_json joins "<root>" + "<split>" (string concatenation): keep the slash.
        lvis_root = image_root.rstrip(os.sep) + os.sep
        if spec.name in builtin_splits():
            meta = get_lvis_instances_meta(spec.name)
            DatasetCatalog.register(spec.name, lambda: _without(
                load_lvis_json(json_file, lvis_root, spec.name), spec.skipped_images))
        else:
            meta = {"thing_classes": spec.thing_classes}
            DatasetCatalog.register(spec.name, lambda: _without(
                load_lvis_json(json_file, lvis_root), spec.skipped_images))
        meta.setdefault("class_image_count", spec.class_image_count)
        MetadataCatalog.get(spec.name).set(json_file=json_file, image_root=lvis_root,
                                           evaluator_type="lvis", **meta)
    else:
        if spec.name in builtin_splits():
            meta = coco_metadata()
        else:
            meta = {"thing_classes": spec.thing_classes,
                    "thing_dataset_id_to_contiguous_id": spec.id_map}
        DatasetCatalog.register(spec.name, lambda: _without(
            load_coco_json(json_file, image_root, spec.name), spec.skipped_images))
        MetadataCatalog.get(spec.name).set(json_file=json_file, image_root=image_root,
                                           evaluator_type="coco",
                                           class_image_count=spec.class_image_count, **meta)
    return spec.name


def _without(dicts: list[dict[str, Any]], skipped: tuple[str, ...]) -> list[dict[str, Any]]:
    """Detectron2's dataset dicts less the images found unreadable when checking."""
    if not skipped:
        return dicts
    gone = {os.path.realpath(p) for p in skipped}
    return [d for d in dicts if os.path.realpath(d["file_name"]) not in gone]
