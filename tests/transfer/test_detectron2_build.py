"""Which Detectron2 runs: the installer's record, the training-sampler seeding, and configs
written by another Detectron2 build."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
from detectron2.config import get_cfg

import transfer.detectron2_build as build
from transfer.config import add_transfer_config, load_config
from transfer.errors import TransferError


def _installer():
    path = Path(__file__).resolve().parents[2] / "tools" / "install_detectron2.py"
    spec = importlib.util.spec_from_file_location("install_detectron2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_training_sampler_seeding_is_pinned() -> None:
    """The wheel (upstream a59f0563) seeds TrainingSampler from the random state default_setup
    seeds with SEED + rank; upstream main since b1c43ffb from SEED. This pins which one runs
    here: the one the installer's record states, and for the 0.7.2 wheel "rng"."""
    seeding = build.sampler_seeding()
    installed = build.installed_build()
    if installed["source"] == "unknown build":
        pytest.skip(f"no installer record for detectron2 {installed['version']}: "
                    f"its seeding is {seeding}")
    assert seeding == installed["sampler_seeding"]
    if installed["source"] == f"{_installer().WHEEL} wheel":
        assert seeding == "rng"


def test_the_probe_tells_a_seed_seeded_sampler_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream's b1c43ffb behaviour, simulated: TrainingSampler(size, seed=cfg.SEED)."""
    import detectron2.data.build as d2build

    monkeypatch.setattr(d2build, "TrainingSampler",
                        functools.partial(d2build.TrainingSampler, seed=7))
    assert build.sampler_seeding() == "SEED"


def test_the_probe_leaves_the_random_state_alone() -> None:
    import numpy as np
    import torch

    np.random.seed(3)
    torch.manual_seed(3)
    before, torch_before = np.random.get_state()[1].copy(), torch.get_rng_state()
    build.sampler_seeding()
    assert (np.random.get_state()[1] == before).all()
    assert torch.equal(torch.get_rng_state(), torch_before)


def test_the_record_is_read_back_and_a_changed_file_is_noticed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import detectron2

    installer = _installer()
    package = tmp_path / "detectron2"
    (package / "data").mkdir(parents=True)
    (package / "data" / "common.py").write_text("x = 1\n")
    wheel = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    wheel.write_bytes(b"wheel")
    installer.write_record(package, wheel)
    monkeypatch.setattr(build, "package_dir", lambda: package)
    monkeypatch.setattr(detectron2, "__version__", "0.7.2")
    found = build.installed_build()
    assert found["upstream_commit"] == "a59f0563" and found["upstream_date"] == "2024-04-17"
    assert any("400a49c1" in change for change in found["local_changes"])
    assert found["modified_since_install"] is False
    assert json.loads((package / build.RECORD).read_text())["files_sha256"] == \
        build.tree_digest(package)
    (package / "data" / "common.py").write_text("x = 2\n")
    assert build.installed_build()["modified_since_install"] is True
    line = build.describe({**found, "sampler_seeding": "rng"})
    assert line.startswith("detectron2 0.7.2 (sal-detectron2==0.7.2 wheel: upstream a59f0563")
    assert line.endswith("TrainingSampler seeded from rng")


def test_a_source_build_without_a_record_is_an_unknown_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import detectron2

    monkeypatch.setattr(build, "package_dir", lambda: tmp_path)
    monkeypatch.setattr(detectron2, "__version__", "0.6")
    assert build.installed_build() == {"version": "0.6", "source": "unknown build",
                                       "path": str(tmp_path)}
    assert build.describe(build.installed_build()) == "detectron2 0.6 (unknown build)"


def _written_config(tmp_path: Path, extra: str = "") -> Path:
    """A config.yaml as a run writes it (the full dump), plus ``extra`` lines."""
    cfg = load_config("mask_rcnn_R_50_FPN_1x", ["MODEL.DEVICE", "cpu"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump() + extra)
    return path


@pytest.mark.skipif("FLOAT32_PRECISION" in add_transfer_config(get_cfg()),
                    reason="the installed Detectron2 has FLOAT32_PRECISION itself")
def test_configs_written_by_either_build_load_in_the_other(tmp_path: Path) -> None:
    """This build's config.yaml loads here (and in newer builds: a missing key takes their
    default); a newer build's FLOAT32_PRECISION "" (its default: PyTorch's float32 precision)
    is dropped; any other value is refused in one line saying why."""
    ours = load_config(str(_written_config(tmp_path)), ["MODEL.DEVICE", "cpu"])
    assert ours.SOLVER.MAX_ITER == 90000
    newer = tmp_path / "newer"
    newer.mkdir()
    loaded = load_config(str(_written_config(newer, 'FLOAT32_PRECISION: ""\n')))
    assert loaded.SOLVER.MAX_ITER == 90000 and "FLOAT32_PRECISION" not in loaded
    high = tmp_path / "high"
    high.mkdir()
    with pytest.raises(TransferError) as err:
        load_config(str(_written_config(high, "FLOAT32_PRECISION: high\n")))
    assert "FLOAT32_PRECISION 'high' was written by a newer Detectron2" in str(err.value)
    assert "\n" not in str(err.value)
