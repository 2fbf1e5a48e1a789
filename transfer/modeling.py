"""Model parts our yacs configs name that Detectron2's registries do not hold.

- ``FCOS`` (META_ARCH_REGISTRY): Detectron2's FCOS (:paper:`fcos`), which upstream exists
  only as a LazyConfig model, built from the yacs keys ``MODEL.FCOS.*`` so that FCOS runs
  through the same ``DefaultTrainer`` path as Mask R-CNN. Its head is the GroupNorm head
  of ``detectron2.modeling.meta_arch.fcos.FCOSHead``; no deformable convolution.
- ``build_fcos_resnet_fpn_backbone`` (BACKBONE_REGISTRY): ResNet-FPN P3-P7 with P6/P7
  computed from P5, as in the LazyConfig FCOS (Sec. 2.2 of arXiv 2006.09214).
- ``Res5ROIHeadsExtraNorm`` (ROI_HEADS_REGISTRY): the C4 ROI head of MoCo's detection
  protocol, with an extra norm layer after res5.

Importing this module registers them (the transfer entry points import it).
"""

from __future__ import annotations

from typing import Any

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import (
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    ROI_HEADS_REGISTRY,
    Backbone,
    build_backbone,
)
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.modeling.meta_arch.fcos import FCOS as _LazyFCOS
from detectron2.modeling.meta_arch.fcos import FCOSHead
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn


@BACKBONE_REGISTRY.register()
def build_fcos_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNet + FPN over ``MODEL.FPN.IN_FEATURES`` with P6 = conv(P5), P7 = conv(relu(P6))."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=build_resnet_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@META_ARCH_REGISTRY.register()
class FCOS(_LazyFCOS):
    """Detectron2's FCOS, constructible from a yacs config (``MODEL.META_ARCHITECTURE: FCOS``)."""

    @configurable
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        fcos = cfg.MODEL.FCOS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        feature_shapes = [shapes[f] for f in fcos.IN_FEATURES]
        head = FCOSHead(
            input_shape=feature_shapes,
            conv_dims=[feature_shapes[0].channels] * fcos.NUM_CONVS,
            num_classes=fcos.NUM_CLASSES,
            norm=fcos.NORM,
            prior_prob=fcos.PRIOR_PROB,
        )
        return {
            "backbone": backbone,
            "head": head,
            "head_in_features": list(fcos.IN_FEATURES),
            "num_classes": fcos.NUM_CLASSES,
            "center_sampling_radius": fcos.CENTER_SAMPLING_RADIUS,
            "focal_loss_alpha": fcos.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": fcos.FOCAL_LOSS_GAMMA,
            "test_score_thresh": fcos.SCORE_THRESH_TEST,
            "test_topk_candidates": fcos.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": fcos.NMS_THRESH_TEST,
            "max_detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5 ROI heads with a norm layer (``MODEL.RESNETS.NORM``) after the res5 stage.

    MoCo's detection protocol (He et al. 2020, moco/detection/train_net.py): a backbone
    fine-tuned with normalisation everywhere gets one more after res5, whose output would
    otherwise feed the box and mask predictors unnormalised.
    """

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Sequential, int]:
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels
