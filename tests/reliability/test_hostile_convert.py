"""Hostile and messy input to ``m2t-convert`` (issue 13): nothing lost or overwritten, one line
and never a traceback.

Each case builds its input (checkpoints, output paths) in a fresh folder and runs the real CLI
entry point, ``convert.__main__.main``, in-process (an exception escaping it would be the
traceback a user sees); a few run as a subprocess to see the terminal's stderr. Every case
asserts: exit status 2 (the status of every command for input it refuses), exactly one
``error:`` line naming the culprit file, no traceback, and every entry that existed in the
folder before the command unchanged afterwards (type, bytes, mtime, inode), with nothing new
(no output, no temporary file).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import stat
import struct
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from convert.__main__ import main

from .conftest import error_line, python

State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def state() -> State:
    """A torchvision ResNet-18 backbone whose tensors are expanded scalars (tiny files)."""
    full = torchvision.models.resnet18().state_dict()
    return {k: torch.full((1,), 0.5, dtype=v.dtype).expand(v.shape) if v.dim() else v
            for k, v in full.items() if not k.startswith("fc.")}


# ----- building hostile files ----------------------------------------------------------------
def save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def with_one(state: State, key: str, value: float, dtype: torch.dtype | None = None) -> State:
    """``state`` with one element of ``key`` set to ``value`` (the rest untouched)."""
    out = dict(state) if dtype is None else {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tensor = out[key].clone()
    tensor.view(-1)[0] = value
    out[key] = tensor
    return out


def with_pickle(path: Path, payload: bytes) -> Path:
    """A torch.save ZIP archive whose ``data.pkl`` is ``payload`` (a hand-made pickle)."""
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)
    archive = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in archive.infolist():
            data = archive.read(info.filename)
            out.writestr(info.filename, payload if info.filename.endswith("/data.pkl") else data)
    return path


def nested_dicts(depth: int) -> bytes:
    """A protocol-2 pickle of {'a': {'a': ... {} ...}}, ``depth`` deep, built iteratively
    (pickle itself would recurse): 20 bytes per level."""
    return (b"\x80\x02" + b"}X\x01\x00\x00\x00a" * depth + b"}" + b"s" * depth + b".")


SELF_REFERENCE = b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s."  # d = {}; d['a'] = d


def shared_bomb(levels: int = 8, width: int = 20) -> dict:
    """A few kB on disk that names width**levels tensors: one dict shared at every level."""
    node: dict = {"w": torch.zeros(1)}
    for _ in range(levels):
        node = {str(i): node for i in range(width)}
    return node


def detectron2_detector() -> dict:
    """What Detectron2 saves as model_final.pth (a few of its keys)."""
    return {"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                      "backbone.bottom_up.res2.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                      "roi_heads.box_predictor.cls_score.weight": torch.zeros(81, 1024)},
            "iteration": 89999}


def detectron2_backbone(state: State) -> State:
    from convert.naming import torchvision_to_detectron2

    return {name: v for k, v in state.items()
            if (name := torchvision_to_detectron2(k)) is not None}


def torchscript(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)).save(str(path))
    return path


def safetensors_bytes() -> bytes:
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [1],
                                          "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\x00" * 4


def device_node(path: Path) -> Path:
    """A character device like /dev/null (1, 3) made here, or a link to /dev/null where the
    system refuses mknod: either way nothing outside the folder can be touched."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        path.symlink_to("/dev/null")
    return path


# ----- the table ---------------------------------------------------------------------------
@dataclass
class Case:
    """``make(folder, good, state)`` builds the inputs and returns (argv, culprit), where
    ``good`` is a valid checkpoint in ``folder``; the error line must name ``culprit`` and
    contain ``message``."""

    make: Callable[[Path, Path, State], tuple[list[str], Path]]
    message: str


def _input(name: str, obj: Callable[[State], object]) -> Callable:
    """A case whose input checkpoint is ``obj(state)`` saved as ``name``."""
    def make(folder: Path, good: Path, state: State) -> tuple[list[str], Path]:
        path = save(folder / name, obj(state))
        return [str(path), str(folder / "out.pkl")], path
    return make


def _raw(name: str, data: bytes | Callable[[Path], Path]) -> Callable:
    """A case whose input file holds ``data`` (or is made by ``data(path)``)."""
    def make(folder: Path, good: Path, state: State) -> tuple[list[str], Path]:
        path = folder / name
        if callable(data):
            data(path)
        else:
            path.write_bytes(data)
        return [str(path), str(folder / "out.pkl")], path
    return make


def _output(name: str, build: Callable[[Path, Path], None], *extra: str) -> Callable:
    """A case writing the good checkpoint to ``folder/name``, made by ``build(path, good)``."""
    def make(folder: Path, good: Path, state: State) -> tuple[list[str], Path]:
        path = folder / name
        build(path, good)
        return [str(good), str(path), *extra], path
    return make


def output_is_input(folder: Path, good: Path, state: State):
    return [str(good), str(good), "--force"], good


def output_is_input_by_relative_path(folder: Path, good: Path, state: State):
    (folder / "sub").mkdir()
    alias = Path(os.path.relpath(folder, Path.cwd())) / "sub" / ".." / good.name
    return [str(good), str(alias), "--force"], alias


def sidecar_is_input(folder: Path, good: Path, state: State):
    """``x.pkl`` writes its Detectron2 config to ``x.yaml``: here the input's own name."""
    source = folder / "ckpt.yaml"
    source.write_bytes(good.read_bytes())
    return [str(source), str(folder / "ckpt.pkl"), "--force"], source


def failure_keeps_the_earlier_output(folder: Path, good: Path, state: State):
    """--force onto a finished conversion, with an input that turns out bad."""
    (folder / "out.pkl").write_bytes(b"an earlier conversion")
    (folder / "out.yaml").write_text("MODEL: {}\n")
    bad = save(folder / "nan.pth", with_one(state, "conv1.weight", float("nan")))
    return [str(bad), str(folder / "out.pkl"), "--force"], bad


def existing_output_without_force(folder: Path, good: Path, state: State):
    (folder / "out.pkl").write_bytes(b"an earlier conversion")
    return [str(good), str(folder / "out.pkl")], folder / "out.pkl"


def two_students_collapse(folder: Path, good: Path, state: State):
    """``module.encoder_q.`` and ``encoder_q.`` strip to one prefix: two different students."""
    other = {k: v * 2 if v.is_floating_point() else v for k, v in state.items()}
    path = save(folder / "moco.pth", {**{f"module.encoder_q.{k}": v for k, v in state.items()},
                                      **{f"encoder_q.{k}": v for k, v in other.items()}})
    return [str(path), str(folder / "out.pkl"), "--branch", "student"], path


def newline_in_file_name(folder: Path, good: Path, state: State):
    path = folder / "bad\nerror: name.pth"
    path.write_text('{"not": "a checkpoint"}')
    return [str(path), str(folder / "out.pkl")], folder / "bad\\nerror: name.pth"


CASES: dict[str, Case] = {
    # outputs that are not (new or regular) files, or are the input
    "output is a FIFO": Case(_output("fifo.pth", lambda p, g: os.mkfifo(p), "--force"),
                             "FIFO"),
    "output is a device node": Case(_output("null.pkl", lambda p, g: device_node(p), "--force"),
                                    "character device"),
    "output links to /dev/null": Case(
        _output("devnull.pkl", lambda p, g: p.symlink_to("/dev/null"), "--force"),
        "character device"),
    "output is a directory": Case(_output("dir.pkl", lambda p, g: p.mkdir(), "--force"),
                                  "is a directory"),
    "output links to a directory": Case(
        _output("linkdir.pkl", lambda p, g: p.symlink_to(p.parent), "--force"),
        "is a directory"),
    "output is a dangling link": Case(
        _output("dangling.pkl", lambda p, g: p.symlink_to(p.parent / "gone"), "--force"),
        "symbolic link to a missing file"),
    "config snippet is a FIFO": Case(
        lambda f, g, s: ([str(g), str(f / "out.pkl"), "--force"],
                         (os.mkfifo(f / "out.yaml"), f / "out.yaml")[1]), "FIFO"),
    "output is the input": Case(output_is_input, "is the input checkpoint"),
    "output links to the input": Case(
        _output("alias.pth", lambda p, g: p.symlink_to(g), "--force"), "is the input"),
    "output is a hard link of the input": Case(
        _output("hard.pth", lambda p, g: os.link(g, p), "--force"), "is the input"),
    "output is the input by a relative path": Case(output_is_input_by_relative_path,
                                                   "is the input"),
    "config snippet is the input": Case(sidecar_is_input, "is the input checkpoint"),
    "--force, then the input fails": Case(failure_keeps_the_earlier_output, "non-finite"),
    "existing output without --force": Case(existing_output_without_force, "--force"),
    # tensors without data or with non-finite values
    "a meta-device tensor": Case(_input("meta.pth", lambda s: {
        **s, "layer3.0.conv1.weight": torch.empty(256, 128, 3, 3, device="meta")}),
        "meta device"),
    "all tensors on the meta device": Case(_input("allmeta.pth", lambda s: {
        k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in s.items()}),
        "meta device"),
    "NaN in a conv weight": Case(_input("nan.pth", lambda s: with_one(
        s, "layer2.0.conv1.weight", float("nan"))), "layer2.0.conv1.weight holds 1 NaN"),
    "inf in a running variance": Case(_input("inf.pth", lambda s: with_one(
        s, "layer4.1.bn2.running_var", float("inf"))), "layer4.1.bn2.running_var holds 0 NaN "
                                                      "and 1 infinite"),
    "-inf in a BN bias": Case(_input("ninf.pth", lambda s: {"state_dict": with_one(
        s, "bn1.bias", float("-inf"))}), "bn1.bias holds 0 NaN and 1 infinite"),
    "NaN in a half-precision checkpoint": Case(_input("half.pth", lambda s: with_one(
        s, "layer1.0.bn1.weight", float("nan"), torch.float16)), "layer1.0.bn1.weight"),
    "float64 too large for float32": Case(_input("f64.pth", lambda s: with_one(
        s, "conv1.weight", 1e300, torch.float64)), "conv1.weight holds 0 NaN and 1 infinite"),
    # MoCo exports its query encoder (the student) by default, as its own converter does
    "NaN in the exported branch": Case(_input("moco_nan.pth", lambda s: {
        **{f"encoder_q.{k}": v
           for k, v in with_one(s, "layer1.1.conv2.weight", float("nan")).items()},
        **{f"encoder_k.{k}": v for k, v in s.items()}}),
        "'encoder_q.' (student"),
    # pathological nesting and size
    "dicts nested 100000 deep": Case(_raw("deep.pth", lambda p: with_pickle(
        p, nested_dicts(100_000))), "levels deep"),
    "a dict that contains itself": Case(_raw("cycle.pth", lambda p: with_pickle(
        p, SELF_REFERENCE)), "levels deep"),
    "one dict shared 20**8 times": Case(_input("bomb.pth", lambda s: shared_bomb()),
                                        "more than 1,000,000 entries"),
    "a key of 100000 characters": Case(_input("longkey.pth", lambda s: {
        "x" * 100_000: {"conv1.weight": torch.zeros(1)}}), "longer than 1000 characters"),
    "two entries with one dotted key": Case(_input("clash.pth", lambda s: {
        **s, "conv1": {"weight": torch.zeros(1)}}), "same key 'conv1.weight'"),
    # two backbones that strip to one prefix
    "module.encoder_q. and encoder_q.": Case(two_students_collapse,
                                             "--prefix 'module.encoder_q.' or --prefix "
                                             "'encoder_q.'"),
    "state_dict and model, both backbones": Case(_input("two.pth", lambda s: {
        "state_dict": s, "model": {k: v.clone() for k, v in s.items()}}),
        "--prefix 'state_dict.' or --prefix 'model.'"),
    # names from the file cannot break the line
    "a line break in a key": Case(_input("newline.pth", lambda s: {
        "a\nerror: injected\rb\u2028c": torch.zeros(1)}), "a\\nerror: injected\\rb\\u2028c"),
    "a line break in the file name": Case(newline_in_file_name, "JSON file"),
    # files of the wrong kind
    "empty file": Case(_raw("empty.pth", b""), "is empty (0 bytes)"),
    "JSON renamed .pth": Case(_raw("results.pth", b'  {"bbox": {"AP": 40.1}}\n'), "JSON file"),
    "YAML renamed .pth": Case(_raw("config.pth", b"MODEL:\n  WEIGHTS: x\n"), "text file"),
    "an HTML error page": Case(_raw("download.pth", b"<!DOCTYPE html><html>404</html>"),
                               "HTML"),
    "Detectron2 model_final.pth": Case(_input("model_final.pth",
                                              lambda s: detectron2_detector()),
                                       "whole detector"),
    "Detectron2-named backbone .pth": Case(_input("d2.pth", detectron2_backbone),
                                           "Detectron2's naming"),
    "a .pkl that is not a checkpoint": Case(_raw("list.pkl", pickle.dumps([1, 2, 3])),
                                            "plain Python pickle"),
    "a converted Detectron2 .pkl": Case(_raw("r18.pkl", pickle.dumps(
        {"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
         "__author__": "m2t-convert"}, protocol=4)), "already converted"),
    "a TorchScript archive": Case(_raw("scripted.pt", torchscript), "TorchScript"),
    "a ZIP of images": Case(_raw("images.pth", lambda p: zipfile.ZipFile(p, "w").writestr(
        "a.jpg", b"\xff\xd8\xff")), "ZIP archive"),
    "a NumPy .npz": Case(_raw("weights.npz", lambda p: np.savez(p, w=np.zeros(3))), "NumPy"),
    "a NumPy .npy": Case(_raw("weights.npy", lambda p: np.save(p, np.zeros(3))), "NumPy"),
    "a safetensors file": Case(_raw("model.safetensors", safetensors_bytes()), "safetensors"),
    "a gzip file": Case(_raw("ckpt.pth.gz", b"\x1f\x8b\x08\x00" + bytes(20)), "gzip"),
    "a directory as input": Case(_raw("ckpt_dir.pth", lambda p: p.mkdir()),
                                 "is a directory"),
    "a character device as input": Case(_raw("zero", lambda p: device_node(p)),
                                        "character device"),
}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: type, inode, size, mtime and (regular files) bytes;
    links and special files are not followed, so a FIFO is never opened."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else (
                os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)
            out[path] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns, data)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_convert_refuses_hostile_input_in_one_line(name: str, state: State, tmp_path: Path,
                                                   capsys, ledger) -> None:
    case = CASES[name]
    good = save(tmp_path / "good.pth", state)
    argv, culprit = case.make(tmp_path, good, state)
    before = snapshot(tmp_path)
    time.sleep(0.01)  # a rewrite, even of the same bytes, would show in the mtime
    t0 = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t0
    ledger.bad_input("convert: hostile input")
    line = error_line(capsys.readouterr().err, culprit)
    assert code == 2, line
    assert line.startswith(f"error: {culprit}: "), line
    assert case.message in line[len(f"error: {culprit}: "):], line  # not just in the name
    assert snapshot(tmp_path) == before  # nothing replaced, nothing half-written, nothing new
    assert elapsed < 20, f"{name}: refused only after {elapsed:.0f} s"


def test_the_cases_fail_for_their_hostile_part_only(state: State, tmp_path: Path) -> None:
    """The good checkpoint of every case converts, and --force onto a regular file works:
    each refusal above is caused by what the case changed."""
    good = save(tmp_path / "good.pth", state)
    assert main([str(good), str(tmp_path / "out.pkl")]) == 0
    (tmp_path / "old.pth").write_bytes(b"an earlier conversion")
    assert main([str(good), str(tmp_path / "old.pth"), "--force"]) == 0
    assert torch.load(tmp_path / "old.pth", weights_only=True).keys() == state.keys()


def test_force_onto_a_link_to_a_regular_file_replaces_the_link_not_the_target(
        state: State, tmp_path: Path) -> None:
    good = save(tmp_path / "good.pth", state)
    target = tmp_path / "keep.pth"
    target.write_bytes(b"the user's file")
    link = tmp_path / "link.pth"
    link.symlink_to(target)
    assert main([str(good), str(link), "--force"]) == 0
    assert target.read_bytes() == b"the user's file"
    assert not link.is_symlink() and torch.load(link, weights_only=True).keys() == state.keys()


def test_collapsed_prefixes_export_exactly_the_backbone_chosen(state: State,
                                                               tmp_path: Path) -> None:
    """Before, ``encoder_q.``'s tensors overwrote ``module.encoder_q.``'s under the latter's
    name; now --prefix takes each one whole."""
    other = {k: v * 2 if v.is_floating_point() else v for k, v in state.items()}
    source = save(tmp_path / "moco.pth", {**{f"module.encoder_q.{k}": v for k, v in state.items()},
                                          **{f"encoder_q.{k}": v for k, v in other.items()}})
    for prefix, expected in (("module.encoder_q.", state), ("encoder_q.", other)):
        out = tmp_path / f"{prefix.replace('.', '_')}.pth"
        assert main([str(source), str(out), "--prefix", prefix]) == 0
        written = torch.load(out, weights_only=True)
        assert all(torch.equal(written[k], v.float() if v.is_floating_point() else v)
                   for k, v in expected.items())


def test_a_full_disk_while_writing_the_config_snippet_keeps_both_earlier_outputs(
        state: State, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, ledger) -> None:
    """``ENOSPC`` at the fsync of ``out.yaml``'s temporary: before, ``out.pkl`` had already
    replaced the earlier one and was then deleted (with --force, the earlier result lost)."""
    good = save(tmp_path / "good.pth", state)
    (tmp_path / "out.pkl").write_bytes(b"an earlier conversion")
    (tmp_path / "out.yaml").write_text("MODEL: {}\n")
    before = snapshot(tmp_path)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp.yaml"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main([str(good), str(tmp_path / "out.pkl"), "--force"]) == 2
    ledger.fault("convert: ENOSPC writing the config snippet")
    line = error_line(capsys.readouterr().err, tmp_path / "out.yaml")
    assert "No space left on device" in line
    assert snapshot(tmp_path) == before


SUBPROCESS = ("a line break in a key",)


@pytest.mark.slow
def test_no_traceback_reaches_the_terminal(state: State, tmp_path: Path, ledger) -> None:
    """Through ``python -m convert``: a FIFO as input (in-process, reading it would block the
    test for ever if the check were missing) and some table cases; stderr is exactly one line."""
    runs: list[tuple[str, list[str], Path, str]] = []
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    runs.append(("FIFO as input", [str(fifo), str(tmp_path / "fifo_out.pkl")], fifo, "FIFO"))
    for name in SUBPROCESS:
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        argv, culprit = CASES[name].make(folder, save(folder / "good.pth", state), state)
        runs.append((name, argv, culprit, CASES[name].message))
    for name, argv, culprit, message in runs:
        before = snapshot(tmp_path)
        proc = python(["-m", "convert", *argv], timeout=120)
        ledger.bad_input("convert: hostile input (subprocess)")
        if "Traceback" in proc.stderr:
            ledger.traceback("convert: hostile input (subprocess)")
        line = error_line(proc.stderr, culprit)
        assert proc.returncode == 2 and message in line, (name, proc.returncode, line)
        assert snapshot(tmp_path) == before, name
