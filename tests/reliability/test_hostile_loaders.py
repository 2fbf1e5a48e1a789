"""The same hostile files through the three loaders and the three commands (issue 17).

``pretrain/``, ``convert/`` and ``transfer/`` import nothing of each other, so each has its
own copy of the plumbing (``errors.first_line``, ``errors.refused_global``,
``errors.refused_pickle``); this test holds the copies to one behaviour. Each file below goes
to ``pretrain.checkpoint.load_checkpoint``, ``convert.io.load_checkpoint`` and
``transfer.weights.load_weights``, and to ``m2t-pretrain knn``, ``m2t-convert`` and
``m2t-transfer train``, all in-process: each must refuse it with
one ``error: <file>: <what>`` line and exit status 2, no traceback, and the code a pickle
names is never run (it would create a marker file).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from .conftest import error_line, make_coco_dataset


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickled_code_pth(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"conv1.weight": torch.ones(2, 3, 1, 1)}, "x": Evil(marker)},
               path)


def _pickled_code_pkl(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": 1.0}, "x": Evil(marker)},
                                  protocol=2))


def _truncated(path: Path, marker: Path) -> None:
    torch.save({"conv1.weight": torch.ones(64, 3, 7, 7)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


#: name -> (file name, how to make it); "missing" makes nothing.
HOSTILE: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "pickled code (.pth)": ("evil.pth", _pickled_code_pth),
    "pickled code (.pkl)": ("evil.pkl", _pickled_code_pkl),
    "truncated": ("cut.pth", _truncated),
    "zero bytes": ("empty.pth", lambda p, m: p.write_bytes(b"")),
    "text": ("notes.pth", lambda p, m: p.write_text("not a checkpoint\nat all\n")),
    "directory": ("folder.pth", lambda p, m: p.mkdir()),
    "missing": ("missing.pth", lambda p, m: None),
}


def _loaders() -> dict[str, tuple[Callable[[Path], object], type[Exception]]]:
    from convert.errors import ConversionError
    from convert.io import load_checkpoint as convert_load
    from pretrain.checkpoint import load_checkpoint as pretrain_load
    from pretrain.errors import UserError
    from transfer.errors import TransferError
    from transfer.weights import load_weights

    return {
        "pretrain": (pretrain_load, UserError),
        "convert": (lambda p: convert_load(str(p)), ConversionError),
        "transfer": (lambda p: load_weights(torch.nn.Linear(2, 2), str(p)), TransferError),
    }


@pytest.fixture
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """The hostile file of ``request.param`` and the marker its pickle would create."""
    name, make = HOSTILE[request.param]
    marker = tmp_path / "pwned"
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / name
    make(path, marker)
    return path, marker


@pytest.mark.parametrize("hostile", list(HOSTILE), indirect=True)
def test_the_three_loaders_refuse_a_hostile_file_in_one_line_naming_it(hostile, ledger) -> None:
    path, marker = hostile
    for package, (load, error) in _loaders().items():
        with pytest.raises(error) as caught:
            load(path)
        ledger.bad_input(f"{package}: hostile file (loader)")
        line = f"error: {caught.value}"
        assert line.startswith(f"error: {path}: ") and len(line.splitlines()) == 1, (package,
                                                                                      line)
        assert not marker.exists(), package


def test_the_three_loaders_word_a_refused_pickle_global_alike(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _pickled_code_pth(path, marker)
    for package, (load, error) in _loaders().items():
        with pytest.raises(error) as caught:
            load(path)
        assert (f"{path}: the file pickles a posix.system object, which safe loading refuses "
                f"(it could run code); ") in str(caught.value), package
    assert not marker.exists()


@pytest.mark.parametrize("hostile", list(HOSTILE), indirect=True)
def test_the_three_commands_exit_2_with_one_error_line_naming_the_file(
        hostile, tmp_path: Path, capsys: pytest.CaptureFixture[str], ledger) -> None:
    from convert.__main__ import main as convert_main
    from pretrain.__main__ import main as pretrain_main
    from transfer.__main__ import main as transfer_main

    path, marker = hostile
    images = tmp_path / "images"
    images.mkdir()
    data = make_coco_dataset(tmp_path / "data", num_images=1)
    out = tmp_path / "out.pkl"
    commands = {
        "m2t-pretrain": ["knn", str(path), "--train", str(images), "--val", str(images)],
        "m2t-convert": [str(path), str(out)],
        "m2t-transfer": ["train", "--config", "fcos_R_50_FPN_1x", "--weights", str(path),
                         "--train-dataset", str(data), "--test-dataset", str(data),
                         "--output-dir", str(tmp_path / "run")],
    }
    mains = {"m2t-pretrain": pretrain_main, "m2t-convert": convert_main,
             "m2t-transfer": transfer_main}
    for command, argv in commands.items():
        assert mains[command](argv) == 2, command
        ledger.bad_input(f"{command}: hostile file")
        error_line(capsys.readouterr().err, path)
        assert not marker.exists() and not out.exists(), command
        assert not (tmp_path / "run").exists(), command


def test_the_copies_of_the_error_plumbing_stay_identical() -> None:
    """The packages import nothing of each other, so each keeps a copy (issue 17): the same
    source, so that the three cannot drift apart."""
    import inspect

    import convert.errors
    import pretrain.errors
    import transfer.errors

    for name in ("first_line", "refused_global", "refused_pickle"):
        sources = {inspect.getsource(getattr(m, name))
                   for m in (pretrain.errors, convert.errors, transfer.errors)}
        assert len(sources) == 1, name
    patterns = {m._REFUSED_GLOBAL.pattern for m in (pretrain.errors, convert.errors,
                                                    transfer.errors)}
    assert len(patterns) == 1  # the atomic writer is not copied: jobs.atomic, tests/jobs
