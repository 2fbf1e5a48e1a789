"""Untrusted checkpoints and weights files: data is loaded, code is never run without consent.

The "evil" files below pickle a call of ``os.system("touch MARKER")``: if any reader ran it,
the marker file would appear. Every reader must refuse such a file with one line naming the
pickled type (and, where the command has it, the ``--unsafe-load`` switch).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from .conftest import TINY, error_line, make_coco_dataset


class Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v for k, v in torchvision.models.resnet18().state_dict().items()
            if not k.startswith("fc.")}


# ----- m2t-convert -----------------------------------------------------------------------
def test_convert_refuses_a_checkpoint_that_would_run_code(r18_state, tmp_path: Path, capsys,
                                                          ledger) -> None:
    from convert.__main__ import main

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": r18_state, "extra": Evil(marker)}, evil)
    code = main([str(evil), str(tmp_path / "out.pkl")])
    ledger.bad_input("convert: checkpoint pickling code")
    line = error_line(capsys.readouterr().err, evil)
    assert code == 2 and "posix.system" in line and "--unsafe-load" in line
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


def test_convert_reads_allow_listed_argparse_namespaces_without_unsafe_load(
        r18_state, tmp_path: Path, capsys) -> None:
    """DINO-style checkpoints keep their command-line arguments as an argparse.Namespace."""
    from convert.__main__ import main

    source = tmp_path / "dino_style.pth"
    torch.save({"teacher": r18_state, "epoch": 100,
                "args": argparse.Namespace(arch="resnet18", lr=0.3, out_dim=65536)}, source)
    assert main([str(source), str(tmp_path / "out.pkl")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert (tmp_path / "out.pkl").exists()


def test_convert_names_any_other_type_and_loads_it_only_with_unsafe_load_which_warns(
        r18_state, tmp_path: Path, capsys, ledger) -> None:
    from convert.__main__ import main

    source = tmp_path / "dated.pth"
    torch.save({"state_dict": r18_state, "saved_at": datetime.datetime(2024, 1, 2)}, source)
    assert main([str(source), str(tmp_path / "out.pkl")]) == 2
    ledger.bad_input("convert: checkpoint pickling a foreign type")
    line = error_line(capsys.readouterr().err, source)
    assert "datetime.datetime" in line and "--unsafe-load" in line
    assert main([str(source), str(tmp_path / "out.pkl"), "--unsafe-load"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "runs any code" in err


# ----- m2t-pretrain ----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "knn"])
def test_pretrain_refuses_a_run_checkpoint_that_would_run_code(tiny_train: Path, tmp_path: Path,
                                                               capsys, ledger,
                                                               command: str) -> None:
    from pretrain.__main__ import main

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "momentum2-pretrain", "version": 1, "x": Evil(marker)},
               run / "last.pth")
    argv = (["train", "--data", str(tiny_train), "--out", str(run), "--resume", *TINY]
            if command == "train" else
            ["knn", str(run), "--train", str(tiny_train), "--val", str(tiny_train)])
    assert main(argv) == 2
    ledger.bad_input("pretrain: checkpoint pickling code")
    line = error_line(capsys.readouterr().err, run / "last.pth")
    assert "posix.system" in line and "not written by m2t-pretrain" in line
    assert not marker.exists()


# ----- m2t-transfer ----------------------------------------------------------------------
def _d2_pickle(path: Path, extra: object = None, protocol: int = 4) -> Path:
    payload = {"model": {"stem.conv1.weight": np.zeros((2, 3, 1, 1), np.float32)},
               "__author__": "test", "matching_heuristics": True}
    if extra is not None:
        payload["meta"] = extra
    with open(path, "wb") as f:
        pickle.dump(payload, f, protocol=protocol)
    return path


@pytest.mark.parametrize("form", ["pkl", "pkl_object_array", "pth"])
def test_transfer_weights_that_would_run_code_are_refused(tmp_path: Path, ledger,
                                                          form: str) -> None:
    from transfer.errors import TransferError
    from transfer.weights import load_weights

    marker = tmp_path / "pwned"
    if form == "pkl":
        path = _d2_pickle(tmp_path / "evil.pkl", Evil(marker))
    elif form == "pkl_object_array":
        path = _d2_pickle(tmp_path / "evil.pkl", np.array([Evil(marker)], dtype=object))
    else:
        path = tmp_path / "evil.pth"
        torch.save({"model": {"w": torch.zeros(1)}, "x": Evil(marker)}, path)
    with pytest.raises(TransferError) as err:
        load_weights(torch.nn.Linear(2, 2), str(path))
    ledger.bad_input(f"transfer: weights .{form[:3]} pickling code")
    assert "posix.system" in str(err.value) and "--unsafe-load" in str(err.value)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_transfer_pickle_reader_survives_a_memo_index_that_would_allocate_gigabytes(
        tmp_path: Path, ledger) -> None:
    """One flipped byte can turn a memo index into 2**31: the C unpickler then allocates a
    memo table of that many slots (tens of seconds and gigabytes); ours keeps a dict."""
    from transfer.errors import TransferError
    from transfer.weights import load_weights

    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02N" + b"r" + struct.pack("<I", 2**31 - 1) + b".")
    started = time.monotonic()
    with pytest.raises(TransferError, match="holds a dict, this one a NoneType"):
        load_weights(torch.nn.Linear(2, 2), str(path))
    ledger.bad_input("transfer: weights .pkl with a huge memo index")
    assert time.monotonic() - started < 5.0


def test_transfer_cli_refuses_code_in_weights_with_one_line(tmp_path: Path, capsys,
                                                            ledger) -> None:
    from transfer.__main__ import main

    marker = tmp_path / "pwned"
    weights = _d2_pickle(tmp_path / "evil.pkl", Evil(marker))
    data = make_coco_dataset(tmp_path / "data", num_images=1)
    code = main(["train", "--config", "fcos_R_50_FPN_1x", "--weights", str(weights),
                 "--train-dataset", str(data), "--test-dataset", str(data),
                 "--output-dir", str(tmp_path / "run")])
    ledger.bad_input("transfer: weights .pkl pickling code (CLI)")
    assert code == 2
    line = error_line(capsys.readouterr().err, weights)
    assert "posix.system" in line and "--unsafe-load" in line
    assert not marker.exists()


def test_transfer_loads_model_zoo_pickles_and_names_other_types_unless_unsafe_load(
        tmp_path: Path, capsys, ledger) -> None:
    from transfer.errors import TransferError
    from transfer.weights import SafeCheckpointer, load_weights

    # Detectron2 / Caffe2 model-zoo layouts, old pickle protocols included, load as data
    for protocol in (0, 2, 4, 5):
        loaded = SafeCheckpointer(torch.nn.Linear(2, 2))._load_file(
            str(_d2_pickle(tmp_path / f"p{protocol}.pkl", protocol=protocol)))
        assert loaded["model"]["stem.conv1.weight"].shape == (2, 3, 1, 1)
    blobs = tmp_path / "caffe2.pkl"
    with open(blobs, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.ones((2, 3, 1, 1), np.float32),
                               "conv1_w_momentum": np.ones(1)}}, f, protocol=2)
    loaded = SafeCheckpointer(torch.nn.Linear(2, 2))._load_file(str(blobs))
    assert list(loaded["model"]) == ["conv1_w"] and loaded["__author__"] == "Caffe2"
    # a harmless but unlisted type: named; --unsafe-load reads it and warns
    dated = _d2_pickle(tmp_path / "dated.pkl", datetime.date(2024, 1, 2))
    with pytest.raises(TransferError, match="datetime.date object"):
        load_weights(torch.nn.Linear(2, 2), str(dated))
    ledger.bad_input("transfer: weights .pkl pickling a foreign type")
    capsys.readouterr()
    load_weights(torch.nn.Linear(2, 2), str(dated), unsafe_load=True)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {dated}") and "runs any code" in err
