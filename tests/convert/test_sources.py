"""SPEC §3, one source at a time: a checkpoint laid out exactly as each self-supervised codebase
saves it (key names read from its code) converts through the command line, Detectron2 loads the
result (``--verify``), and the branch exported by default is, by value, the one that source's
own converter or evaluation transfers; ``--branch`` still takes the other.

The two branches are two differently seeded ResNet-18s, so a wrong pick cannot pass.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import types
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from convert.__main__ import main
from convert.naming import SEQUENTIAL_CHILDREN, torchvision_to_detectron2

pytest.importorskip("detectron2")

State = dict[str, torch.Tensor]
_CHILD_INDEX = {name: index for index, name in SEQUENTIAL_CHILDREN.items()}


def tv(prefix: str, state: State) -> State:
    """``state`` (torchvision names) under ``prefix``."""
    return {prefix + k: v for k, v in state.items()}


def seq(prefix: str, state: State) -> State:
    """``state`` as ``nn.Sequential(*list(resnet.children())[:-1])`` names it, under
    ``prefix``: conv1 → 0, bn1 → 1, layer1..4 → 4..7 (lightly's examples)."""
    out = {}
    for key, value in state.items():
        child, _, rest = key.partition(".")
        out[f"{prefix}{_CHILD_INDEX[child]}.{rest}"] = value
    return out


def head(prefix: str, *names: str) -> State:
    """A few projector / predictor / fc tensors under ``prefix``."""
    return {f"{prefix}{name}": torch.randn(8, 4) for name in names or ("0.weight", "0.bias")}


def fc(prefix: str) -> State:
    return {f"{prefix}fc.weight": torch.randn(10, 512), f"{prefix}fc.bias": torch.randn(10)}


@dataclass
class Source:
    """``build(teacher, student)`` → the checkpoint object; ``default``: the branch the source
    transfers; ``why``: a fragment of the reason the ``branch:`` line must give; ``kind``: a
    fragment of the ``detected:`` line."""

    build: Callable[[State, State], Any]
    default: str
    why: str
    kind: str


SOURCES: dict[str, Source] = {
    # facebookresearch/moco main_moco.py: DDP-wrapped MoCo saved as {'epoch', 'arch',
    # 'state_dict', 'optimizer'}; the encoders' fc is the MLP head (--mlp), plus the queue.
    "MoCo v2": Source(lambda t, s: {
        "epoch": 200, "arch": "resnet18", "optimizer": {"state": {}, "param_groups": []},
        "state_dict": {**tv("module.encoder_q.", s), **tv("module.encoder_k.", t),
                       **head("module.encoder_q.fc.", "0.weight", "0.bias", "2.weight"),
                       **head("module.encoder_k.fc.", "0.weight", "0.bias", "2.weight"),
                       "module.queue": torch.randn(128, 64),
                       "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
        "student", "MoCo's convert-pretrain-to-detectron2.py takes encoder_q", "MoCo v1/v2"),
    # facebookresearch/moco-v3: base_encoder / momentum_encoder (fc replaced by an MLP with
    # BN), predictor.
    "MoCo v3": Source(lambda t, s: {
        "epoch": 100, "arch": "resnet18", "scaler": {},
        "state_dict": {**tv("module.base_encoder.", s), **tv("module.momentum_encoder.", t),
                       **head("module.base_encoder.fc.", "0.weight", "1.weight", "1.bias",
                              "1.running_mean", "3.weight"),
                       **head("module.momentum_encoder.fc.", "0.weight", "3.weight"),
                       **head("module.predictor.", "0.weight", "3.weight")}},
        "student", "main_lincls.py takes base_encoder", "MoCo v3"),
    # zdaxie/PixPro: {'model': DDP state dict} with encoder / encoder_k and their projectors.
    "PixPro": Source(lambda t, s: {
        "opt": argparse.Namespace(arch="resnet18"), "epoch": 100,
        "model": {**tv("module.encoder.", s), **tv("module.encoder_k.", t),
                  **head("module.projector."), **head("module.projector_k.")}},
        "student", "convert_pretrain_to_d2.py takes encoder", "PixPro"),
    # vturrisi/solo-learn (Lightning): backbone / momentum_backbone, projector, classifier.
    "solo-learn BYOL": Source(lambda t, s: {
        "epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.1.0",
        "state_dict": {**tv("backbone.", s), **tv("momentum_backbone.", t),
                       **head("projector."), **head("momentum_projector."),
                       **head("predictor."), **head("classifier.", "weight", "bias")}},
        "student", "solo-learn's converter takes backbone", "solo-learn"),
    # amazon-science EMAN, main_byol.py: online_net / target_net, each backbone + neck.
    "EMAN BYOL": Source(lambda t, s: {"epoch": 200, "state_dict": {
        **tv("module.online_net.backbone.", s), **tv("module.target_net.backbone.", t),
        **head("module.online_net.neck.mlp."), **head("module.target_net.neck.mlp."),
        **head("module.predictor.mlp.")}},
        "student", "--model-prefix online_net.backbone", "EMAN BYOL"),
    # EMAN main_fixmatch.py: FixMatch(main, ema), each a ResNet(backbone, fc), under DDP.
    "EMAN FixMatch": Source(lambda t, s: {
        "epoch": 100, "arch": "FixMatch", "best_acc1": torch.tensor(71.0),
        "state_dict": {**tv("module.main.backbone.", s), **fc("module.main."),
                       **tv("module.ema.backbone.", t), **fc("module.ema.")}},
        "student", "main_fixmatch.py evaluates main", "EMAN FixMatch"),
    # lightly examples (pytorch_lightning/byol.py): backbone = nn.Sequential(children[:-1]).
    "lightly example BYOL": Source(lambda t, s: {"epoch": 9, "state_dict": {
        **seq("backbone.", s), **seq("backbone_momentum.", t),
        **head("projection_head.layers."), **head("projection_head_momentum.layers."),
        **head("prediction_head.layers.")}},
        "student", "lightly's examples embed with backbone", "lightly example"),
    # lightly examples (pytorch/dino.py): student_backbone / teacher_backbone, numbered too.
    "lightly example DINO": Source(lambda t, s: {
        **seq("student_backbone.", s), **seq("teacher_backbone.", t),
        **head("student_head.layer."), **head("teacher_head.layer.")},
        "teacher", "DINO transfers the teacher", "lightly DINO example"),
    # lightly benchmarks/imagenet/resnet50/byol.py: backbone (online) / teacher_backbone.
    "lightly benchmark BYOL": Source(lambda t, s: {"state_dict": {
        **tv("backbone.", s), **tv("teacher_backbone.", t), **head("projection_head.layers."),
        **head("teacher_projection_head.layers."),
        **head("online_classifier.classification_head.", "weight", "bias")}},
        "student", "lightly's benchmark evaluates backbone", "lightly BYOL benchmark"),
    # lightly benchmarks mocov2.py: backbone (query) / key_backbone.
    "lightly benchmark MoCo v2": Source(lambda t, s: {"state_dict": {
        **tv("backbone.", s), **tv("key_backbone.", t), **head("projection_head.layers."),
        **head("key_projection_head.layers.")}},
        "student", "lightly's benchmark evaluates backbone", "lightly MoCo v2 benchmark"),
    # lightly benchmarks dino.py: backbone is the teacher, student_backbone the student.
    "lightly benchmark DINO": Source(lambda t, s: {"state_dict": {
        **tv("backbone.", t), **tv("student_backbone.", s), **head("projection_head.layer."),
        **head("student_projection_head.layer.")}},
        "teacher", "evaluates backbone, its teacher", "lightly DINO benchmark"),
    # mmselfsup 1.x / mmpretrain BYOL: target_net = CosineEMA(Sequential(backbone, neck)).
    "mmselfsup 1.x BYOL": Source(lambda t, s: {
        "meta": {"epoch": 200}, "state_dict": {
            **tv("backbone.", s), **head("neck.mlp."), **head("head.predictor.mlp."),
            **tv("target_net.module.0.", t), **head("target_net.module.1.mlp."),
            "target_net.steps": torch.tensor(1000)}},
        "student", "extract_backbone_weights.py takes backbone", "mmselfsup 1.x / mmpretrain BYOL"),
    # mmselfsup 1.x MoCo v2: encoder_k = ExponentialMovingAverage(Sequential(backbone, neck)).
    "mmselfsup 1.x MoCo v2": Source(lambda t, s: {"meta": {}, "state_dict": {
        **tv("backbone.", s), **head("neck.mlp."), **tv("encoder_k.module.0.", t),
        **head("encoder_k.module.1.mlp."), "encoder_k.steps": torch.tensor(10),
        "queue": torch.randn(128, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}},
        "student", "extract_backbone_weights.py takes backbone", "mmpretrain MoCo ("),
    # mmpretrain MoCo v3: momentum_encoder = CosineEMA(Sequential(backbone, neck)).
    "mmpretrain MoCo v3": Source(lambda t, s: {"meta": {}, "state_dict": {
        **tv("backbone.", s), **head("neck.mlp."), **head("head.predictor.mlp."),
        **tv("momentum_encoder.module.0.", t), **head("momentum_encoder.module.1.mlp."),
        "momentum_encoder.steps": torch.tensor(10)}},
        "student", "extract_backbone_weights.py takes backbone", "mmpretrain MoCo v3"),
    # OpenSelfSup / DenseCL: encoder_q = Sequential(backbone, neck), backbone = encoder_q[0],
    # so the state dict holds the student twice.
    "DenseCL": Source(lambda t, s: {"meta": {}, "state_dict": {
        **tv("backbone.", s), **tv("encoder_q.0.", s), **head("encoder_q.1.mlp."),
        **tv("encoder_k.0.", t), **head("encoder_k.1.mlp."), "queue": torch.randn(128, 64),
        "queue2": torch.randn(128, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}},
        "student", "OpenSelfSup's extract_backbone_weights.py takes backbone", "DenseCL"),
    # OpenSelfSup BYOL: online_net = Sequential(backbone, neck), backbone = online_net[0].
    "OpenSelfSup BYOL": Source(lambda t, s: {"meta": {}, "state_dict": {
        **tv("backbone.", s), **tv("online_net.0.", s), **head("online_net.1.mlp."),
        **tv("target_net.0.", t), **head("target_net.1.mlp."), **head("head.predictor.mlp.")}},
        "student", "OpenSelfSup's extract_backbone_weights.py takes backbone",
        "OpenSelfSup BYOL"),
    # lucidrains/byol-pytorch: BYOL(net) learner; NetWrapper keeps the whole net (fc too).
    "byol-pytorch": Source(lambda t, s: {
        **tv("online_encoder.net.", s), **fc("online_encoder.net."),
        **head("online_encoder.projector.net."), **tv("target_encoder.net.", t),
        **fc("target_encoder.net."), **head("target_encoder.projector.net."),
        **head("online_predictor.net.")},
        "student", "byol-pytorch trains and saves the online network", "byol-pytorch"),
    # Momentum² Teacher, the authors' code: {'model': DDP state dict, 'start_epoch', ...}.
    "Momentum² Teacher authors": Source(lambda t, s: {
        "start_epoch": 3, "optimizer": {"state": {}, "param_groups": []},
        "model": {**tv("module.student_encoder.", s), **fc("module.student_encoder."),
                  **tv("module.teacher_encoder.", t), **fc("module.teacher_encoder.")}},
        "teacher", "the Momentum² Teacher authors transfer the teacher", "Momentum² Teacher"),
    # facebookresearch/dino main_dino.py (ResNet-50 runs): {'student': DDP state dict,
    # 'teacher': state dict, 'args': Namespace, ...}; the backbone's fc is an Identity.
    "DINO": Source(lambda t, s: {
        "student": {**tv("module.backbone.", s), **head("module.head.mlp.")},
        "teacher": {**tv("backbone.", t), **head("head.mlp.")}, "epoch": 100,
        "args": argparse.Namespace(arch="resnet18"), "optimizer": {},
        "dino_loss": {"center": torch.zeros(1, 16)}},
        "teacher", "--checkpoint_key teacher", "DINO"),
    # timm train.py: {'state_dict', 'state_dict_ema', 'epoch', 'arch', 'args', ...}.
    "timm EMA": Source(lambda t, s: {
        "epoch": 300, "arch": "resnet18", "args": argparse.Namespace(model="resnet18"),
        "state_dict": {**s, **fc("")}, "state_dict_ema": {**t, **fc("")}},
        "student", "takes state_dict unless --use-ema", "timm EMA"),
}


def _exported(pkl: Path) -> dict[str, np.ndarray]:
    with open(pkl, "rb") as f:
        return pickle.load(f)["model"]


def _is(model: dict[str, np.ndarray], state: State) -> bool:
    """Whether the Detectron2 pickle holds exactly ``state``'s values."""
    renamed = {torchvision_to_detectron2(k): v for k, v in state.items()}
    renamed.pop(None, None)  # num_batches_tracked
    return model.keys() == renamed.keys() and all(
        np.array_equal(model[k], v.numpy()) for k, v in renamed.items())


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_source_exports_the_branch_its_authors_transfer(
        name: str, r18_pair: tuple[State, State], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student = r18_pair
    source = SOURCES[name]
    path = tmp_path / "checkpoint.pth"
    torch.save(source.build(teacher, student), path)

    out = tmp_path / "default.pkl"
    assert main([str(path), str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    branch_line = next(line for line in text.splitlines() if line.startswith("branch:"))
    assert branch_line.startswith(f"branch:   {source.default} ("), branch_line
    assert source.why in branch_line, branch_line
    assert source.kind in text, text
    assert "verification passed" in text and "loaded 120/120" in text
    expected, other = (teacher, student) if source.default == "teacher" else (student, teacher)
    model = _exported(out)
    assert _is(model, expected) and not _is(model, other)

    flipped = "student" if source.default == "teacher" else "teacher"
    out = tmp_path / "flipped.pkl"
    assert main([str(path), str(out), "--branch", flipped]) == 0
    assert f"branch:   {flipped} (as --branch asks)" in capsys.readouterr().out
    assert _is(_exported(out), other)


@pytest.mark.parametrize(("method", "export_branch", "branch", "why"), [
    ("m2t", "auto", "teacher", "Momentum² Teacher authors evaluate the teacher"),
    ("byol", "auto", "student", "BYOL paper evaluates the online network"),
    ("eman", "auto", "student", "EMAN's code evaluates the online network"),
    ("projector_only", "auto", "student", "its only backbone is the student's"),
    ("m2t", "student", "student", "train.export_branch student"),
    # Written before "auto" existed, where "teacher" was the default: the value stands, and
    # the line says what the method alone would take.
    ("byol", "teacher", "teacher", "method byol alone would take the student"),
])
def test_our_checkpoints_export_by_method_unless_they_name_a_branch(
        method: str, export_branch: str, branch: str, why: str, r18_pair, synth,
        tmp_path: Path, capsys) -> None:
    teacher, student = r18_pair
    path = tmp_path / "last.pth"
    torch.save(synth.our_checkpoint(teacher, student, method=method,
                                    export_branch=export_branch), path)
    out = tmp_path / "out.pkl"
    assert main([str(path), str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert f"branch:   {branch} (" in text and why in text and "verification passed" in text
    exported = student if branch == "student" or method == "projector_only" else teacher
    assert _is(_exported(out), exported)


def test_safetensors_file_converts_without_pickle(r18_pair, tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    _, student = r18_pair
    path = tmp_path / "resnet18.safetensors"
    save_file({**student, **fc("")}, str(path))  # as timm / Hugging Face publish it
    out = tmp_path / "out.pkl"
    assert main([str(path), str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "torchvision ResNet state dict" in text and "verification passed" in text
    assert _is(_exported(out), student)


def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert not Path(argv[1]).exists()
    return lines[0]


@pytest.fixture()
def byol_module(monkeypatch: pytest.MonkeyPatch) -> type:
    """DeepMind's ``byol.byol_experiment._ByolExperimentState``, registered where pickle
    looks for it, so that the checkpoint below pickles exactly as DeepMind's does."""
    fields = ("online_params", "target_params", "online_state", "target_state", "opt_state")
    state = namedtuple("_ByolExperimentState", fields)
    module = types.ModuleType("byol.byol_experiment")
    state.__module__ = module.__name__
    module._ByolExperimentState = state
    monkeypatch.setitem(sys.modules, "byol", types.ModuleType("byol"))
    monkeypatch.setitem(sys.modules, "byol.byol_experiment", module)
    return state


def _haiku(arrays: dict[str, dict[str, np.ndarray]]) -> dict:
    return {f"res_net18/~/{module}": params for module, params in arrays.items()}


@pytest.mark.parametrize("as_dict", [False, True], ids=["namedtuple", "dict"])
def test_deepmind_byol_pickle_is_refused_in_one_line_naming_it(
        as_dict: bool, byol_module: type, tmp_path: Path, capsys) -> None:
    """byol/utils/checkpointing.py pickles {'experiment_state', 'step', 'rng'} (protocol 2)
    of numpy arrays under Haiku module names."""
    params = _haiku({"initial_conv": {"w": np.zeros((7, 7, 3, 64), np.float32)},
                     "initial_batchnorm": {"scale": np.ones((1, 1, 1, 64), np.float32),
                                           "offset": np.zeros((1, 1, 1, 64), np.float32)}})
    state = byol_module(params, params, {}, {}, ())
    if as_dict:
        state = state._asdict()
    path = tmp_path / "pretrain_res18x1.pkl"
    path.write_bytes(pickle.dumps({"experiment_state": state, "step": np.int64(5000),
                                   "rng": np.zeros(2, np.uint32)}, protocol=2))
    line = _refused([str(path), str(tmp_path / "out.pkl")], capsys)
    assert line.startswith(f"error: {path}: ")
    assert "DeepMind BYOL checkpoint (JAX/Haiku" in line and "already converted" not in line


def test_two_backbones_neither_named_are_refused_listing_the_prefix_choices(
        r18_pair, tmp_path: Path, capsys) -> None:
    teacher, student = r18_pair
    path = tmp_path / "custom.pth"
    torch.save({"state_dict": {**tv("net_a.", teacher), **tv("trunk.", student)}}, path)
    line = _refused([str(path), str(tmp_path / "out.pkl")], capsys)
    assert "none is a teacher or a student" in line
    assert "--prefix 'state_dict.net_a.' or --prefix 'state_dict.trunk.'" in line
    assert main([str(path), str(tmp_path / "out.pkl"), "--prefix", "trunk."]) == 0
    assert "(as --prefix asks)" in capsys.readouterr().out
    assert _is(_exported(tmp_path / "out.pkl"), student)


def test_a_copy_that_differs_from_its_original_is_not_silently_dropped(
        r18_pair, tmp_path: Path, capsys) -> None:
    """OpenSelfSup's ``encoder_q.0`` is ``backbone``; if the file says otherwise, both are
    offered."""
    teacher, student = r18_pair
    path = tmp_path / "densecl.pth"
    torch.save({"state_dict": {**tv("backbone.", student), **tv("encoder_q.0.", teacher),
                               **tv("encoder_k.0.", teacher)}}, path)
    line = _refused([str(path), str(tmp_path / "out.pkl")], capsys)
    assert "student branch is ambiguous" in line
    assert "--prefix 'state_dict.backbone.' or --prefix 'state_dict.encoder_q.0.'" in line


def test_the_format_table_lists_every_layout_and_method() -> None:
    from convert.layouts import LAYOUTS, OUR_METHODS

    text = (Path(__file__).resolve().parents[2] / "docs" / "checkpoint-formats.md").read_text()
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("| ")]
    for layout in LAYOUTS:
        row = next((r for r in rows if r.startswith(f"| {layout.name} |")), None)
        assert row is not None, f"{layout.name} is not in docs/checkpoint-formats.md"
        if not layout.ours:
            assert f"| {layout.default} |" in row, row
    for method, (branch, _) in OUR_METHODS.items():
        assert any(r.startswith(f"| `{method}`") and f"| {branch}" in r for r in rows), method
