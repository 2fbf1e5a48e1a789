"""Transfer configs: Detectron2 yacs YAML files in ``configs/transfer/``, found by short name.

A config is named either by its file stem (``mask_rcnn_R_50_FPN_1x``) or by a path to any
Detectron2 YAML. :func:`load_config` merges the file and the ``KEY VALUE`` overrides onto
Detectron2's defaults extended by :func:`add_transfer_config`, then applies the two
run-time adjustments every config gets:

- ``TRANSFER.TOTAL_BATCH`` (the linear-scaling switch, :func:`scale_to_total_batch`);
- the SyncBN fallback for the actual number of processes (:func:`resolve_sync_bn`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer

from . import modeling  # noqa: F401  (registers the parts our configs name: FCOS, ...)
from .errors import TransferError
from .yaml_guard import check_config_chain

CONFIG_DIR = (Path(__file__).resolve().parent / "configs").resolve()  # the link, followed

logger = logging.getLogger(__name__)


def available_configs() -> list[str]:
    """Short names of the shipped leaf configs (the ``Base-*`` files are not runnable alone)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("Base-"))


def resolve_config(name_or_path: str) -> Path:
    """The YAML file a config name or path refers to.

    >>> resolve_config("mask_rcnn_R_50_FPN_1x").name
    'mask_rcnn_R_50_FPN_1x.yaml'
    """
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise TransferError(path, "config file not found")
        return path.resolve()
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = available_configs()
    if not known:
        raise TransferError(CONFIG_DIR, "no shipped configs here (the package's configs link to "
                            "configs/transfer is missing or broken); give a path to a YAML file")
    raise TransferError(
        name_or_path,
        "unknown config; give a path to a Detectron2 YAML file or one of: " + ", ".join(known),
    )


def add_transfer_config(cfg: CfgNode) -> CfgNode:
    """Add the keys our configs use beyond Detectron2's defaults, with their defaults.

    ``MODEL.FCOS`` configures the yacs FCOS of :mod:`transfer.modeling`; ``TRANSFER`` holds
    the batch-scaling switch, the label of the pretraining method (for reports) and the
    evaluator.
    """
    cfg.MODEL.FCOS = CfgNode()
    cfg.MODEL.FCOS.NUM_CLASSES = 80
    cfg.MODEL.FCOS.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    cfg.MODEL.FCOS.NUM_CONVS = 4
    cfg.MODEL.FCOS.NORM = "GN"
    cfg.MODEL.FCOS.PRIOR_PROB = 0.01
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5
    cfg.MODEL.FCOS.FOCAL_LOSS_ALPHA = 0.25
    cfg.MODEL.FCOS.FOCAL_LOSS_GAMMA = 2.0
    # Inference: the score is sqrt(classification x centerness).
    cfg.MODEL.FCOS.SCORE_THRESH_TEST = 0.2
    cfg.MODEL.FCOS.TOPK_CANDIDATES_TEST = 1000
    cfg.MODEL.FCOS.NMS_THRESH_TEST = 0.6

    cfg.TRANSFER = CfgNode()
    cfg.TRANSFER.TOTAL_BATCH = 0
    cfg.TRANSFER.METHOD = ""
    # The short name of the config a run was started with, kept in the run's config.yaml
    # so that evaluating with that file reports the same name.
    cfg.TRANSFER.CONFIG = ""
    # Which COCO/LVIS evaluation scores the test set: "fast" (faster-coco-eval, C++) or
    # "official" (pycocotools / lvis); the same numbers (transfer/scoring.py).
    cfg.TRANSFER.EVALUATOR = "fast"
    return cfg


def num_classes_key(cfg: CfgNode) -> str:
    """The config key holding the number of classes for this config's meta-architecture."""
    if cfg.MODEL.META_ARCHITECTURE == "FCOS":
        return "MODEL.FCOS.NUM_CLASSES"
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        return "MODEL.RETINANET.NUM_CLASSES"
    return "MODEL.ROI_HEADS.NUM_CLASSES"


def set_key(cfg: CfgNode, dotted: str, value: object) -> None:
    """``cfg.A.B.C = value`` for ``dotted == "A.B.C"`` (the config must not be frozen)."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def get_key(cfg: CfgNode, dotted: str) -> object:
    """The value at ``dotted`` (``"A.B.C"``) in ``cfg``."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def scale_to_total_batch(cfg: CfgNode, total_batch: int) -> CfgNode:
    """A copy of ``cfg`` rescaled from ``SOLVER.IMS_PER_BATCH`` images to ``total_batch``.

    The linear scaling rule (Goyal et al., "ImageNet in 1 hour"): with ``s = total_batch /
    IMS_PER_BATCH`` the LR is multiplied by ``s`` and MAX_ITER, STEPS, WARMUP_ITERS,
    CHECKPOINT_PERIOD and EVAL_PERIOD are divided by it, so that the same number of images
    is seen. This is Detectron2's ``DefaultTrainer.auto_scale_workers`` with one "worker"
    per image. E.g. 16 -> 4 images: LR 0.02 -> 0.005, 90k -> 360k iterations.
    """
    if total_batch <= 0 or total_batch == cfg.SOLVER.IMS_PER_BATCH:
        return cfg.clone()
    reference = cfg.clone()
    reference.defrost()
    reference.SOLVER.REFERENCE_WORLD_SIZE = cfg.SOLVER.IMS_PER_BATCH
    scaled = DefaultTrainer.auto_scale_workers(reference, total_batch)
    scaled.defrost()
    # DefaultTrainer calls auto_scale_workers again with the world size: keep that a no-op.
    scaled.SOLVER.REFERENCE_WORLD_SIZE = 0
    return scaled


def iter_keys(cfg: CfgNode, prefix: str = "") -> Iterator[tuple[str, object]]:
    """All ``(dotted key, value)`` leaves of a config."""
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, CfgNode):
            yield from iter_keys(value, dotted + ".")
        else:
            yield dotted, value


def sync_bn_replacement(world_size: int, device: str) -> str:
    """What a ``"SyncBN"`` norm becomes for ``world_size`` processes on ``device``.

    One process has nothing to synchronise with: plain BN (identical statistics, no
    process-group requirement). Several CPU processes (gloo) cannot run
    ``nn.SyncBatchNorm``, which needs GPU tensors: Detectron2's ``naiveSyncBN`` all-reduces
    the statistics itself. Several GPU processes keep ``SyncBN``.

    >>> sync_bn_replacement(1, "cuda"), sync_bn_replacement(2, "cpu"), sync_bn_replacement(8, "cuda")
    ('BN', 'naiveSyncBN', 'SyncBN')
    """
    if world_size <= 1:
        return "BN"
    if not device.startswith("cuda"):
        return "naiveSyncBN"
    return "SyncBN"


def resolve_sync_bn(cfg: CfgNode, world_size: int) -> list[str]:
    """Replace every ``*.NORM == "SyncBN"`` key for ``world_size`` processes, in place.

    Returns the keys that changed.
    """
    replacement = sync_bn_replacement(world_size, cfg.MODEL.DEVICE)
    changed = []
    if replacement == "SyncBN":
        return changed
    for key, value in list(iter_keys(cfg)):
        if key.endswith("NORM") and value == "SyncBN":
            set_key(cfg, key, replacement)
            changed.append(key)
    if changed:
        logger.info("SyncBN -> %s for %d process(es): %s", replacement, world_size,
                    ", ".join(changed))
    return changed


#: Ranges of the numeric keys a user sets, checked once the config is merged and
#: overridden: (key, lowest, highest, why). Values outside reach Detectron2 only as deep
#: tracebacks (``MAX_ITER 0``: "Total num_updates must be greater than ...") or as runs that
#: silently do nothing. None: no bound on that side.
RANGES: tuple[tuple[str, float | None, float | None, str], ...] = (
    ("SOLVER.MAX_ITER", 1, None, "iterations to train"),
    ("SOLVER.IMS_PER_BATCH", 1, None, "images per batch"),
    ("SOLVER.BASE_LR", 0, None, "learning rate"),
    ("SOLVER.WARMUP_ITERS", 0, None, "warm-up iterations"),
    ("SOLVER.WARMUP_FACTOR", 0, 1, "warm-up start factor"),
    ("SOLVER.GAMMA", 0, None, "LR decay factor"),
    ("SOLVER.MOMENTUM", 0, 1, "SGD momentum"),
    ("SOLVER.WEIGHT_DECAY", 0, None, "weight decay"),
    ("SOLVER.CHECKPOINT_PERIOD", 1, None, "iterations between checkpoints"),
    ("TEST.EVAL_PERIOD", 0, None, "iterations between evaluations (0: at the end only)"),
    ("TEST.DETECTIONS_PER_IMAGE", 1, None, "detections kept per image"),
    ("TRANSFER.TOTAL_BATCH", 0, None, "total batch to rescale to (0: off)"),
    ("DATALOADER.NUM_WORKERS", 0, None, "loader processes"),
    ("SEED", -1, 2**32 - 1, "random seed (-1: drawn at random)"),
    ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0, 1, "a score"),
    ("MODEL.ROI_HEADS.NMS_THRESH_TEST", 0, 1, "an IoU"),
    ("MODEL.FCOS.SCORE_THRESH_TEST", 0, 1, "a score"),
    ("INPUT.MAX_SIZE_TRAIN", 1, None, "pixels"),
    ("INPUT.MAX_SIZE_TEST", 1, None, "pixels"),
    ("INPUT.MIN_SIZE_TEST", 0, None, "pixels (0: no resizing)"),
)


def check_ranges(cfg: CfgNode, path: Path) -> None:
    """Raise :class:`TransferError` naming the first key of :data:`RANGES` out of range."""
    for key, low, high, what in RANGES:
        try:
            value = get_key(cfg, key)
        except (AttributeError, KeyError):
            continue  # a key of another meta-architecture
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # yacs already checked its type against the default's
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (f"between {low} and {high}" if low is not None and high is not None
                      else f">= {low}" if low is not None else f"<= {high}")
            raise TransferError(path, f"{key} must be {bounds} ({what}), got {value}")
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    if not sizes or any(not isinstance(v, int) or v < 1 for v in sizes):
        raise TransferError(path, f"INPUT.MIN_SIZE_TRAIN must list sizes >= 1, got {sizes}")


def load_config(
    name_or_path: str,
    overrides: Sequence[str] = (),
    world_size: int = 1,
    unsafe_load: bool = False,
) -> CfgNode:
    """The full, unfrozen config for ``name_or_path`` with ``KEY VALUE`` overrides applied.

    The file and its ``_BASE_`` chain are read with safe YAML loading only (no tag that can run
    code, no alias bomb: :mod:`transfer.yaml_guard`), unless ``unsafe_load`` says the user
    trusts them. ``MODEL.DEVICE`` defaults to ``cuda`` when a GPU is visible and ``cpu``
    otherwise; the batch-scaling switch and the SyncBN fallback are applied last.
    """
    path = resolve_config(name_or_path)
    check_config_chain(path, unsafe_load)
    cfg = add_transfer_config(get_cfg())
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        merge_file(cfg, path, unsafe_load)
    except TransferError:
        raise
    except Exception as err:  # yacs raises KeyError/ValueError/AssertionError/YAMLError
        raise TransferError(path, f"not a valid Detectron2 config: {_one_line(err)}") from None
    if len(overrides) % 2:
        raise TransferError(path, f"overrides come as KEY VALUE pairs; got an odd number: "
                                  f"{' '.join(overrides)}")
    try:
        cfg.merge_from_list(list(overrides))
    except Exception as err:
        raise TransferError(path, f"bad override: {_one_line(err)}") from None
    check_ranges(cfg, path)
    cfg = scale_to_total_batch(cfg, cfg.TRANSFER.TOTAL_BATCH)
    cfg.defrost()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise TransferError(path, f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} does not "
                                  f"divide evenly over {world_size} processes")
    resolve_sync_bn(cfg, world_size)
    return cfg


#: Top-level keys that Detectron2 builds newer than the installed one write into a run's
#: ``config.yaml``, each with the values that mean what a build without the key does.
#: ``FLOAT32_PRECISION`` (upstream ``main`` after ``a59f0563``): the precision of float32
#: matrix multiplications (``torch.set_float32_matmul_precision``); "" leaves PyTorch's
#: default, "highest".
NEWER_KEYS: dict[str, tuple[str, ...]] = {"FLOAT32_PRECISION": ("", "highest")}


def merge_file(cfg: CfgNode, path: Path, unsafe_load: bool = False) -> None:
    """``cfg.merge_from_file(path)``, reading a config written by another Detectron2 build.

    A key of :data:`NEWER_KEYS` that the installed Detectron2 lacks is dropped (with an info
    line) when its value changes nothing here, and refused in one line otherwise; a config
    written by this build loads in newer ones as it is (a missing key takes their default).
    """
    loaded = CfgNode.load_yaml_with_base(str(path), allow_unsafe=unsafe_load)
    dropped = {k: loaded[k] for k in NEWER_KEYS if k in loaded and k not in cfg}
    if not dropped:
        cfg.merge_from_file(str(path), allow_unsafe=unsafe_load)
        return
    import detectron2

    for key, value in dropped.items():
        if str(value) not in NEWER_KEYS[key]:
            raise TransferError(path, f"{key} {value!r} was written by a newer Detectron2; the "
                                      f"installed {detectron2.__version__} has no such setting "
                                      f"and would run at full float32 precision: remove the "
                                      f"line, or set it to \"\" to run as this build does")
        logger.info("%s: %s %r (a key of newer Detectron2 builds, meaning the default) ignored "
                    "by Detectron2 %s", path, key, value, detectron2.__version__)
        del loaded[key]
    loaded.pop("_BASE_", None)  # already merged in by load_yaml_with_base
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(CfgNode(loaded).dump())
    try:
        cfg.merge_from_file(f.name, allow_unsafe=unsafe_load)
    finally:
        Path(f.name).unlink()


def config_label(name_or_path: str) -> str:
    """A short name for a config: its file stem."""
    return Path(name_or_path).stem


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())
