"""SPEC §3: converted weights load into Detectron2 (its own checkpointer is the oracle) and the
Detectron2 backbone reproduces torchvision's stage outputs."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

from convert import convert_checkpoint, verify_detectron2
from convert.__main__ import main

pytest.importorskip("detectron2")


def _arrays(pkl: Path) -> dict:
    with open(pkl, "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def r50_pkl(r50_file: Path, module_tmp: Callable[[str], Path]) -> tuple[Path, dict]:
    out = module_tmp("r50_pkl") / "r50.pkl"
    return out, convert_checkpoint(r50_file, out)


def test_resnet50_pickle_has_53_convs_and_53_bns(r50_pkl: tuple[Path, dict]) -> None:
    out, summary = r50_pkl
    data = _arrays(out)
    model = data["model"]
    assert data["__author__"] and data["matching_heuristics"] is True
    convs = [k for k, v in model.items() if v.ndim == 4]
    norms = [k for k in model if ".norm." in k]
    assert len(convs) == 53
    assert len(norms) == 53 * 4
    assert len(model) == summary["tensors_written"] == 265
    assert not any(k.endswith("num_batches_tracked") for k in model)
    assert all(v.dtype.name == "float32" for v in model.values())
    # SPEC §3 renaming, spot-checked by hand:
    assert model["stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert "stem.conv1.norm.running_var" in model
    assert model["res2.0.shortcut.weight"].shape == (256, 64, 1, 1)
    assert "res5.2.conv3.norm.bias" in model and "res5.0.shortcut.norm.running_mean" in model


def test_resnet50_loads_265_tensors_into_frozen_bn_and_318_into_bn(
        r50_pkl: tuple[Path, dict]) -> None:
    out, _ = r50_pkl
    bn = verify_detectron2(out, "resnet50", norm="BN")
    assert (bn.loaded, bn.model_tensors) == (318, 318)
    assert not bn.unmatched and not bn.mis_shaped and not bn.not_loaded
    assert set(bn.max_abs_diff) == {"res2", "res3", "res4", "res5"}
    assert bn.max_diff <= 1e-4
    assert bn.ok
    frozen = verify_detectron2(out, "resnet50", norm="FrozenBN", image_size=32)
    assert (frozen.loaded, frozen.model_tensors) == (265, 265)
    assert frozen.ok


def test_resnet18_round_trip_verifies(r18_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r18.pkl"
    summary = convert_checkpoint(r18_file, out, verify=True)
    # resnet18: stem conv + 8 basic blocks x 2 convs + 3 shortcut convs = 20 convs, 20 BNs.
    assert summary["tensors_written"] == 20 + 20 * 4
    assert summary["verify"]["ok"]
    assert (summary["verify"]["loaded"], summary["verify"]["model_tensors"]) == (120, 120)
    assert max(summary["verify"]["max_abs_diff"].values()) <= 1e-4


def test_verification_fails_when_weights_are_wrong(r18_file: Path, r18_pair: tuple,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "r18.pkl"
    convert_checkpoint(r18_file, out)
    data = _arrays(out)
    model = data["model"]
    # Two same-shaped BNs swapped: every key loads, only the numbers can tell.
    for name in ("weight", "bias", "running_mean", "running_var"):
        a, b = f"res2.0.conv1.norm.{name}", f"res2.0.conv2.norm.{name}"
        model[a], model[b] = model[b], model[a]
    swapped = tmp_path / "swapped.pkl"
    swapped.write_bytes(pickle.dumps(data))
    report = verify_detectron2(swapped, "resnet18", reference=r18_pair[0], image_size=32)
    assert report.loaded == report.model_tensors and not report.unmatched
    assert report.max_diff > 1e-3 and not report.ok

    # A tensor missing, one of the wrong shape, one that matches nothing.
    del model["res3.1.conv2.weight"]
    model["res4.0.conv1.weight"] = model["res4.0.conv1.weight"][:, :1]
    model["res9.0.conv1.weight"] = model["res2.0.conv1.weight"]
    broken = tmp_path / "broken.pkl"
    broken.write_bytes(pickle.dumps(data))
    report = verify_detectron2(broken, "resnet18", reference=r18_pair[0], image_size=32)
    assert "res3.1.conv2.weight" in report.not_loaded
    assert "res4.0.conv1.weight" in report.mis_shaped
    assert "res9.0.conv1.weight" in report.unmatched
    assert not report.ok


def test_wrong_renaming_is_caught_by_verify_and_leaves_no_output(
        r18_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import convert.pipeline as pipeline

    real = pipeline.torchvision_to_detectron2

    def swap_bn1_bn2(key: str) -> str | None:  # a plausible bug: bn1/bn2 crossed in blocks
        if key.startswith("layer"):
            key = key.replace(".bn1.", ".bnX.").replace(".bn2.", ".bn1.").replace(".bnX.", ".bn2.")
        return real(key)

    monkeypatch.setattr(pipeline, "torchvision_to_detectron2", swap_bn1_bn2)
    out = tmp_path / "r18.pkl"
    assert main([str(r18_file), str(out), "--verify"]) == 2
    err = capsys.readouterr().err
    assert "verification FAILED" in err and "error: " in err
    assert list(tmp_path.iterdir()) == []


def test_torchvision_output_loads_with_only_fc_missing(r50_file: Path, r50_model, tmp_path) -> None:
    out = tmp_path / "r50_backbone.pth"
    summary = convert_checkpoint(r50_file, out)
    state = torch.load(out, weights_only=True)
    model = torchvision.models.resnet50()
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert summary["torchvision_missing"] == ["fc.weight", "fc.bias"]
    assert summary["tensors_written"] == len(state) == 318
    for key, value in r50_model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key


def test_cli_prints_summary_and_writes_detectron2_config(r18_file: Path, tmp_path: Path,
                                                         capsys) -> None:
    import yaml

    out = tmp_path / "r18.pkl"
    assert main([str(r18_file), str(out), "--arch", "resnet18"]) == 0
    text = capsys.readouterr().out
    for expected in ("torchvision ResNet state dict", "resnet18", "100 tensors",
                     "STRIDE_IN_1X1: False", "FORMAT: RGB"):
        assert expected in text
    config = yaml.safe_load((tmp_path / "r18.yaml").read_text())
    assert config["MODEL"]["RESNETS"] == {"DEPTH": 18, "STRIDE_IN_1X1": False,
                                          "RES2_OUT_CHANNELS": 64}
    assert config["MODEL"]["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert config["MODEL"]["PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert config["INPUT"]["FORMAT"] == "RGB"
    assert config["MODEL"]["WEIGHTS"] == str(out.resolve())
