"""Fuzzing the readers: truncated, random, bit-flipped and wrong-typed files (seeded).

Each case runs a command's ``main(argv)`` in-process on one generated file. Whatever the
file holds, the command must either accept it (the mutation happened to leave it valid) or
exit non-zero with exactly one line on stderr, ``error: <file>: <what is wrong>``: no
traceback, no exception escaping ``main``. A few subprocess runs at the end check that no
traceback reaches a terminal either.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle
import random
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import yaml

from .conftest import TINY, make_coco_dataset, python

pytestmark = pytest.mark.slow

# ----- generators ------------------------------------------------------------------------
WEIRD: list[Any] = [None, True, False, 0, -1, 7, 2**70, -2**63, 1.5, -0.0, 1e308,
                    float("nan"), float("inf"), "", "x", "1", "resnet50", "ünïcødé", "\x00",
                    [], [None], [1, "a"], [[1, 2], [3]], {}, {"a": 1}, {"": {}}, {"1": [{}]}]


def weird_value(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(WEIRD))


def weird_tensor(rng: random.Random) -> torch.Tensor:
    """A tensor of a kind a weights reader may not expect."""
    kind = rng.randrange(9)
    if kind == 0:
        return torch.zeros(0)
    if kind == 1:
        return torch.tensor(3.0)
    if kind == 2:
        return torch.zeros(3, dtype=torch.bool)
    if kind == 3:
        return torch.full((4,), float("nan"))
    if kind == 4:
        return torch.zeros(2, 2, dtype=torch.complex64)
    if kind == 5:
        return torch.arange(6, dtype=torch.int64).reshape(2, 3)
    if kind == 6:
        return torch.zeros(64, 3, 7, 7).to_sparse()
    if kind == 7:
        return torch.quantize_per_tensor(torch.zeros(64), 0.1, 0, torch.qint8)
    return torch.zeros(64, 3, 7, 7, dtype=torch.bfloat16)


def _paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (sequence of keys / indices) to a node inside nested dicts and lists."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _paths(value, (*prefix, i))


def mutate(obj: Any, rng: random.Random, value: Callable[[random.Random], Any] = weird_value,
           edits: int = 1) -> Any:
    """A deep copy of ``obj`` with ``edits`` random edits: replace, delete or empty a node."""
    obj = copy.deepcopy(obj)
    for _ in range(edits):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            return value(rng)
        path = rng.choice(paths)
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        op = rng.random()
        if op < 0.6:
            parent[path[-1]] = value(rng)
        elif op < 0.8 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], (dict, list)):
            parent[path[-1]] = type(parent[path[-1]])()
        else:
            parent[path[-1]] = [parent[path[-1]]]
    return obj


def corrupt_bytes(data: bytes, rng: random.Random, kind: str) -> bytes:
    """Truncated, bit-flipped or entirely random bytes."""
    if kind == "truncated":
        return data[: rng.randrange(len(data))]
    if kind == "bitflip":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    return rng.randbytes(rng.choice([0, 1, 4, 64, 1000, 5000]))


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ----- the harness -----------------------------------------------------------------------
class Cases:
    """Runs cases, checks each outcome, and keeps the first failures for the report."""

    def __init__(self, reader: str, ledger, capsys: pytest.CaptureFixture[str]) -> None:
        self.reader, self.ledger, self.capsys = reader, ledger, capsys
        self.failures: list[str] = []
        self.accepted = 0
        self.tried = 0

    def run(self, label: str, main: Callable[[Sequence[str]], int], argv: list[str],
            culprits: Sequence[str | Path]) -> None:
        """One case: ``main(argv)`` must succeed or print one error line naming a culprit."""
        self.tried += 1
        self.ledger.bad_input(self.reader)
        self.capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse usage errors: not what is fuzzed here
            code = exc.code
        except BaseException:  # noqa: BLE001 - exactly what the fuzzing looks for
            self.ledger.traceback(self.reader)
            self.failures.append(f"{label}: exception escaped main:\n{traceback.format_exc()}")
            return
        err = self.capsys.readouterr().err
        if code == 0:
            self.accepted += 1
            return
        lines = [x for x in err.strip().splitlines() if not x.startswith("warning: ")]
        if "Traceback" in err:
            self.ledger.traceback(self.reader)
        if len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in err:
            self.failures.append(f"{label}: exit {code}, stderr:\n{err[-2000:]}")
        elif not any(str(c) in lines[0] for c in culprits):
            self.failures.append(f"{label}: error names none of {culprits}: {lines[0]}")

    def check(self) -> None:
        assert not self.failures, (f"{len(self.failures)} of {self.tried} cases failed:\n"
                                   + "\n---\n".join(self.failures[:5]))


@pytest.fixture()
def cases(ledger, capsys, request) -> Cases:
    """Cases counted under the reader the test names (its ``READER`` marker argument)."""
    return Cases(request.node.get_closest_marker("reader").args[0], ledger, capsys)


# ----- pretraining checkpoints -------------------------------------------------------------
def _pretrain_checkpoint() -> dict[str, Any]:
    """A well-formed (if untrained) m2t-pretrain checkpoint, a few kilobytes."""
    from pretrain.config import load_config

    cfg = load_config(None, [*TINY, "train.steps=8"])
    return {"format": "momentum2-pretrain", "version": 1, "method": "m2t", "arch": "resnet18",
            "export_branch": "teacher", "config": cfg.to_dict(),
            "student": {"projector.0.weight": torch.zeros(2, 2)},
            "teacher": {"projector.0.weight": torch.zeros(2, 2)}, "optimizer": {},
            "scaler": {}, "step": 2, "epoch": 0, "total_steps": 8, "world_size": 1,
            "sampler": {"epoch": 0, "start_batch": 2, "seed": 0},
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())}}


@pytest.mark.reader("pretrain: checkpoint (knn)")
def test_fuzz_pretrain_checkpoint_reader(tmp_path: Path, cases: Cases) -> None:
    from pretrain.__main__ import main

    rng = random.Random(101)
    base = _pretrain_checkpoint()
    data = torch_bytes(base)
    missing = tmp_path / "no_images"
    for i in range(60):
        path = tmp_path / f"case{i}.pth"
        if i < 30:
            kind = ("truncated", "bitflip", "random")[i % 3]
            path.write_bytes(corrupt_bytes(data, rng, kind))
        else:
            kind = "wrong_types"
            path.write_bytes(torch_bytes(mutate(base, rng, edits=rng.randint(1, 3))))
        cases.run(f"{kind} #{i}", main, ["knn", str(path), "--train", str(missing),
                                         "--val", str(missing)], [path, missing])
    cases.check()


@pytest.mark.reader("pretrain: checkpoint (resume)")
def test_fuzz_pretrain_resume_of_a_real_checkpoint_with_wrong_entries(
        started_run: Path, tiny_train: Path, tmp_path: Path, cases: Cases) -> None:
    """The entries only a resume reads: optimizer, scaler, RNG states, step."""
    from pretrain.__main__ import main
    from pretrain.checkpoint import load_checkpoint

    real = load_checkpoint(started_run / "last.pth")
    run = tmp_path / "run"
    run.mkdir()
    edits = [("optimizer", {"state": 5, "param_groups": [{"params": "x"}]}),
             ("optimizer", {"state": {}, "param_groups": []}), ("scaler", {"scale": "big"}),
             ("rng", {"torch": torch.zeros(3), "python": [3, [1, 2], None]}),
             ("rng", {"torch": "seed", "python": 7}), ("step", -3), ("step", 10**9),
             ("total_steps", "8")]
    for key, value in edits:
        ckpt = dict(real)
        ckpt[key] = value
        torch.save(ckpt, run / "last.pth")
        cases.run(f"{key}={value!r}", main,
                  ["train", "--data", str(tiny_train), "--out", str(run), "--resume",
                   "--stop-after", "1"], [run / "last.pth"])
    cases.check()


# ----- m2t-convert input checkpoints ---------------------------------------------------------
def _cheap_resnet18() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state dict whose tensors are expanded scalars (a tiny file)."""
    state = torchvision.models.resnet18().state_dict()
    return {k: torch.ones(1, dtype=v.dtype).expand(v.shape) if v.dim() else v
            for k, v in state.items() if not k.startswith("fc.")}


@pytest.mark.reader("convert: input checkpoint")
def test_fuzz_convert_checkpoint_reader(tmp_path: Path, cases: Cases) -> None:
    from convert.__main__ import main

    rng = random.Random(202)
    state = _cheap_resnet18()
    data = torch_bytes({"state_dict": state})
    layouts: list[Callable[[], Any]] = [
        lambda: [state],
        lambda: {"state_dict": list(state.values())},
        lambda: {1: state},
        lambda: {"state_dict": {i: v for i, v in enumerate(state.values())}},
        lambda: torch.zeros(3),
        lambda: "a string",
        lambda: None,
        lambda: {"model": {"module": {"module": state}}, "encoder_q": state},
    ]
    for i in range(70):
        path = tmp_path / f"case{i}.pth"
        out = tmp_path / f"out{i}.pkl"
        if i < 30:
            kind = ("truncated", "bitflip", "random")[i % 3]
            path.write_bytes(corrupt_bytes(data, rng, kind))
        elif i < 30 + len(layouts):
            kind = "layout"
            path.write_bytes(torch_bytes(layouts[i - 30]()))
        else:
            kind = "wrong_tensor"
            broken = dict(state)
            for _ in range(rng.randint(1, 2)):
                key = rng.choice(sorted(broken))
                broken[key] = weird_tensor(rng) if rng.random() < 0.7 else weird_value(rng)
            path.write_bytes(torch_bytes({"state_dict": broken}))
        cases.run(f"{kind} #{i}", main, [str(path), str(out)], [path])
        out.unlink(missing_ok=True)
        out.with_suffix(".yaml").unlink(missing_ok=True)
    cases.check()


# ----- pretraining configs -----------------------------------------------------------------
def _random_config(rng: random.Random) -> Any:
    """A YAML document shaped roughly like a config: known and unknown sections and keys."""
    from pretrain.config import Config

    sections = {name: [f.name for f in dataclasses.fields(getattr(Config(), name))]
                for name in ("model", "data", "optim", "train")}
    doc: dict[Any, Any] = {}
    for _ in range(rng.randint(1, 4)):
        section = rng.choice([*sections, "trainer", "", 3])
        keys = sections.get(section, ["epochs", "x"])
        body = doc.setdefault(section, {}) if rng.random() < 0.9 else weird_value(rng)
        if isinstance(body, dict):
            for _ in range(rng.randint(1, 3)):
                body[rng.choice([*keys, "lr", "batchsize"])] = weird_value(rng)
        doc[section] = body
    return doc


@pytest.mark.reader("pretrain: config YAML")
def test_fuzz_pretrain_config_reader(tmp_path: Path, cases: Cases) -> None:
    from pretrain.__main__ import CONFIG_DIR, main

    rng = random.Random(303)
    shipped = (CONFIG_DIR / "resnet18_cifar.yaml").read_bytes()
    specials = [b"model: {arch: !!python/object/apply:os.system [true]}\n",
                b"a: &a [*a, *a]\n", b"\t- tab\n  : :\n", b"model:\n  arch: resnet18\n" * 2,
                b"- just\n- a list\n", b"42\n", b"\xff\xfe\x00binary", b"model: " + b"[" * 500,
                b"train: {steps: 1e999, seed: 0x10}\n", b"data: {batch_size: .inf}\n"]
    missing = tmp_path / "no_images"
    for i in range(70):
        path = tmp_path / f"case{i}.yaml"
        if i < len(specials):
            kind = "special"
            path.write_bytes(specials[i])
        elif i < 30:
            kind = ("truncated", "bitflip", "random")[i % 3]
            path.write_bytes(corrupt_bytes(shipped, rng, kind))
        else:
            kind = "wrong_types"
            path.write_text(yaml.safe_dump(_random_config(rng), allow_unicode=True))
        cases.run(f"{kind} #{i}", main, ["train", "--config", str(path), "--data", str(missing),
                                         "--out", str(tmp_path / "run")], [path, missing])
    cases.check()


@pytest.mark.reader("pretrain: key=value overrides")
def test_fuzz_pretrain_command_line_overrides(tmp_path: Path, cases: Cases) -> None:
    from pretrain.__main__ import main

    rng = random.Random(404)
    keys = ["model.arch", "data.batch_size", "optim.base_lr", "train.steps", "train.amp",
            "model.base_momentum", "data.max_bad_fraction", "train", "model.arch.x", "x.y",
            ".", "", "train.nonfinite"]
    values = ["", "=", "[1, 2", "{a: b}", "!!python/name:os.system", "nan", "-1", "1e-4",
              "null", "yes", "resnet18", "~", "0x1F", "3.5", "'quoted'", "a=b", "\x00"]
    missing = tmp_path / "no_images"
    for _ in range(40):
        items = [f"{rng.choice(keys)}={rng.choice(values)}" if rng.random() < 0.9
                 else rng.choice(values + keys).lstrip("-") for _k in range(rng.randint(1, 3))]
        cases.run(f"overrides {items!r}", main,
                  ["train", "--data", str(missing), "--out", str(tmp_path / "run"), *items],
                  ["command line", "override", "config:", missing])
    cases.check()


# ----- transfer: dataset JSON, predictions JSON, Detectron2 configs, weights -------------
@pytest.fixture(scope="module")
def coco_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A valid two-image COCO dataset and a valid results file for it."""
    folder = tmp_path_factory.mktemp("coco")
    gt = make_coco_dataset(folder / "data", num_images=2)
    data = json.loads(gt.read_text())
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
              "bbox": a["bbox"]} for a in data["annotations"]]
    path = folder / "predictions.json"
    path.write_text(json.dumps(preds))
    return gt, path


@pytest.mark.reader("transfer: dataset JSON")
def test_fuzz_transfer_dataset_json_reader(coco_files: tuple[Path, Path], tmp_path: Path,
                                           cases: Cases) -> None:
    from transfer.__main__ import main

    rng = random.Random(505)
    gt, preds = coco_files
    base = json.loads(gt.read_text())
    raw = gt.read_bytes()
    images = gt.parent / "images"
    for i in range(80):
        path = gt.parent / f"case{i}.json"  # beside images/, so a valid file finds them
        if i < 20:
            kind = ("truncated", "bitflip", "random")[i % 3]
            path.write_bytes(corrupt_bytes(raw, rng, kind))
        else:
            kind = "wrong_types"
            doc = mutate(base, rng, edits=rng.randint(1, 3))
            if rng.random() < 0.15 and isinstance(doc, dict):  # make it look like LVIS
                for cat in doc.get("categories") or []:
                    if isinstance(cat, dict):
                        cat["frequency"] = rng.choice(["r", "c", None])
            path.write_text(json.dumps(doc))
        if i % 2:
            argv = ["evaluate", "--dataset", str(path), "--predictions", str(preds)]
        else:  # training checks the images too; the weights come after the datasets
            argv = ["train", "--config", "fcos_R_50_FPN_1x", "--weights",
                    str(tmp_path / "absent.pkl"), "--train-dataset", str(path),
                    "--train-images", str(images), "--test-dataset", str(gt)]
        cases.run(f"{kind} #{i} ({argv[0]})", main, argv,
                  [path, preds, images, tmp_path / "absent.pkl"])
    cases.check()


@pytest.mark.reader("transfer: predictions JSON")
def test_fuzz_transfer_predictions_json_reader(coco_files: tuple[Path, Path], tmp_path: Path,
                                               cases: Cases) -> None:
    from transfer.__main__ import main

    rng = random.Random(606)
    gt, preds = coco_files
    base = json.loads(preds.read_text())
    for i in range(40):
        path = tmp_path / f"case{i}.json"
        if i < 10:
            kind = ("truncated", "bitflip", "random")[i % 3]
            path.write_bytes(corrupt_bytes(preds.read_bytes(), rng, kind))
        else:
            kind = "wrong_types"
            path.write_text(json.dumps(mutate(base, rng, edits=rng.randint(1, 2))))
        cases.run(f"{kind} #{i}", main, ["evaluate", "--dataset", str(gt),
                                         "--predictions", str(path)], [path])
    cases.check()


@pytest.mark.reader("transfer: Detectron2 config YAML")
def test_fuzz_transfer_detectron2_config_reader(tmp_path: Path, cases: Cases) -> None:
    from transfer.__main__ import main
    from transfer.config import CONFIG_DIR

    rng = random.Random(707)
    shipped = (CONFIG_DIR / "mask_rcnn_R_50_FPN_1x.yaml").read_text()
    base = yaml.safe_load(shipped)
    for i in range(30):
        path = tmp_path / f"case{i}.yaml"
        if i < 9:
            kind = ("truncated", "bitflip", "random")[i % 3]
            path.write_bytes(corrupt_bytes(shipped.encode(), rng, kind))
        elif i == 9:
            kind = "self_base"
            path.write_text(f"_BASE_: {path.name}\n")
        else:
            kind = "wrong_types"
            doc = mutate(base, rng, edits=rng.randint(1, 3))
            if isinstance(doc, dict) and isinstance(doc.get("_BASE_"), str):
                doc["_BASE_"] = str(CONFIG_DIR / doc["_BASE_"])
            path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        cases.run(f"{kind} #{i}", main,
                  ["train", "--config", str(path), "--weights", str(tmp_path / "absent.pkl"),
                   "--dataset-root", str(tmp_path)],
                  [path, tmp_path])
    cases.check()


def test_fuzz_transfer_weights_reader(tmp_path: Path, ledger) -> None:
    """Weights files straight into Detectron2's checkpointer: a TransferError or a load."""
    from transfer.errors import TransferError
    from transfer.weights import load_weights

    rng = random.Random(808)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
    good = {"model": {"0.weight": np.zeros((2, 3, 1, 1), np.float32),
                      "0.bias": np.zeros(2, np.float32)}, "__author__": "x"}
    pkl = pickle.dumps(good, protocol=2)
    pth = torch_bytes({"model": {k: torch.from_numpy(v) for k, v in good["model"].items()}})
    failures = []
    for i in range(60):
        suffix = ".pkl" if i % 2 else ".pth"
        path = tmp_path / f"case{i}{suffix}"
        if i < 36:
            kind = ("truncated", "bitflip", "random")[i % 3]
            path.write_bytes(corrupt_bytes(pkl if suffix == ".pkl" else pth, rng, kind))
        else:
            kind = "wrong_types"
            doc = mutate(good, rng, edits=rng.randint(1, 2))
            if suffix == ".pkl":
                path.write_bytes(pickle.dumps(doc, protocol=rng.choice([0, 2, 4])))
            else:
                path.write_bytes(torch_bytes(doc))
        ledger.bad_input("transfer: weights file (checkpointer)")
        try:
            load_weights(model, str(path))
        except TransferError as err:
            if str(path) not in str(err) or "\n" in str(err):
                failures.append(f"{kind} #{i}: unclear error: {err}")
        except BaseException:  # noqa: BLE001
            ledger.traceback("transfer: weights file")
            failures.append(f"{kind} #{i}: {traceback.format_exc()}")
    assert not failures, "\n---\n".join(failures[:5])


# ----- no traceback reaches a terminal ---------------------------------------------------
def test_bad_files_give_one_line_and_no_traceback_in_subprocesses(tmp_path: Path,
                                                                  ledger) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    yaml_file = tmp_path / "junk.yaml"
    yaml_file.write_text("model: {arch: [resnet18}\n")
    json_file = tmp_path / "junk.json"
    json_file.write_text('{"images": [{"id": [1]}], "annotations": [], "categories": [{}]}')
    runs = {
        "convert": ["-m", "convert", str(junk), str(tmp_path / "out.pkl")],
        "pretrain config": ["-m", "pretrain", "train", "--config", str(yaml_file), "--data",
                            str(tmp_path), "--out", str(tmp_path / "run")],
        "transfer dataset": ["-m", "transfer", "evaluate", "--dataset", str(json_file),
                             "--predictions", str(json_file)],
    }
    culprits = {"convert": junk, "pretrain config": yaml_file,
                "transfer dataset": json_file}
    for name, args in runs.items():
        proc = python(args, timeout=300)
        ledger.bad_input(f"{name} (subprocess)")
        if "Traceback" in proc.stderr:
            ledger.traceback(f"{name} (subprocess)")
        assert proc.returncode not in (0, None), name
        lines = [x for x in proc.stderr.strip().splitlines() if not x.startswith("warning: ")]
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
        assert len(lines) == 1 and lines[0].startswith(f"error: {culprits[name]}"), \
            (name, proc.stderr[-3000:])
