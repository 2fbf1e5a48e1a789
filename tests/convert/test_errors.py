"""Bad input gets one clear line, ``error: <file>: <what is wrong>``, a non-zero exit status,
no traceback and no output file (the conversion issue's list of bad inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from convert.__main__ import main


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], culprit: Path,
           *fragments: str) -> str:
    """Run the command expecting failure; return its one error line."""
    out_dir = Path(argv[1]).parent
    before = set(out_dir.iterdir()) if out_dir.is_dir() else set()
    assert main(argv) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {culprit}: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0]
    if out_dir.is_dir():
        assert set(out_dir.iterdir()) == before, "output or temporary file left behind"
    return lines[0]


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "model.pkl"


def test_missing_file(tmp_path: Path, out: Path, capsys) -> None:
    missing = tmp_path / "nope.pth"
    _fails([str(missing), str(out)], capsys, missing, "no such file")


def test_not_a_checkpoint(tmp_path: Path, out: Path, capsys) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("these are not the weights you are looking for\n")
    _fails([str(text), str(out)], capsys, text, "not a PyTorch checkpoint")


def test_plain_pickle_is_not_a_checkpoint(tmp_path: Path, out: Path, capsys) -> None:
    import pickle

    pkl = tmp_path / "other.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.zeros(3)}}))
    _fails([str(pkl), str(out)], capsys, pkl, "not a PyTorch checkpoint", "plain Python pickle")


def test_checkpoint_with_no_resnet_inside(tmp_path: Path, out: Path, capsys) -> None:
    source = tmp_path / "no_resnet.pth"
    torch.save({"step": 3, "projector.0.weight": torch.zeros(4, 4),
                "head.bn1.weight": torch.ones(4)}, source)
    _fails([str(source), str(out)], capsys, source, "no ResNet backbone", "projector.0.weight")


def test_checkpoint_with_no_tensors(tmp_path: Path, out: Path, capsys) -> None:
    source = tmp_path / "config_only.pth"
    torch.save({"config": {"lr": 0.1}, "step": 3}, source)
    _fails([str(source), str(out)], capsys, source, "no tensors")


def test_non_resnet_architecture(tmp_path: Path, out: Path, capsys) -> None:
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1,
                                               num_heads=2, hidden_dim=8, mlp_dim=16)
    source = tmp_path / "vit.pth"
    torch.save({"state_dict": vit.state_dict()}, source)
    _fails([str(source), str(out)], capsys, source, "not a ResNet", "Vision Transformer")


def test_resnet_variant_with_other_shapes(tmp_path: Path, out: Path, capsys) -> None:
    with torch.device("meta"):
        keys = torchvision.models.resnext50_32x4d().state_dict()
    source = tmp_path / "resnext.pth"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in keys.items()}, source)
    _fails([str(source), str(out)], capsys, source, "not a torchvision resnet50",
           "layer1.0.conv1.weight has shape (128, 64, 1, 1)")


def test_resnet_with_unknown_depth(r18_pair, tmp_path: Path, out: Path, capsys) -> None:
    state = {k: v for k, v in r18_pair[0].items() if not k.startswith("layer4.1.")}
    source = tmp_path / "odd.pth"
    torch.save(state, source)
    _fails([str(source), str(out)], capsys, source, "basic blocks 2-2-2-1", "none of resnet18")


def test_wrong_arch(r18_file: Path, out: Path, capsys) -> None:
    _fails([str(r18_file), str(out), "--arch", "resnet50"], capsys, r18_file,
           "holds a resnet18 (basic blocks 2-2-2-2), not the requested --arch resnet50")


def test_checkpoint_declaring_another_arch(r18_pair, synth, tmp_path: Path, out: Path,
                                           capsys) -> None:
    source = tmp_path / "last.pth"
    torch.save(synth.our_checkpoint(*r18_pair, arch="resnet34"), source)
    _fails([str(source), str(out)], capsys, source, "says arch resnet34", "resnet18")


def test_unwritable_output(r18_file: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = blocker / "model.pkl"
    _fails([str(r18_file), str(target)], capsys, target, "cannot write")
    assert blocker.read_text() == ""


def test_existing_output_needs_force(r18_file: Path, out: Path, capsys) -> None:
    out.write_bytes(b"precious")
    _fails([str(r18_file), str(out)], capsys, out, "exists; pass --force")
    assert out.read_bytes() == b"precious"
    assert main([str(r18_file), str(out), "--force"]) == 0
    assert out.read_bytes() != b"precious" and out.with_suffix(".yaml").exists()


def test_existing_config_snippet_needs_force(r18_file: Path, out: Path, capsys) -> None:
    snippet = out.with_suffix(".yaml")
    snippet.write_text("mine\n")
    _fails([str(r18_file), str(out)], capsys, snippet, "exists; pass --force")
    assert snippet.read_text() == "mine\n"


def test_unknown_output_extension(r18_file: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "model.bin"
    _fails([str(r18_file), str(target)], capsys, target, "cannot tell the output format")
    assert main([str(r18_file), str(target), "--format", "torchvision"]) == 0
    assert set(torch.load(target, weights_only=True)) >= {"conv1.weight", "layer4.1.bn2.bias"}


def test_detectron2_format_needs_pkl_extension(r18_file: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "model.pth"
    _fails([str(r18_file), str(target), "--format", "d2"], capsys, target, ".pkl")


def test_pickled_foreign_type_is_named_and_unsafe_load_reads_it(
        r18_pair, tmp_path: Path, out: Path, capsys) -> None:
    source = tmp_path / "with_numpy.pth"
    torch.save({"state_dict": r18_pair[0], "best_acc": np.float64(71.3)}, source)
    line = _fails([str(source), str(out)], capsys, source, "--unsafe-load")
    assert "numpy" in line and "scalar" in line
    assert main([str(source), str(out), "--unsafe-load"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "weights_only=False" in captured.err
    assert out.exists()
