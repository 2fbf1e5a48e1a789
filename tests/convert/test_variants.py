"""CIFAR-stem and narrow/wide ResNets (``model.stem``, ``model.width``): checkpoints written by
``m2t-pretrain`` convert to a torchvision ``.pth`` that ``build_backbone(arch, stem, width)``
loads bit for bit, and are refused for Detectron2 (its ResNet cannot host them) in one line,
with nothing written."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from convert import ConversionError, archs, convert_checkpoint, read_backbone
from convert.__main__ import main
from pretrain.__main__ import main as pretrain_main
from pretrain.config import config_from_dict
from pretrain.methods import build_method
from pretrain.model import build_backbone

REPO = Path(__file__).resolve().parents[2]

#: (stem, width) of the runs: each change alone, and both.
VARIANTS = [("cifar", 64), ("imagenet", 16), ("cifar", 16)]
IDS = [f"{stem}-w{width}" for stem, width in VARIANTS]


@pytest.fixture(scope="module")
def runs(tiny_train: Path, module_tmp: Callable[[str], Path]) -> dict[tuple, Path]:
    """``last.pth`` of a two-step m2t resnet18 run (real CIFAR-10 images) for each variant."""
    out: dict[tuple, Path] = {}
    for stem, width in VARIANTS:
        run = module_tmp(f"run_{stem}_{width}")
        code = pretrain_main(["train", "--data", str(tiny_train), "--out", str(run / "run"),
                              "model.arch=resnet18", f"model.stem={stem}",
                              f"model.width={width}", "model.proj_hidden_dim=64",
                              "model.proj_dim=32", "data.image_size=32", "data.batch_size=8",
                              "data.workers=0", "train.steps=2", "train.device=cpu",
                              "optim.warmup_epochs=0"])
        assert code == 0
        out[(stem, width)] = run / "run" / "last.pth"
    return out


def _teacher_backbone(last: Path) -> torch.nn.Module:
    """The run's teacher backbone as pretraining holds it (momentum BN and all), eval mode."""
    ckpt = torch.load(last, weights_only=True)
    method = build_method(config_from_dict(ckpt["config"], str(last)), ckpt["total_steps"])
    method.teacher.load_state_dict(ckpt["teacher"])
    return method.export_backbone("teacher").eval()


def _no_output(folder: Path) -> None:
    assert list(folder.iterdir()) == [], "output or temporary file left behind"


@pytest.mark.parametrize(("stem", "width"), VARIANTS, ids=IDS)
def test_pth_loads_into_the_variant_bit_for_bit(runs: dict, stem: str, width: int,
                                                tmp_path: Path) -> None:
    last = runs[(stem, width)]
    out = tmp_path / "backbone.pth"
    summary = convert_checkpoint(last, out, verify=True)
    assert (summary["arch"], summary["stem"], summary["width"]) == ("resnet18", stem, width)
    assert summary["verify"]["ok"], summary["verify_lines"]
    assert summary["torchvision_missing"] == ["fc.weight", "fc.bias"]
    assert summary["torchvision_unexpected"] == [] and summary["config_yaml"] is None

    state = torch.load(out, weights_only=True)
    model, _ = build_backbone("resnet18", stem, width)
    model.load_state_dict(state)  # strict: the variant's every key, nothing else
    assert summary["tensors_written"] == len(state) == 120  # 20 convs, 20 BNs × 5
    kernel = 3 if stem == "cifar" else 7
    assert tuple(state["conv1.weight"].shape) == (width, 3, kernel, kernel)

    teacher = _teacher_backbone(last)
    source = {k: v for k, v in teacher.state_dict().items()
              if k.rpartition(".")[2] not in ("step", "total_steps")}  # momentum-BN counters
    assert source.keys() == state.keys()
    for key, value in source.items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    student = torch.load(last, weights_only=True)["student"]
    assert not torch.equal(student["backbone.layer1.0.conv1.weight"],
                           state["layer1.0.conv1.weight"]), "the teacher was exported"

    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))


def test_summary_names_the_variant(runs: dict, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "backbone.pth"
    assert main([str(runs[("cifar", 16)]), str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    for expected in ("arch:     resnet18, CIFAR stem, width 16 (basic blocks 2-2-2-2)",
                     "3×3 stride-1 conv1 with 16 channels, no max-pool",
                     "loads it; missing: fc.weight, fc.bias",
                     "Detectron2: cannot host a resnet18, CIFAR stem, width 16",
                     "loaded 120/120 backbone tensors", "verification passed"):
        assert expected in text, expected
    assert "RESNETS:" not in text  # no Detectron2 config for weights it cannot take


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
@pytest.mark.parametrize(("stem", "width"), VARIANTS, ids=IDS)
def test_pkl_is_refused_in_one_line_and_nothing_is_written(runs: dict, stem: str, width: int,
                                                           verify: bool, tmp_path: Path,
                                                           capsys) -> None:
    last = runs[(stem, width)]
    folder = tmp_path / "out"
    folder.mkdir()
    argv = [str(last), str(folder / "weights.pkl")] + (["--verify"] if verify else [])
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith(f"error: {last}: backbone 'teacher.backbone.'"), line
    name = archs.name("resnet18", stem, width)
    for fragment in (f"is a {name} (", "Detectron2's ResNet cannot host",
                     "7×7 stride-2 conv with max-pool", "nothing was written", "*.pth"):
        assert fragment in line, fragment
    assert "Traceback" not in captured.err + captured.out
    _no_output(folder)
    with pytest.raises(ConversionError, match="cannot host"):
        convert_checkpoint(last, folder / "weights.pkl", fmt="d2", verify=verify)
    _no_output(folder)


def test_cli_process_refuses_pkl_and_writes_pth(runs: dict, tmp_path: Path) -> None:
    last = runs[("cifar", 16)]
    folder = tmp_path / "out"
    folder.mkdir()
    refused = subprocess.run([sys.executable, "-m", "convert", str(last),
                              str(folder / "weights.pkl"), "--verify"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {last}: "), refused.stderr
    assert "Detectron2's ResNet cannot host" in lines[0] and "Traceback" not in refused.stderr
    assert refused.stdout == ""
    _no_output(folder)

    done = subprocess.run([sys.executable, "-m", "convert", str(last), str(folder / "r18.pth")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resnet18, CIFAR stem, width 16" in done.stdout and done.stderr == ""
    model, _ = build_backbone("resnet18", "cifar", 16)
    model.load_state_dict(torch.load(folder / "r18.pth", weights_only=True))


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("width", 32, "its config says model.width 32 but its tensors are a resnet18, CIFAR stem, "
                  "width 16 (conv1.weight (16, 3, 3, 3))"),
    ("stem", "imagenet", "its config says model.stem imagenet but its tensors"),
    ("width", "16", "model.width 16 but"),
])
def test_config_disagreeing_with_the_tensors_is_refused(runs: dict, key: str, value: object,
                                                        fragment: str, tmp_path: Path) -> None:
    ckpt = torch.load(runs[("cifar", 16)], weights_only=True)
    ckpt["config"]["model"][key] = value
    source = tmp_path / "altered.pth"
    torch.save(ckpt, source)
    with pytest.raises(ConversionError, match="config says") as info:
        convert_checkpoint(source, tmp_path / "out.pth")
    assert fragment in str(info.value)
    assert not (tmp_path / "out.pth").exists()


def test_config_without_stem_and_width_is_read_from_the_tensors(runs: dict,
                                                                tmp_path: Path) -> None:
    ckpt = torch.load(runs[("imagenet", 16)], weights_only=True)
    del ckpt["config"]["model"]["stem"], ckpt["config"]["model"]["width"]
    source = tmp_path / "older.pth"
    torch.save(ckpt, source)
    found = read_backbone(str(source))
    assert found.variant == ("imagenet", 16) and found.name == "resnet18, width 16"


def test_foreign_variant_state_dict_converts(tmp_path: Path) -> None:
    """A bare state dict (e.g. solo-learn's CIFAR ResNet) is told by its tensors alone."""
    torch.manual_seed(0)
    model, _ = build_backbone("resnet50", "cifar", 32)
    source = tmp_path / "cifar_r50.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}},
               source)
    summary = convert_checkpoint(source, tmp_path / "out.pth", verify=True)
    assert summary["variant"] == "resnet50, CIFAR stem, width 32" and summary["verify"]["ok"]
    state = torch.load(tmp_path / "out.pth", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("arch", list(archs.RESNETS))
@pytest.mark.parametrize(("stem", "width"), [("cifar", 64), ("imagenet", 8), ("cifar", 96)])
def test_expected_shapes_are_those_pretrain_builds(arch: str, stem: str, width: int) -> None:
    with torch.device("meta"):
        model, _ = build_backbone(arch, stem, width)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert archs.expected_shapes(arch, stem, width) == shapes
    tensors = model.state_dict()
    assert archs.variant_of(tensors) == (stem, width)
    problems = archs.check(tensors, arch, stem, width)  # meta tensors: only that is wrong
    assert len(problems) == 1 and "holds no values" in problems[0], problems


def _r18(stem: str, width: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return build_backbone("resnet18", stem, width)[0].state_dict()


@pytest.mark.parametrize(("edit", "fragments"), [
    # conv1 says width 16, the stages are torchvision's 64: not a uniform width
    (lambda s: {**_r18("imagenet", 64), "conv1.weight": s["conv1.weight"]},
     ("not a torchvision resnet18 (CIFAR stem, width 16)", "bn1.weight has shape (64,)",
      "with CIFAR stem, width 16 (as conv1.weight says) has (16,)")),
    # a 5×5 stem is no known variant: checked against torchvision's own shapes
    (lambda s: {**_r18("imagenet", 64), "conv1.weight": torch.zeros(64, 3, 5, 5)},
     ("not a torchvision resnet18: conv1.weight has shape (64, 3, 5, 5), a torchvision "
      "resnet18 has (64, 3, 7, 7)",)),
    # one stage's block widened (a Wide-ResNet-like change) inside a CIFAR variant
    (lambda s: {**s, "layer2.0.conv1.weight": torch.zeros(64, 16, 3, 3)},
     ("layer2.0.conv1.weight has shape (64, 16, 3, 3)", "has (32, 16, 3, 3)")),
    # wider than any variant taken: reported against torchvision's shapes
    (lambda s: {**s, "conv1.weight": torch.zeros(2048, 3, 3, 3)},
     ("not a torchvision resnet18: conv1.weight has shape (2048, 3, 3, 3)",)),
])
def test_other_shapes_are_still_refused(edit, fragments: tuple[str, ...], tmp_path: Path) -> None:
    source = tmp_path / "odd.pth"
    torch.save(edit(_r18("cifar", 16)), source)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(source, tmp_path / "out.pth")
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert not (tmp_path / "out.pth").exists()


def test_a_few_kilobytes_claiming_a_huge_width_are_refused_before_any_memory(
        tmp_path: Path) -> None:
    """Expanded tensors make a tiny file claim a width-1024 resnet18 (2.9 billion values)."""
    shapes = archs.expected_shapes("resnet18", "cifar", 1024)
    source = tmp_path / "huge.pth"
    torch.save({k: torch.tensor(0) if k.endswith("num_batches_tracked")
                else torch.zeros(()).expand(v) for k, v in shapes.items()}, source)
    assert source.stat().st_size < 200_000
    with pytest.raises(ConversionError, match=r"2,856,\d+,\d+ values, more than m2t-convert "
                                              r"handles"):
        convert_checkpoint(source, tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_torchvision_proof_fails_for_wrong_weights(tmp_path: Path) -> None:
    from convert import verify_torchvision

    reference = _r18("cifar", 16)
    good = tmp_path / "good.pth"
    torch.save(reference, good)
    assert verify_torchvision(good, "resnet18", reference, "cifar", 16).ok
    swapped = dict(reference)
    swapped["layer1.0.conv1.weight"], swapped["layer1.0.conv2.weight"] = (
        reference["layer1.0.conv2.weight"], reference["layer1.0.conv1.weight"])
    del swapped["layer3.1.conv2.weight"]
    swapped["layer9.0.conv1.weight"] = reference["conv1.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(swapped, bad)
    report = verify_torchvision(bad, "resnet18", reference, "cifar", 16)
    assert not report.ok and report.lines()[-1] == "verification FAILED"
    assert {"layer1.0.conv1.weight", "layer1.0.conv2.weight",
            "layer3.1.conv2.weight"} <= set(report.not_loaded)
    assert report.unmatched == ["layer9.0.conv1.weight"]
