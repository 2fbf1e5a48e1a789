"""SPEC §4 protocol settings of the shipped configs, read back through Detectron2's config."""

from __future__ import annotations

import pytest
import torch
from detectron2.engine import DefaultTrainer
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.fcos import FCOS as Detectron2FCOS

from transfer.config import (
    CONFIG_DIR,
    available_configs,
    iter_keys,
    load_config,
    resolve_config,
    scale_to_total_batch,
    sync_bn_replacement,
)
from transfer.errors import TransferError

SHIPPED = [
    "mask_rcnn_R_50_FPN_1x", "mask_rcnn_R_50_FPN_2x", "mask_rcnn_R_50_C4_1x",
    "mask_rcnn_R_50_C4_2x", "fcos_R_50_FPN_1x", "lvis_v1_mask_rcnn_R_50_FPN_1x",
    "lvis_v1_mask_rcnn_R_50_FPN_1x_fedloss", "lvis_v1_fcos_R_50_FPN_1x",
]


def test_every_protocol_of_the_spec_ships_as_a_short_name() -> None:
    assert set(SHIPPED) <= set(available_configs())
    for name in SHIPPED:
        assert resolve_config(name) == CONFIG_DIR / f"{name}.yaml"


def test_a_config_can_also_be_given_by_path() -> None:
    path = CONFIG_DIR / "fcos_R_50_FPN_1x.yaml"
    assert resolve_config(str(path)) == path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_config_has_the_converted_weight_format_and_common_protocol(name: str) -> None:
    cfg = load_config(name)
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53]
    assert cfg.MODEL.PIXEL_STD == [58.395, 57.12, 57.375]
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.TEST.PRECISE_BN.ENABLED is True
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.SOLVER.WARMUP_ITERS == 1000
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (640, 672, 704, 736, 768, 800)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    one_stage = "fcos" in name
    assert cfg.SOLVER.BASE_LR == (0.01 if one_stage else 0.02)


@pytest.mark.parametrize(("name", "max_iter", "steps"), [
    ("mask_rcnn_R_50_FPN_1x", 90000, (60000, 80000)),
    ("mask_rcnn_R_50_FPN_2x", 180000, (120000, 160000)),
    ("mask_rcnn_R_50_C4_1x", 90000, (60000, 80000)),
    ("mask_rcnn_R_50_C4_2x", 180000, (120000, 160000)),
    ("fcos_R_50_FPN_1x", 90000, (60000, 80000)),
])
def test_coco_schedules_are_1x_and_2x(name: str, max_iter: int, steps: tuple[int, int]) -> None:
    cfg = load_config(name)
    assert cfg.SOLVER.MAX_ITER == max_iter
    assert tuple(cfg.SOLVER.STEPS) == steps
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert cfg.DATASETS.TEST == ("coco_2017_val",)


def test_fpn_mask_rcnn_has_syncbn_in_backbone_fpn_and_heads_on_several_gpus() -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x", ["MODEL.DEVICE", "cuda"], world_size=8)
    assert cfg.MODEL.RESNETS.NORM == "SyncBN"
    assert cfg.MODEL.FPN.NORM == "SyncBN"
    assert cfg.MODEL.ROI_BOX_HEAD.NORM == "SyncBN"
    assert cfg.MODEL.ROI_MASK_HEAD.NORM == "SyncBN"
    assert (cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.NUM_FC) == (4, 1)
    assert cfg.MODEL.MASK_ON is True


def test_syncbn_falls_back_to_bn_on_one_process() -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x", ["MODEL.DEVICE", "cpu"], world_size=1)
    assert not [k for k, v in iter_keys(cfg) if v == "SyncBN"]
    model = build_model(cfg)
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.SyncBatchNorm not in kinds
    assert any(issubclass(k, torch.nn.BatchNorm2d) for k in kinds)


def test_syncbn_becomes_naive_sync_bn_on_several_cpu_processes() -> None:
    assert sync_bn_replacement(1, "cuda") == "BN"
    assert sync_bn_replacement(4, "cpu") == "naiveSyncBN"
    assert sync_bn_replacement(8, "cuda") == "SyncBN"
    cfg = load_config("fcos_R_50_FPN_1x", ["MODEL.DEVICE", "cpu"], world_size=2)
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.FPN.NORM == "naiveSyncBN"
    assert cfg.MODEL.FCOS.NORM == "GN"
    model = build_model(cfg)
    assert isinstance(model.backbone.bottom_up.stem.conv1.norm, NaiveSyncBatchNorm)


def test_c4_mask_rcnn_has_an_extra_norm_after_res5() -> None:
    cfg = load_config("mask_rcnn_R_50_C4_1x", ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    model = build_model(cfg)
    res5 = model.roi_heads.res5
    assert list(dict(res5.named_children()))[-1] == "norm"
    assert isinstance(res5.norm, torch.nn.BatchNorm2d) and res5.norm.num_features == 2048
    x = torch.randn(2, 1024, 14, 14)
    res5.eval()
    assert torch.allclose(res5(x), res5.norm(res5[:3](x)))


def test_fcos_is_detectron2_fcos_with_a_gn_head_on_p3_to_p7_from_p5() -> None:
    cfg = load_config("fcos_R_50_FPN_1x", ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    assert isinstance(model, Detectron2FCOS)
    assert cfg.MODEL.MASK_ON is False
    assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    assert model.backbone.top_block.in_feature == "p5"
    norms = [m for m in model.head.cls_subnet if not isinstance(m, (torch.nn.Conv2d,
                                                                      torch.nn.ReLU))]
    assert len(norms) == 4 and all(isinstance(m, torch.nn.GroupNorm) for m in norms)
    assert model.num_classes == 80 and model.test_score_thresh == 0.2
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 96, 128), "height": 96, "width": 128}])
    assert out[0]["instances"].image_size == (96, 128)


@pytest.mark.parametrize("name", ["lvis_v1_mask_rcnn_R_50_FPN_1x", "lvis_v1_fcos_R_50_FPN_1x"])
def test_lvis_configs_use_repeat_factor_sampling_and_300_detections(name: str) -> None:
    cfg = load_config(name)
    assert cfg.DATASETS.TRAIN == ("lvis_v1_train",) and cfg.DATASETS.TEST == ("lvis_v1_val",)
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
    if "fcos" in name:
        assert cfg.MODEL.FCOS.NUM_CLASSES == 1203 and cfg.MODEL.FCOS.SCORE_THRESH_TEST == 1e-4
        assert cfg.MODEL.MASK_ON is False
    else:
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203
        assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 1e-4
        assert cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS is False


def test_federated_loss_is_an_option_of_the_lvis_mask_rcnn() -> None:
    cfg = load_config("lvis_v1_mask_rcnn_R_50_FPN_1x_fedloss")
    assert cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS and cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE
    same = load_config("lvis_v1_mask_rcnn_R_50_FPN_1x", [
        "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", "True", "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", "True"])
    assert same.dump() == cfg.dump()


def test_total_batch_switch_scales_lr_and_schedule_linearly() -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x", ["TRANSFER.TOTAL_BATCH", "4"])
    assert cfg.SOLVER.IMS_PER_BATCH == 4
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.02 * 4 / 16)
    assert cfg.SOLVER.MAX_ITER == 90000 * 4
    assert tuple(cfg.SOLVER.STEPS) == (240000, 320000)
    assert cfg.SOLVER.WARMUP_ITERS == 4000
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 40000
    # DefaultTrainer rescales again by world size unless REFERENCE_WORLD_SIZE is 0.
    assert DefaultTrainer.auto_scale_workers(cfg, 1).dump() == cfg.dump()


def test_total_batch_of_the_config_itself_changes_nothing() -> None:
    cfg = load_config("fcos_R_50_FPN_1x")
    assert scale_to_total_batch(cfg, 16).dump() == cfg.dump()
    assert scale_to_total_batch(cfg, 0).dump() == cfg.dump()


def test_unknown_config_name_lists_the_shipped_ones() -> None:
    with pytest.raises(TransferError, match="unknown config; .*mask_rcnn_R_50_FPN_1x"):
        resolve_config("mask_rcnn_R_51_FPN_1x")


def test_bad_override_names_the_config_file() -> None:
    with pytest.raises(TransferError, match=r"mask_rcnn_R_50_FPN_1x\.yaml: bad override"):
        load_config("mask_rcnn_R_50_FPN_1x", ["SOLVER.NO_SUCH_KEY", "1"])
    with pytest.raises(TransferError, match="KEY VALUE pairs"):
        load_config("mask_rcnn_R_50_FPN_1x", ["SOLVER.MAX_ITER"])


def test_batch_must_divide_over_the_processes() -> None:
    with pytest.raises(TransferError, match="does not divide evenly over 3 processes"):
        load_config("mask_rcnn_R_50_FPN_1x", world_size=3)


@pytest.mark.parametrize(("name", "upstream"), [
    ("mask_rcnn_R_50_FPN_1x", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"),
    ("mask_rcnn_R_50_C4_1x", "COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml"),
    ("lvis_v1_mask_rcnn_R_50_FPN_1x", "LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"),
])
def test_schedules_match_detectron2s_own_model_zoo_configs(name: str, upstream: str) -> None:
    """A second source for the protocol: Detectron2's model zoo (LVIS v1 "1x" is 180k iterations)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    theirs = get_cfg()
    theirs.merge_from_file(model_zoo.get_config_file(upstream))
    ours = load_config(name)
    for key in ("SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR",
                "SOLVER.WARMUP_ITERS", "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TEST",
                "DATASETS.TRAIN", "DATASETS.TEST", "DATALOADER.SAMPLER_TRAIN",
                "DATALOADER.REPEAT_THRESHOLD", "TEST.DETECTIONS_PER_IMAGE",
                "MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.ROI_HEADS.SCORE_THRESH_TEST",
                "MODEL.MASK_ON"):
        mine, upstream_value = ours, theirs
        for part in key.split("."):
            mine, upstream_value = getattr(mine, part), getattr(upstream_value, part)
        if isinstance(mine, (list, tuple)):
            mine, upstream_value = tuple(mine), tuple(upstream_value)
        assert mine == upstream_value, f"{name}: {key} is {mine}, Detectron2's {upstream} has {upstream_value}"


def test_a_broken_configs_link_is_named_not_an_empty_list(tmp_path, monkeypatch) -> None:
    import transfer.config as config

    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path / "configs")  # as a checkout without links
    with pytest.raises(TransferError, match="configs link to configs/transfer is missing"):
        resolve_config("mask_rcnn_R_50_FPN_1x")
