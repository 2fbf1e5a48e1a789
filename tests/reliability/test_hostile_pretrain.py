"""Hostile and messy input to ``m2t-pretrain train`` and ``knn``, by class (issue 13).

A table of generated cases: numbers outside their range (every numeric setting, as a
``key=value`` override and in a YAML file), output folders that hold another run's results,
image folders that are missing, empty, unreadable or do not match, damaged ``--resume``
state, and files of the wrong kind for ``knn``. Each case must exit with code 2 and exactly
one ``error:`` line naming the file or option, print no traceback, and leave every file that
existed before byte-for-byte (and time-stamp) as it was. Then what bad input used to do
silently: metrics logged twice after Ctrl-C and ``--resume``, images multiplied by a symbolic
link loop, raw library warnings on the terminal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from pretrain.__main__ import CONFIG_DIR, main
from pretrain.config import Config, load_config

from .conftest import ENV, TINY, error_line, python

pytestmark = pytest.mark.slow

NO_CUDA = not torch.cuda.is_available()

# ----- what must be refused, written from the issue (not read from the schema) ------------
#: Values outside each numeric setting's meaning, as the issue and the settings' docs say.
OUT_OF_RANGE: dict[str, list[object]] = {
    "model.proj_hidden_dim": [0, -1],
    "model.proj_dim": [0, -3],
    "model.width": [0, 4, -64, 4096],
    "model.base_momentum": [-0.1, 1.0, 1.5],
    "model.residual_weight": [-1.0],
    "data.batch_size": [0, 1, -8],
    "data.image_size": [0, 8, -32],
    "data.workers": [-1],
    "data.max_bad_fraction": [-0.1, 1.5],
    "data.min_scale": [0, -0.5, 1.01],
    "data.view1_blur": [-0.1, 1.5],
    "data.view2_blur": [-1, 2],
    "optim.base_lr": [0, -0.1],
    "optim.momentum": [-0.1, 1.0],
    "optim.weight_decay": [-1e-4],
    "optim.warmup_epochs": [-1, -0.5],
    "optim.lars_trust_coefficient": [0, -1e-3],
    "train.epochs": [-1],
    "train.steps": [-1],
    "train.seed": [-1, 2**64],
    "train.log_every": [0, -1],
    "train.save_every_epochs": [0, -1],
    "train.save_every_steps": [-1],
    "train.knn_every_epochs": [0, -5],
    "train.knn_k": [0, -1],
    "train.knn_temperature": [0, -0.07],
    "train.knn_chunk_mb": [0, -1],
    "train.knn_bank_per_class": [-1],
}

#: Values at the edges that mean something and must still be accepted.
AT_THE_EDGE: dict[str, list[object]] = {
    "model.base_momentum": [0.0, 0.999], "model.residual_weight": [0.0],
    "model.width": [8, 1024],
    "data.batch_size": [2], "data.image_size": [16], "data.workers": [0],
    "data.max_bad_fraction": [0.0, 1.0], "data.min_scale": [1.0, 1e-6],
    "data.view1_blur": [0.0, 1.0], "data.view2_blur": [0, 1],
    "optim.momentum": [0.0], "optim.weight_decay": [0.0], "optim.warmup_epochs": [0],
    "optim.base_lr": [1e30], "train.save_every_steps": [0], "train.seed": [0, 2**63 - 1],
    "train.knn_temperature": [1e-3],
    "train.knn_chunk_mb": [1], "train.knn_bank_per_class": [0, 1],
}


def numeric_settings() -> list[tuple[str, type]]:
    """Every ``section.key`` of the schema whose value is an int or a float (maybe None)."""
    found = []
    for section in dataclasses.fields(Config):
        for name, hint in typing.get_type_hints(type(getattr(Config(), section.name))).items():
            kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            if kinds[0] in (int, float):
                found.append((f"{section.name}.{name}", kinds[0]))
    return found


def yaml_value(value: object) -> str:
    return yaml.safe_dump(value).splitlines()[0].removesuffix("...").strip() or "''"


# ----- watching files ----------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, tuple]:
    """Kind, size, inode and time stamp of every entry under ``roots`` (and the bytes of the
    small ones): anything written, replaced, touched or removed shows."""
    state: dict[str, tuple] = {}
    for root in roots:
        if not os.path.lexists(root):
            state[str(root)] = ("absent",)
            continue
        entries = [root]
        if root.is_dir() and not root.is_symlink():
            for folder, dirs, files in os.walk(root):
                entries += [Path(folder) / n for n in dirs + files]
        for entry in entries:
            st = os.lstat(entry)
            digest = ""
            if entry.is_symlink():
                digest = os.readlink(entry)
            elif entry.is_file() and st.st_size < 1 << 20:
                digest = hashlib.sha256(entry.read_bytes()).hexdigest()
            state[str(entry)] = (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns, digest)
    return state


# ----- the workspace every case builds on ------------------------------------------------
@dataclass
class Workspace:
    data: Path    # a copy of the tiny training folder (4 classes x 16 images, as links)
    val: Path     # its labelled validation folder (same classes)
    run: Path     # a real run stopped at step 2 of 8 (last.pth hard-linked, not copied)
    base: Path    # where cases make their own folders


@pytest.fixture(scope="module")
def ws(tiny_train: Path, tiny_val: Path, started_run: Path,
       tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    base = tmp_path_factory.mktemp("hostile")
    data, val = base / "data", base / "val"
    shutil.copytree(tiny_train, data, symlinks=True)
    shutil.copytree(tiny_val, val, symlinks=True)
    return Workspace(data, val, link_run(started_run, base / "run"), base)


def link_run(src: Path, dst: Path) -> Path:
    """``dst``: the run ``src``, its checkpoints hard-linked (cheap), its small files copied."""
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.suffix == ".pth":
            os.link(entry, dst / entry.name)
        elif entry.is_file():
            shutil.copy2(entry, dst / entry.name)
    return dst


@dataclass
class Case:
    """One hostile command: what it runs, what its error line must name, what it must not touch."""

    reader: str
    argv: list[str]
    culprit: str | Path
    says: str = ""                                     # also in the error line
    watch: list[Path] = field(default_factory=list)    # besides the workspace
    trains: bool = False     # fails only once training ran: it may create its --out


Build = Callable[[Workspace, Path], Case]
CASES: dict[str, Build] = {}


def case(label: str) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES[label] = build
        return build
    return register


def train(ws: Workspace, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(ws.data), "--out", str(out), *TINY, "train.steps=8", *extra]


# ----- output folders: another run's results are never replaced ----------------------------
OUT = "pretrain: output directories"


def _folder(tmp: Path, files: dict[str, bytes | str]) -> Path:
    out = tmp / "out"
    out.mkdir()
    for name, content in files.items():
        (out / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return out


@case("out holds epoch checkpoints but no last.pth")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {"epoch_0005.pth": b"precious", "metrics.jsonl": '{"step": 40}\n'})
    return Case(OUT, train(ws, out), out, "epoch_0005.pth")


@case("out holds epoch checkpoints but no last.pth, with --resume")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {"epoch_0001.pth": b"precious", "epoch_0002.pth": b"precious"})
    return Case(OUT, [*train(ws, out), "--resume"], out, "epoch_0002.pth")


@case("out holds the user's own config.yaml")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {"config.yaml": (CONFIG_DIR / "resnet18_cifar.yaml").read_text()})
    return Case(OUT, ["train", "--config", str(out / "config.yaml"), "--data", str(ws.data),
                      "--out", str(out), *TINY], out / "config.yaml", "config.yaml")


@case("out holds another run's config.yaml and metrics, no checkpoint yet")
def _(ws: Workspace, tmp: Path) -> Case:
    other = load_config(None, [*TINY, "train.steps=8", "optim.base_lr=0.5"]).dump()
    out = _folder(tmp, {"config.yaml": other, "metrics.jsonl": '{"step": 1, "loss": 3.0}\n'})
    return Case(OUT, train(ws, out), out / "config.yaml")


@case("out holds last.pth, no --resume")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {"last.pth": b"precious"})
    return Case(OUT, train(ws, out), out, "--resume")


@case("out holds last.pth as a broken symbolic link, with --resume")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {})
    os.symlink(tmp / "moved_away.pth", out / "last.pth")
    return Case(OUT, [*train(ws, out), "--resume"], out / "last.pth", "moved_away.pth")


@case("out is a file")
def _(ws: Workspace, tmp: Path) -> Case:
    out = tmp / "out"
    out.write_text("a file where a folder should be")
    return Case(OUT, train(ws, out), out, watch=[out])


@case("out inside --data")
def _(ws: Workspace, tmp: Path) -> Case:
    out = ws.data / "runs" / "r1"
    return Case(OUT, train(ws, out), out, "--data")


@case("out is --data")
def _(ws: Workspace, tmp: Path) -> Case:
    return Case(OUT, train(ws, ws.data), ws.data, "--data")


@case("out inside --val")
def _(ws: Workspace, tmp: Path) -> Case:
    out = ws.val / "r1"
    return Case(OUT, [*train(ws, out), "--val", str(ws.val)], out, "--val")


# ----- image folders ----------------------------------------------------------------------
IMAGES = "pretrain: image folders"


@case("--data missing")
def _(ws: Workspace, tmp: Path) -> Case:
    data = tmp / "nope"
    return Case(IMAGES, ["train", "--data", str(data), "--out", str(tmp / "out"), *TINY], data)


@case("--data is a file")
def _(ws: Workspace, tmp: Path) -> Case:
    data = tmp / "images.tar"
    data.write_bytes(b"\0" * 512)
    return Case(IMAGES, ["train", "--data", str(data), "--out", str(tmp / "out"), *TINY], data,
                "not a folder", watch=[data])


@case("--data empty")
def _(ws: Workspace, tmp: Path) -> Case:
    data = tmp / "empty"
    data.mkdir()
    return Case(IMAGES, ["train", "--data", str(data), "--out", str(tmp / "out"), *TINY], data)


@case("--data images without class folders")
def _(ws: Workspace, tmp: Path) -> Case:
    data = tmp / "flat"
    data.mkdir()
    for img in sorted((ws.data / "airplane").iterdir())[:4]:
        os.symlink(img.resolve(), data / img.name)
    return Case(IMAGES, ["train", "--data", str(data), "--out", str(tmp / "out"), *TINY], data,
                watch=[data])


@case("--data class folder of text files")
def _(ws: Workspace, tmp: Path) -> Case:
    data = tmp / "text"
    (data / "notes").mkdir(parents=True)
    (data / "notes" / "readme.txt").write_text("no images here")
    return Case(IMAGES, ["train", "--data", str(data), "--out", str(tmp / "out"), *TINY], data,
                watch=[data])


@case("--data class folder holding only a symbolic link loop")
def _(ws: Workspace, tmp: Path) -> Case:
    data = tmp / "loop"
    (data / "cls").mkdir(parents=True)
    os.symlink("..", data / "cls" / "again")
    return Case(IMAGES, ["train", "--data", str(data), "--out", str(tmp / "out"), *TINY], data,
                watch=[data])


@case("--data every image unreadable")
def _(ws: Workspace, tmp: Path) -> Case:
    data = tmp / "broken"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(8):
            (data / cls / f"{i}.jpg").write_bytes(b"<html>404</html>" if i % 2 else b"")
    return Case(IMAGES, ["train", "--data", str(data), "--out", str(tmp / "out"), *TINY,
                         "train.steps=4", "data.max_bad_fraction=1"], data, "could be read",
                watch=[data], trains=True)


@case("--val missing")
def _(ws: Workspace, tmp: Path) -> Case:
    val = tmp / "no_val"
    return Case(IMAGES, [*train(ws, tmp / "out"), "--val", str(val)], val)


@case("--val is a file")
def _(ws: Workspace, tmp: Path) -> Case:
    val = tmp / "val.txt"
    val.write_text("x")
    return Case(IMAGES, [*train(ws, tmp / "out"), "--val", str(val)], val, "not a folder",
                watch=[val])


@case("--val empty")
def _(ws: Workspace, tmp: Path) -> Case:
    val = tmp / "val_empty"
    val.mkdir()
    return Case(IMAGES, [*train(ws, tmp / "out"), "--val", str(val)], val)


@case("--val with other classes")
def _(ws: Workspace, tmp: Path) -> Case:
    val = tmp / "val_other"
    for cls in ("airplane", "zebra"):
        (val / cls).mkdir(parents=True)
        os.symlink(sorted((ws.val / "airplane").iterdir())[0].resolve(), val / cls / "0.jpg")
    return Case(IMAGES, [*train(ws, tmp / "out"), "--val", str(val)], val, "zebra",
                watch=[val])


# ----- damaged --resume state (what tests/reliability/test_fuzz.py does not cover) ---------
RESUME = "pretrain: --resume state"


def _resume(ws: Workspace, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(ws.data), "--out", str(out), "--resume", *extra]


def _small_checkpoint(**config_edits: object) -> dict:
    """A well-typed m2t-pretrain checkpoint of a few kilobytes, its config edited."""
    cfg = load_config(None, [*TINY, "train.steps=8"]).to_dict()
    for key, value in config_edits.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return {"format": "momentum2-pretrain", "version": 1, "config": cfg, "student": {},
            "teacher": {}, "optimizer": {}, "scaler": {}, "step": 2, "total_steps": 8,
            "rng": {"torch": torch.get_rng_state(), "python": [3, [0] * 625, None]}}


@case("resume: last.pth empty")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {"last.pth": b""})
    return Case(RESUME, _resume(ws, out), out / "last.pth", "not a readable checkpoint")


@case("resume: last.pth cut in half")
def _(ws: Workspace, tmp: Path) -> Case:
    data = (ws.run / "last.pth").read_bytes()
    out = _folder(tmp, {"last.pth": data[: len(data) // 2]})
    return Case(RESUME, _resume(ws, out), out / "last.pth", "not a readable checkpoint")


@case("resume: last.pth is a folder")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {})
    (out / "last.pth").mkdir()
    return Case(RESUME, _resume(ws, out), out / "last.pth")


@case("resume: last.pth is a Detectron2 pickle")
def _(ws: Workspace, tmp: Path) -> Case:
    out = _folder(tmp, {"last.pth": pickle.dumps(
        {"model": {"stem.conv1.weight": np.zeros((2, 3, 1, 1), np.float32)}}, protocol=4)})
    return Case(RESUME, _resume(ws, out), out / "last.pth", "pickle")


for _key, _value in [("train__knn_temperature", 0.0), ("train__save_every_epochs", 0),
                     ("model__proj_dim", 0), ("train__seed", 2**64)]:
    def _build(ws: Workspace, tmp: Path, key: str = _key, value: object = _value) -> Case:
        out = _folder(tmp, {})
        torch.save(_small_checkpoint(**{key: value}), out / "last.pth")
        return Case(RESUME, _resume(ws, out), out / "last.pth", key.replace("__", "."))
    CASES[f"resume: saved config with {_key.replace('__', '.')}={_value}"] = _build


@case("resume: with another model")
def _(ws: Workspace, tmp: Path) -> Case:
    return Case(RESUME, _resume(ws, ws.run, "model.proj_dim=16"), ws.run / "last.pth",
                "model settings differ")


@case("resume: with another number of steps")
def _(ws: Workspace, tmp: Path) -> Case:
    return Case(RESUME, _resume(ws, ws.run, "train.steps=6"), ws.run / "last.pth",
                "total steps")


@case("resume: metrics.jsonl is a folder")
def _(ws: Workspace, tmp: Path) -> Case:
    out = link_run(ws.run, tmp / "out")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    return Case(RESUME, _resume(ws, out), out / "metrics.jsonl", watch=[out])


# ----- command-line arguments of train ---------------------------------------------------
ARGS = "pretrain: command-line arguments"

for _args, _culprit in [(["--stop-after", "-1"], "--stop-after"),
                        (["--stop-after", "-100"], "--stop-after"),
                        (["--profile", "-2"], "--profile")]:
    def _build(ws: Workspace, tmp: Path, args: list[str] = _args, culprit: str = _culprit) -> Case:
        return Case(ARGS, [*train(ws, tmp / "out"), *args], culprit)
    CASES[f"train {' '.join(_args)}"] = _build

if NO_CUDA:
    @case("train --device cuda without CUDA")
    def _(ws: Workspace, tmp: Path) -> Case:
        return Case(ARGS, [*train(ws, tmp / "out"), "--device", "cuda"], "train.device=cuda")

    @case("train.device: cuda in a YAML file without CUDA")
    def _(ws: Workspace, tmp: Path) -> Case:
        config = tmp / "gpu.yaml"
        config.write_text("train: {device: cuda}\n")
        return Case(ARGS, ["train", "--config", str(config), "--data", str(ws.data), "--out",
                           str(tmp / "out"), *TINY[:-1]], "train.device=cuda", watch=[config])


# ----- knn and linear: arguments and files of the wrong kind --------------------------------
KNN = "pretrain: knn/linear inputs"


def knn(ws: Workspace, run: str | Path, *extra: str, command: str = "knn") -> list[str]:
    return [command, str(run), "--train", str(ws.data), "--val", str(ws.val), *extra]


for _extra, _culprit in [(["--k", "0"], "--k"), (["--k", "-1"], "--k"),
                         (["--temperature", "0"], "--temperature"),
                         (["--temperature", "-0.5"], "--temperature"),
                         (["--temperature", "nan"], "--temperature"),
                         (["--temperature", "inf"], "--temperature"),
                         (["--image-size", "0"], "--image-size"),
                         (["--image-size", "100000"], "--image-size"),
                         (["--device", "gpu"], "--device gpu"),
                         *([(["--device", "cuda"], "--device cuda")] if NO_CUDA else [])]:
    def _build(ws: Workspace, tmp: Path, extra: list[str] = _extra, culprit: str = _culprit
               ) -> Case:
        return Case(KNN, knn(ws, ws.run, *extra), culprit)
    CASES[f"knn {' '.join(_extra)}"] = _build

for _extra, _culprit in [(["--epochs", "0"], "--epochs"), (["--lr", "0"], "--lr"),
                         (["--lr", "nan"], "--lr"), (["--image-size", "-1"], "--image-size")]:
    def _build(ws: Workspace, tmp: Path, extra: list[str] = _extra, culprit: str = _culprit
               ) -> Case:
        return Case(KNN, knn(ws, ws.run, *extra, command="linear"), culprit)
    CASES[f"linear {' '.join(_extra)}"] = _build


@case("knn of a Detectron2 .pkl")
def _(ws: Workspace, tmp: Path) -> Case:
    pkl = tmp / "m2t_r18.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((2, 3, 1, 1), np.float32)},
                     "__author__": "m2t-convert", "matching_heuristics": True}, f, protocol=4)
    return Case(KNN, knn(ws, pkl), pkl, "pickle", watch=[pkl])


@case("knn of a torchvision .pth")
def _(ws: Workspace, tmp: Path) -> Case:
    pth = tmp / "resnet18.pth"
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if k.startswith(("conv1", "bn1"))}
    torch.save(state, pth)
    return Case(KNN, knn(ws, pth), pth, "bare weights", watch=[pth])


@case("knn of an empty file")
def _(ws: Workspace, tmp: Path) -> Case:
    pth = tmp / "empty.pth"
    pth.write_bytes(b"")
    return Case(KNN, knn(ws, pth), pth, watch=[pth])


@case("knn of a folder without last.pth")
def _(ws: Workspace, tmp: Path) -> Case:
    run = tmp / "not_a_run"
    run.mkdir()
    return Case(KNN, knn(ws, run), run, watch=[run])


@case("knn with --val of other classes")
def _(ws: Workspace, tmp: Path) -> Case:
    val = tmp / "val3"
    for cls in sorted(ws.val.iterdir())[:3]:
        shutil.copytree(cls, val / cls.name, symlinks=True)
    return Case(KNN, ["knn", str(ws.run), "--branch", "teacher", "--train", str(ws.data),
                      "--val", str(val)], val, "class folders differ", watch=[val])


@case("knn with --train missing")
def _(ws: Workspace, tmp: Path) -> Case:
    missing = tmp / "no_train"
    return Case(KNN, ["knn", str(ws.run), "--branch", "teacher", "--train", str(missing),
                      "--val", str(ws.val)], missing)


# ----- numbers outside their range: overrides and YAML files -------------------------------
RANGES = "pretrain: config values out of range"


def _range_cases() -> dict[str, tuple[str, object]]:
    """(key, value) for every entry of OUT_OF_RANGE, and non-finite / 64-bit-overflowing
    values for every numeric setting of the schema."""
    table = {f"{key}={value}": (key, value) for key, values in OUT_OF_RANGE.items()
             for value in values}
    for key, kind in numeric_settings():
        extremes = ([math.nan, math.inf, -math.inf] if kind is float else [2**64, -2**64])
        table.update({f"{key}={value}": (key, value) for value in extremes})
    return table


for _label, (_key, _value) in _range_cases().items():
    def _override(ws: Workspace, tmp: Path, key: str = _key, value: object = _value) -> Case:
        return Case(RANGES, [*train(ws, tmp / "out"), f"{key}={yaml_value(value)}"], key,
                    "command line")

    def _file(ws: Workspace, tmp: Path, key: str = _key, value: object = _value) -> Case:
        config = tmp / "cfg.yaml"
        section, name = key.split(".")
        config.write_text(yaml.safe_dump({section: {name: value}}))
        return Case(RANGES, ["train", "--config", str(config), "--data", str(ws.data),
                             "--out", str(tmp / "out")], key, str(config), watch=[config])
    CASES[f"override {_label}"] = _override
    CASES[f"yaml {_label}"] = _file


@case("no epochs and no steps")
def _(ws: Workspace, tmp: Path) -> Case:
    return Case(RANGES, [*train(ws, tmp / "out"), "train.epochs=0", "train.steps=0"],
                "train.epochs")


# ----- the table --------------------------------------------------------------------------
@pytest.mark.parametrize("label", list(CASES))
def test_hostile_input_is_one_error_line_and_changes_no_file(
        label: str, ws: Workspace, tmp_path: Path, capsys, ledger) -> None:
    c = CASES[label](ws, tmp_path)
    watched = [ws.data, ws.val, ws.run, *c.watch]
    created = [] if c.trains or os.path.lexists(tmp_path / "out") else [tmp_path / "out"]
    before = snapshot(*watched, *created)
    capsys.readouterr()
    ledger.bad_input(c.reader)
    try:
        code = main(c.argv)
    except BaseException:  # noqa: BLE001 - exactly what this test looks for
        ledger.traceback(c.reader)
        pytest.fail(f"exception escaped main:\n{traceback.format_exc()}")
    err = capsys.readouterr().err
    if "Traceback" in err:
        ledger.traceback(c.reader)
    assert code == 2, err
    line = error_line(err, c.culprit)
    assert c.says in line, line
    after = snapshot(*watched, *created)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, changed


# ----- the same boundaries, accepted ------------------------------------------------------
def test_every_numeric_setting_has_a_range_beside_its_field() -> None:
    keys = {key for key, _ in numeric_settings()}
    assert keys == set(OUT_OF_RANGE), ("numeric settings without hostile values in this test: "
                                       f"{sorted(keys - set(OUT_OF_RANGE))}")
    for key in keys:
        section, name = key.split(".")
        meta = {f.name: f for f in dataclasses.fields(getattr(Config(), section))}[name].metadata
        assert "range" in meta, f"{key} has no range"


@pytest.mark.parametrize("override", [f"{k}={yaml_value(v)}" for k, vs in AT_THE_EDGE.items()
                                      for v in vs])
def test_values_at_the_edge_of_a_range_are_accepted(override: str) -> None:
    cfg = load_config(None, [override])
    key, _ = override.split("=", 1)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == yaml.safe_load(override.split("=", 1)[1])


# ----- in subprocesses: nothing but the one line reaches the terminal ----------------------
def test_hostile_input_through_the_installed_command_prints_no_traceback(
        ws: Workspace, tmp_path: Path, ledger) -> None:
    bomb = tmp_path / "bomb.yaml"  # nine levels of nine aliases: 9**9 items if expanded
    lines = ["a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("optim: {base_lr: *i}")
    bomb.write_text("\n".join(lines) + "\n")
    runs = {bomb: ["-m", "pretrain", "train", "--config", str(bomb), "--data", str(ws.data),
                   "--out", str(tmp_path / "out")],
            "--stop-after": ["-m", "pretrain", "train", "--data", str(ws.data), "--out",
                             str(tmp_path / "out"), "--stop-after", "-1"]}
    for culprit, args in runs.items():
        proc = python(args, timeout=120, env=ENV)
        ledger.bad_input("pretrain: hostile input (subprocess)")
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = error_line(proc.stderr, culprit)
        assert len(line) < 300, line  # the alias bomb is not expanded into the message
    assert not (tmp_path / "out").exists()


# ----- what used to go wrong silently ------------------------------------------------------
def _step_records(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_ctrl_c_between_saves_then_resume_logs_every_step_once(
        ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, ledger,
        request: pytest.FixtureRequest) -> None:
    """Ctrl-C before the first save (the same command then starts afresh), Ctrl-C between two
    saves, a record cut in half by a kill: the finished run's metrics.jsonl holds each of its
    steps once, and none of the garbage."""
    from pretrain.checkpoint import load_checkpoint
    from pretrain.hooks import ProgressLog

    # Ctrl-C as a terminal gives it: Python's own SIGINT handler. In a fresh-clone .ci/run, a test
    # run earlier in the same worker had left SIGINT ignored, the signal went unnoticed and
    # the first run finished (exit 0 instead of 130).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    run = tmp_path / "run"
    argv = [*train(ws, run), "train.save_every_steps=3", "--resume"]
    log_step = ProgressLog._write  # train.log_every=1: each step is logged, then maybe saved
    interrupt_at: list[int] = []

    def log_then_ctrl_c(self, *args, **kwargs):
        result = log_step(self, *args, **kwargs)
        if self.trainer.step in interrupt_at:
            signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C
        return result

    monkeypatch.setattr(ProgressLog, "_write", log_then_ctrl_c)
    for stop in (2, 5):  # before the first save (step 3); between the saves at 3 and 6
        interrupt_at[:] = [stop]
        assert main(argv) == 130
        ledger.fault("pretrain: Ctrl-C " + ("before the first save" if stop == 2
                                            else "between two saves"))
        assert max(_step_records(run)) == stop
        saved = (run / "last.pth").exists() and load_checkpoint(run / "last.pth")["step"]
        assert saved == (False if stop == 2 else 3)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.2')  # a record a kill cut in half
    interrupt_at[:] = []
    capsys.readouterr()
    assert main(argv) == 0
    assert "dropped" in capsys.readouterr().out
    assert _step_records(run) == list(range(1, 9))
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # no torn line left


def test_a_symbolic_link_loop_does_not_multiply_a_class_folders_images(
        ws: Workspace, tmp_path: Path, capsys, ledger) -> None:
    data = tmp_path / "data"
    shutil.copytree(ws.data, data, symlinks=True)
    os.symlink(".", data / "airplane" / "again")         # airplane/again/again/... loops
    os.symlink("../cat", data / "cat" / "cats")          # cat/cats/cats/... too
    ledger.bad_input("pretrain: image folders", 2)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TINY, "train.steps=1"]) == 0
    captured = capsys.readouterr()
    assert "64 images" in captured.out, captured.out  # 4 classes x 16, each image once
    warning = [x for x in captured.err.splitlines() if x.startswith("warning: ")]
    assert len(warning) == 1 and str(data) in warning[0] and "used once" in warning[0]


def test_a_normal_run_prints_no_raw_library_warnings(ws: Workspace, tmp_path: Path) -> None:
    """More loader workers than CPUs (the default 8 on a small machine), the kNN monitor, a
    palette PNG with transparency (PIL remarks on it): the run says what matters once in its
    own words; nothing else reaches stderr."""
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(ws.data, data, symlinks=True)
    palette = Image.new("P", (40, 40))
    palette.putpalette([i % 256 for i in range(768)])
    palette.save(data / "cat" / "palette.png", transparency=bytes(range(256)))
    workers = len(os.sched_getaffinity(0)) + 1
    proc = python(["-m", "pretrain", "train", "--data", str(data), "--val", str(ws.val),
                   "--out", str(tmp_path / "run"), *TINY, "train.steps=2",
                   f"data.workers={workers}", "train.knn_every_epochs=1"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]
    assert sum(f"data.workers={workers} is more than" in x
               for x in proc.stdout.splitlines()) == 1, proc.stdout


def test_a_finished_run_stays_readable_by_knn_whatever_it_was_trained_with(
        ws: Workspace, tmp_path: Path, capsys) -> None:
    """Ranges bind what a run is asked to do; a checkpoint whose training settings today's
    ranges refuse (made before they existed) is still evaluated."""
    ckpt = torch.load(ws.run / "last.pth", map_location="cpu", weights_only=True)
    ckpt["config"]["train"]["save_every_epochs"] = 0
    ckpt["config"]["data"]["workers"] = 1000
    torch.save(ckpt, tmp_path / "old.pth")
    assert main(["knn", str(tmp_path / "old.pth"), "--branch", "teacher", "--train",
                 str(ws.data), "--val", str(ws.val)]) == 0, capsys.readouterr().err
    assert "| teacher | 2 |" in capsys.readouterr().out


def test_a_tiny_knn_temperature_votes_like_the_nearest_neighbours_instead_of_overflowing() -> None:
    from pretrain.knn import knn_accuracy

    # class 0: two points near +x; class 1: one point near +y; queries near +y are class 1
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0]]),
                                         dim=1)
    queries = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0], [0.2, 1.0]]), dim=1)
    labels, truth = torch.tensor([0, 0, 1]), torch.tensor([1, 1])
    for temperature in (0.07, 1e-3, 1e-6):  # in range; 1/T up to a million
        assert knn_accuracy(bank, labels, queries, truth, 2, k=3,
                            temperature=temperature) == 100.0, temperature
