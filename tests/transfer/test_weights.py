"""A converted checkpoint fills every backbone tensor; one of another architecture is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from detectron2.modeling import build_model

from transfer.config import load_config
from transfer.errors import TransferError
from transfer.weights import check_weights, load_weights


def _pkl(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        return pickle.load(f)["model"]


def test_converted_resnet50_fills_all_265_backbone_tensors_of_the_fpn_model(
        r50_pkl: Path) -> None:
    model = build_model(load_config("mask_rcnn_R_50_FPN_1x", ["MODEL.DEVICE", "cpu"]))
    report = load_weights(model, str(r50_pkl))
    # 53 convolutions + 53 BNs x (weight, bias, running mean, running var).
    assert report.resnet_total == 265 and report.resnet_missing == []
    arrays = _pkl(r50_pkl)
    state = model.state_dict()
    for name in ("stem.conv1.weight", "res2.0.shortcut.weight", "res4.5.conv3.norm.running_var",
                 "res5.2.conv2.norm.bias"):
        np.testing.assert_array_equal(state[f"backbone.bottom_up.{name}"].numpy(), arrays[name])


def test_one_pickle_serves_the_c4_model_res5_included(r50_pkl: Path) -> None:
    model = build_model(load_config("mask_rcnn_R_50_C4_1x", ["MODEL.DEVICE", "cpu"]))
    report = load_weights(model, str(r50_pkl))
    assert report.resnet_total == 265 and report.resnet_missing == []
    arrays = _pkl(r50_pkl)
    np.testing.assert_array_equal(model.roi_heads.res5[0].conv1.weight.detach().numpy(),
                                  arrays["res5.0.conv1.weight"])
    np.testing.assert_array_equal(model.backbone.res4[5].conv3.norm.running_mean.numpy(),
                                  arrays["res4.5.conv3.norm.running_mean"])


def test_weights_of_another_architecture_are_refused(r18_pkl: Path) -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x", ["MODEL.DEVICE", "cpu"])
    with pytest.raises(TransferError, match=r"do not fit the ResNet-50 backbone .* holds a "
                                            r"resnet18.* backbone tensors are missing") as err:
        check_weights(cfg, str(r18_pkl), "mask_rcnn_R_50_FPN_1x")
    assert err.value.path == str(r18_pkl)


def test_resnet18_weights_fit_a_depth_18_override(r18_pkl: Path) -> None:
    cfg = load_config("mask_rcnn_R_50_FPN_1x", ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
                                                "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    report = check_weights(cfg, str(r18_pkl), "mask_rcnn_R_50_FPN_1x")
    assert report.resnet_total == 20 * 5 and report.resnet_missing == []


def test_a_file_that_is_not_weights_is_refused(tmp_path: Path) -> None:
    model = build_model(load_config("fcos_R_50_FPN_1x", ["MODEL.DEVICE", "cpu"]))
    junk = tmp_path / "weights.pkl"
    junk.write_bytes(b"this is not a pickle")
    with pytest.raises(TransferError, match="not a weights file Detectron2 can read"):
        load_weights(model, str(junk))
    with pytest.raises(TransferError, match="weights file not found"):
        load_weights(model, str(tmp_path / "absent.pkl"))
