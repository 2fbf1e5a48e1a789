"""The tensor path end to end (SPEC §1.7): workers, main process and resident copy agree."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pretrain.data.decode import EncodedImages, collate_encoded, decode_cpu, read_bytes
from pretrain.data.folder import image_folder
from pretrain.data.resident import ResidentImages
from pretrain.data.tensor_params import sample_seed
from pretrain.data.tensor_pipeline import (
    AugmentInWorker,
    SampleInWorker,
    seeds_for,
    views_from_encoded,
    views_from_resident,
)
from pretrain.data.tensor_views import TwoViewAugment


def folder(root: Path) -> Path:
    """Nine images of two sizes (JPEG, PNG, BMP: a header the worker cannot size) and a
    truncated JPEG."""
    rng = np.random.default_rng(1)
    for k in range(9):
        (root / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
        h, w = (24, 30) if k % 2 else (30, 20)
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img.save(root / f"c{k % 3}" / f"{k}.{['jpg', 'png', 'bmp'][k % 3]}")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    (root / "c0" / "99.jpg").write_bytes(buf.getvalue()[:80])
    return root


def test_every_path_gives_the_same_views(tmp_path: Path):
    root = folder(tmp_path / "train")
    paths = [p for p, _ in image_folder(root).samples]
    aug, seed, epoch = TwoViewAugment(16), 3, 2

    # reference: decode each file, augment the readable ones with their seeds
    readable = [i for i, p in enumerate(paths) if not p.endswith("99.jpg")]
    ref = aug([decode_cpu(read_bytes(paths[i])) for i in readable],
              [sample_seed(seed, epoch, i) for i in readable])

    dataset = EncodedImages(paths)
    # GPU path (here on the CPU): parameters drawn in the worker, applied in the main process
    loader = DataLoader(dataset, batch_size=len(paths), num_workers=1,
                        collate_fn=SampleInWorker(aug, seed, epoch))
    (batch,) = list(loader)
    assert batch.params is None  # a BMP among them: drawn after decoding instead
    gpu_like = views_from_encoded(batch, aug, "cpu", seed, epoch)
    # the same without the BMPs and the cut JPEG: drawn in the worker
    no_bmp = [i for i in readable if not paths[i].endswith(".bmp")]
    sized = SampleInWorker(aug, seed, epoch)([dataset[i] for i in no_bmp])
    assert sized.params is not None
    from_worker_params = views_from_encoded(sized, aug, "cpu", seed, epoch)
    # CPU path: all in the worker
    cpu = AugmentInWorker(aug, seed, epoch)([dataset[i] for i in range(len(paths))])

    for got in (gpu_like, cpu):
        assert got.indices.tolist() == readable
        assert [Path(b.path).name for b in got.bad] == ["99.jpg"]
        assert torch.equal(got.view1, ref[0]) and torch.equal(got.view2, ref[1])
    keep = [readable.index(i) for i in from_worker_params.indices.tolist()]
    assert torch.equal(from_worker_params.view1, ref[0][keep])
    assert torch.equal(from_worker_params.view2, ref[1][keep])


def test_resident_views_follow_the_dataset_index(tmp_path: Path):
    root = folder(tmp_path / "train")
    resident = ResidentImages.from_folder(root, progress=False)
    aug = TwoViewAugment(16)
    got = views_from_resident(resident, [3, 0], aug, seed=5, epoch=1)
    images, indices = resident.batch([3, 0])
    assert torch.equal(got.indices, indices)
    ref = aug(images, seeds_for(indices, 5, 1))
    assert torch.equal(got.view1, ref[0]) and torch.equal(got.view2, ref[1])


def test_an_all_unreadable_batch_is_empty_views_and_its_failures(tmp_path: Path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    dataset = EncodedImages([bad, tmp_path / "gone.jpg"])
    views = views_from_encoded(collate_encoded([dataset[0], dataset[1]]), TwoViewAugment(16),
                               "cpu", 0, 0)
    assert views.view1.shape == (0, 3, 16, 16) and views.indices.numel() == 0
    assert sorted(Path(b.path).name for b in views.bad) == ["bad.jpg", "gone.jpg"]


@pytest.mark.slow
def test_the_device_benchmark_runs_on_the_cpu(tmp_path: Path, coco_mini):
    """``benchmarks/data_pipeline.py --device cuda`` waits for a GPU; its code runs here."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "data_pipeline.py"), "--device", "cpu",
         "--batch", "4", "--timed-batches", "1", "--warm-batches", "1", "--rounds", "1",
         "--workers", "1", "--sizes", "64", "--cifar-images", "16", "--out", str(tmp_path),
         # the data the fixtures found ($MOMENTUM2_DATA), not the script's default beside it
         "--images", str(coco_mini / "train2017"),
         "--cifar", str(coco_mini.parent / "cifar10_mini" / "train")],
        capture_output=True, text=True, timeout=300, cwd=repo,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "data_pipeline_cpu.json").read_text())["rows"]
    rates = [r for r in rows if "rates" in r]
    assert len(rates) == 6 and all(r["images_per_s"] > 0 for r in rates)
    agreement = [r["agreement"] for r in rows if "agreement" in r]
    assert len(agreement) == 3 and all(a["max"] == 0 for a in agreement)
