"""Pretraining configs: unknown keys list the valid ones; wrong types name the expected type."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.__main__ import main
from pretrain.config import Config

from .conftest import error_line


@pytest.mark.parametrize(("text", "expected"), [
    ("trainer: {epochs: 3}\n", "unknown config key 'trainer.epochs'; valid keys: model.arch"),
    ("train: {epoch: 3}\n", "unknown config key 'train.epoch'; valid keys in train: epochs"),
    ("data: {batch_size: many}\n", "data.batch_size must be int, got 'many'"),
    ("optim: {base_lr: [0.1]}\n", "optim.base_lr must be float, got [0.1]"),
    ("model: {arch: resnet7}\n", "model.arch must be one of resnet18"),
    ("train: 5\n", "top-level key 'train' must be a mapping"),
])
def test_a_config_file_with_unknown_keys_or_wrong_types_is_one_error_line(
        tmp_path: Path, capsys, ledger, text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code = main(["train", "--config", str(config), "--data", str(tmp_path),
                 "--out", str(tmp_path / "run")])
    ledger.bad_input("pretrain: config YAML")
    assert code == 2
    line = error_line(capsys.readouterr().err, config)
    assert expected in line
    if "unknown config key" in expected:  # every valid key of the section is listed
        section = "train" if "valid keys in train" in expected else None
        sections = [section] if section else ["model", "data", "optim", "train"]
        for name in sections:
            for key in Config().__dict__[name].__dict__:
                assert (key if section else f"{name}.{key}") in line
    assert not (tmp_path / "run").exists()
