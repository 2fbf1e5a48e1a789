"""SPEC §3 inputs: every known checkpoint layout is recognised, the branch is chosen by flag
(by default the one the layout's source transfers), and problems name the prefixes that were
found. ``test_sources.py`` builds each source's checkpoint with its real key names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from convert import ConversionError, archs, convert_checkpoint

State = dict[str, torch.Tensor]


def _fc() -> State:
    return {"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}


def _p(prefix: str, state: State) -> State:
    return {prefix + k: v for k, v in state.items()}


# name → (builder(teacher, student, synth) → checkpoint, kind substring, default branch: None
# for a file of one backbone)
LAYOUTS: dict[str, tuple[Callable[[State, State, Any], Any], str, str | None]] = {
    "m2t-pretrain": (lambda t, s, synth: synth.our_checkpoint(t, s),
                     "m2t-pretrain checkpoint (method m2t", "teacher"),
    "momentum2-teacher authors": (
        lambda t, s, synth: {"start_epoch": 3, "model": {
            **_p("module.student_encoder.", {**s, **_fc()}),
            **_p("module.teacher_encoder.", {**t, **_fc()})},
            "optimizer": {"state": {}, "param_groups": []}},
        "Momentum² Teacher (authors' code)", "teacher"),
    "moco": (lambda t, s, synth: {"epoch": 200, "arch": "resnet18", "state_dict": {
        **_p("module.encoder_q.", s), **_p("module.encoder_k.", t),
        "module.encoder_q.fc.0.weight": torch.randn(2048, 512),
        "module.encoder_k.fc.0.weight": torch.randn(2048, 512),
        "module.queue": torch.randn(128, 65536 // 256)}},
        "MoCo v1/v2 (encoder_q / encoder_k)", "student"),
    "byol / eman": (lambda t, s, synth: {"state_dict": {
        **_p("module.online_net.backbone.", s), **_p("module.target_net.backbone.", t),
        **_p("module.online_net.head.", synth.projector_state(1)),
        **_p("module.predictor.", synth.projector_state(2, in_dim=16))}},
        "EMAN BYOL (online_net / target_net)", "student"),
    "solo-learn lightning": (lambda t, s, synth: {
        "epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.1.0",
        "state_dict": {**_p("backbone.", s), **_p("momentum_backbone.", t),
                       **_p("projector.", synth.projector_state(3)),
                       **_p("momentum_projector.", synth.projector_state(4)),
                       "classifier.weight": torch.randn(10, 512)},
        "hyper_parameters": {"method": "byol"}},
        "solo-learn / Lightning (backbone / momentum_backbone)", "student"),
    "model_ema": (lambda t, s, synth: {"model": {**s, **_fc()}, "model_ema": {**t, **_fc()},
                                       "epoch": 4},
                  "EMA model (model / model_ema)", "student"),
    "torchvision": (lambda t, s, synth: {**s, **_fc()}, "torchvision ResNet state dict", None),
    "torchvision under module.": (lambda t, s, synth: _p("module.", {**s, **_fc()}),
                                  "torchvision ResNet state dict, 'module.' stripped", None),
    "torchvision under state_dict": (lambda t, s, synth: {"state_dict": s, "epoch": 1},
                                     "torchvision ResNet state dict, inside 'state_dict'", None),
    "lone backbone.": (lambda t, s, synth: {"state_dict": {**_p("backbone.", s),
                                                           **_p("projector.",
                                                                synth.projector_state(5))}},
                       "single backbone under 'backbone.'", None),
}


def _same(state: State, expected: State) -> bool:
    return all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_recognised_and_branches_export_their_own_tensors(
        layout: str, r18_pair: tuple[State, State], synth: Any, tmp_path: Path) -> None:
    teacher, student = r18_pair
    build, kind, default_branch = LAYOUTS[layout]
    source = tmp_path / "in.pth"
    torch.save(build(teacher, student, synth), source)

    default = convert_checkpoint(source, tmp_path / "default.pth")
    as_teacher = convert_checkpoint(source, tmp_path / "teacher.pth", branch="teacher")
    as_student = convert_checkpoint(source, tmp_path / "student.pth", branch="student")
    assert kind in default["input_kind"]
    assert default["arch"] == "resnet18"
    out_default, out_teacher, out_student = (
        torch.load(tmp_path / f"{n}.pth", weights_only=True)
        for n in ("default", "teacher", "student"))
    if default_branch is not None:
        assert (default["branch"], as_teacher["branch"], as_student["branch"]) == (
            default_branch, "teacher", "student")
        assert _same(out_default, teacher if default_branch == "teacher" else student)
        assert _same(out_teacher, teacher)
        assert _same(out_student, student)
        assert not torch.equal(out_teacher["conv1.weight"], out_student["conv1.weight"])
    else:
        assert default["branch"] == "single backbone"
        for out in (out_default, out_teacher, out_student):
            assert _same(out, student)
    assert set(out_default) == set(torchvision.models.resnet18().state_dict()) - {
        "fc.weight", "fc.bias"}


def test_our_teacher_momentum_bn_becomes_ordinary_bn(r18_pair, synth, tmp_path: Path) -> None:
    teacher, student = r18_pair
    source = tmp_path / "last.pth"
    torch.save(synth.our_checkpoint(teacher, student), source)
    summary = convert_checkpoint(source, tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert not any(k.endswith(("step", "total_steps")) for k in out)
    assert summary["momentum_bn_counters_dropped"] == 2 * 20  # 20 BNs in a resnet18
    for key in ("bn1.running_mean", "layer3.0.downsample.1.running_var",
                "layer4.1.bn2.num_batches_tracked"):
        assert torch.equal(out[key], teacher[key])
    # An ordinary BatchNorm2d takes every buffer: the strict load reports only fc.
    result = torchvision.models.resnet18().load_state_dict(out, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert {"teacher.projector": 11, "student": len(student) + 2 * 9} == {
        k: v for k, v in summary["not_exported"].items() if k in ("teacher.projector", "student")}


def test_projector_only_teacher_exports_the_student_backbone(r18_pair, synth, tmp_path) -> None:
    teacher, student = r18_pair
    source = tmp_path / "last.pth"
    torch.save(synth.our_checkpoint(teacher, student, method="projector_only"), source)
    default = convert_checkpoint(source, tmp_path / "default.pth")
    assert default["branch"] == "student" and "only backbone" in default["branch_why"]
    summary = convert_checkpoint(source, tmp_path / "out.pth", branch="teacher")
    assert summary["branch"] == "teacher"
    assert "projector_only" in summary["note"] and "student" in summary["note"]
    for name in ("default", "out"):
        assert _same(torch.load(tmp_path / f"{name}.pth", weights_only=True), student)


def test_our_checkpoint_config_chooses_the_default_branch(r18_pair, synth, tmp_path) -> None:
    teacher, student = r18_pair
    source = tmp_path / "last.pth"
    torch.save(synth.our_checkpoint(teacher, student, export_branch="student"), source)
    assert convert_checkpoint(source, tmp_path / "a.pth")["branch"] == "student"
    assert convert_checkpoint(source, tmp_path / "b.pth", branch="teacher")["branch"] == "teacher"


def test_absent_branch_fails_listing_the_prefixes_found(r18_pair, tmp_path: Path) -> None:
    _, student = r18_pair
    source = tmp_path / "query_only.pth"
    torch.save({"state_dict": _p("module.encoder_q.", student)}, source)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(source, tmp_path / "out.pth", branch="teacher")
    message = info.value.message
    assert "no teacher backbone" in message
    assert "'state_dict.module.encoder_q.' (student, MoCo" in message
    assert "--branch student" in message
    assert not (tmp_path / "out.pth").exists()
    assert convert_checkpoint(source, tmp_path / "out.pth", branch="student")["branch"] == "student"


def test_ambiguous_branch_fails_listing_the_prefixes_found(r18_pair, tmp_path: Path) -> None:
    teacher, student = r18_pair
    source = tmp_path / "two_teachers.pth"
    torch.save({**_p("encoder_k.", teacher), **_p("encoder_q.", student),
                **_p("teacher_encoder.", student), **_p("student_encoder.", teacher)}, source)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(source, tmp_path / "out.pth")
    assert "ambiguous" in info.value.message
    assert "'encoder_k.'" in info.value.message and "'teacher_encoder.'" in info.value.message
    summary = convert_checkpoint(source, tmp_path / "out.pth", prefix="teacher_encoder.")
    assert _same(torch.load(tmp_path / "out.pth", weights_only=True), student)
    assert summary["prefix"] == "teacher_encoder."


def test_unrecognised_layout_is_chosen_by_prefix(r18_pair, tmp_path: Path) -> None:
    teacher, student = r18_pair
    source = tmp_path / "custom.pth"
    torch.save({**_p("net_a.", teacher), **_p("net_b.trunk.", student)}, source)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(source, tmp_path / "out.pth")
    assert "'net_a.'" in info.value.message and "'net_b.trunk.'" in info.value.message
    convert_checkpoint(source, tmp_path / "out.pth", prefix="net_b.trunk")
    assert _same(torch.load(tmp_path / "out.pth", weights_only=True), student)


@pytest.mark.parametrize("arch", list(archs.RESNETS))
def test_architecture_is_detected_from_the_tensors(arch: str) -> None:
    with torch.device("meta"):
        keys = list(getattr(torchvision.models, arch)().state_dict())
    assert archs.detect(keys) == arch


def test_half_precision_checkpoints_are_written_as_float32(r18_pair, tmp_path: Path) -> None:
    teacher, _ = r18_pair
    source = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in teacher.items()}, source)
    convert_checkpoint(source, tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert out["conv1.weight"].dtype == torch.float32
    assert torch.equal(out["conv1.weight"], teacher["conv1.weight"].half().float())


def test_checkpoint_is_read_from_a_url(r18_file: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """iopath reads URLs like paths (served here from a local directory: no internet)."""
    import functools
    import http.server
    import threading

    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(r18_file.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{r18_file.name}"
        summary = convert_checkpoint(url, tmp_path / "out.pth")
    finally:
        server.shutdown()
        server.server_close()
    assert summary["input"] == url and summary["arch"] == "resnet18"
    assert _same(torch.load(tmp_path / "out.pth", weights_only=True),
                 torch.load(r18_file, weights_only=True))
