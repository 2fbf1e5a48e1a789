"""Fine-tuning under both seedings of Detectron2's ``TrainingSampler``.

The installed wheel (upstream ``a59f0563``) seeds the sampler from the random state that
``default_setup`` seeds with ``SEED`` + rank; upstream ``main`` since ``b1c43ffb`` (2024-12-19)
builds it as ``TrainingSampler(len(dataset), seed=cfg.SEED)``. The second is simulated here the
way ``test_detectron2_build.py`` does it, by binding the run's ``SEED`` into the sampler class
Detectron2's loader builds. Under it a run records ``"SEED"`` seeding, a run resumed from its
checkpoint ends with the uninterrupted run's weights, bit for bit, and the image order (so the
weights) differs from the installed build's for the same ``SEED``: means agree between builds,
single seeds do not (docs/transfer.md).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from transfer.__main__ import main
from transfer.sweep import own_logging

from .conftest import TINY

pytestmark = pytest.mark.slow

SEED = 0
#: TINY with a ResNet-18 body, narrow heads, 4 iterations and a checkpoint after the second.
SMALL = [*TINY, "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
         "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
         "MODEL.ROI_MASK_HEAD.CONV_DIM", "64", "SOLVER.MAX_ITER", "4",
         "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", str(SEED)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One OpenMP thread for every run of this module (runs compared bit for bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed_seeded_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Upstream's b1c43ffb loader: ``TrainingSampler(len(dataset), seed=cfg.SEED)``."""
    import detectron2.data.build as d2build

    monkeypatch.setattr(d2build, "TrainingSampler",
                        functools.partial(d2build.TrainingSampler, seed=SEED))


def _train(weights: Path, dataset: Path, out: Path, *extra: str) -> None:
    argv = ["train", "--config", "mask_rcnn_R_50_FPN_1x", "--weights", str(weights),
            "--train-dataset", str(dataset), "--test-dataset", str(dataset),
            "--output-dir", str(out), *extra, *SMALL]
    with own_logging():
        assert main(argv) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def _differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _interrupted_copy(run: Path, to: Path, iteration: int) -> None:
    """What a run killed after saving ``model_{iteration}.pth`` leaves: that checkpoint and
    ``last_checkpoint`` naming it (everything the later iterations wrote is gone)."""
    to.mkdir()
    name = f"model_{iteration:07d}.pth"
    shutil.copy2(run / name, to / name)
    (to / "last_checkpoint").write_text(name)


def test_a_run_under_the_seed_seeded_sampler_resumes_exactly_and_orders_images_otherwise(
        seed_seeded_sampler: None, r18_pkl: Path, shapes_dataset: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    _train(r18_pkl, shapes_dataset, whole)
    record = json.loads((whole / "results.json").read_text())["detectron2"]
    assert record["sampler_seeding"] == "SEED"
    assert "TrainingSampler seeded from SEED" in (whole / "log.txt").read_text()

    resumed = tmp_path / "resumed"
    _interrupted_copy(whole, resumed, 1)
    _train(r18_pkl, shapes_dataset, resumed, "--resume")
    log = (resumed / "log.txt").read_text()
    assert "Starting training from iteration 2" in log
    assert f"replaying the data stream of SEED {SEED} past the 2 batches" in log
    different = _differing(_weights(resumed), _weights(whole))
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"

    # the installed build's sampler, same SEED, same everything else: another image order
    with pytest.MonkeyPatch.context() as patch:
        import detectron2.data.build as d2build
        from detectron2.data.samplers import TrainingSampler

        patch.setattr(d2build, "TrainingSampler", TrainingSampler)
        installed = tmp_path / "installed"
        _train(r18_pkl, shapes_dataset, installed)
    assert json.loads((installed / "results.json").read_text())["detectron2"][
        "sampler_seeding"] == "rng"
    assert _differing(_weights(installed), _weights(whole))
