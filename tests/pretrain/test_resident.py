"""A dataset resident on the device (SPEC §1.7): decoded once, read by index, no files after."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pretrain.data.decode import decode_cpu, read_bytes
from pretrain.data.folder import image_folder
from pretrain.data.resident import ResidentImages
from pretrain.data.tensor_params import sample_seed
from pretrain.data.tensor_views import TwoViewAugment


def write_folder(root: Path, sizes: list[tuple[int, int]], bad: bool = True) -> Path:
    """``root/<class>/<n>.{jpg,png}`` with the given sizes (and a truncated and an empty
    file among them when ``bad``)."""
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        folder = root / f"class{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{k:02d}.{'png' if k % 3 == 0 else 'jpg'}")
    if bad:
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "JPEG")
        (root / "class0" / "50_truncated.jpg").write_bytes(buf.getvalue()[:60])
        (root / "class1" / "51_empty.jpg").write_bytes(b"")
    return root


def test_a_folder_becomes_one_uint8_tensor_without_its_unreadable_files(tmp_path, capsys):
    root = write_folder(tmp_path / "train", [(12, 16)] * 9)
    resident = ResidentImages.from_folder(root, workers=0)
    assert len(resident) == 9 and isinstance(resident.images, torch.Tensor)
    assert resident.images.shape == (9, 3, 12, 16) and resident.images.dtype == torch.uint8
    assert resident.nbytes == 9 * 3 * 12 * 16
    assert sorted(Path(b.path).name for b in resident.unreadable) == ["50_truncated.jpg",
                                                                       "51_empty.jpg"]
    assert "11/11 images decoded" in capsys.readouterr().err  # files, good or bad
    # every resident image is its file, decoded; indices point back into the folder's list
    samples = image_folder(root).samples
    for pos in range(len(resident)):
        path, target = samples[int(resident.indices[pos])]
        assert torch.equal(resident.images[pos], decode_cpu(read_bytes(path)))
        assert resident.targets[pos] == target


def test_progress_is_reported_up_to_the_total(tmp_path, capsys):
    root = write_folder(tmp_path / "train", [(8, 8)] * 30, bad=False)
    calls = []
    ResidentImages.from_folder(root, progress=lambda done, total: calls.append((done, total)),
                               chunk=8)
    assert calls == [(8, 30), (16, 30), (24, 30), (30, 30)]
    ResidentImages.from_folder(root, chunk=8)
    err = capsys.readouterr().err
    assert "resident data: 30/30 images decoded" in err


def test_batches_read_no_files(tmp_path):
    root = write_folder(tmp_path / "train", [(10, 10)] * 6, bad=False)
    resident = ResidentImages.from_folder(root)
    shutil.rmtree(root)  # gone: batches come from memory
    images, indices = resident.batch(torch.tensor([4, 0, 4]))
    assert torch.equal(images, resident.images[[4, 0, 4]])
    assert indices.tolist() == resident.indices[[4, 0, 4]].tolist()
    views = TwoViewAugment(8)(images, [sample_seed(0, 0, int(i)) for i in indices])
    assert views[0].shape == (3, 3, 8, 8)


def test_images_of_several_sizes_stay_a_list(tmp_path):
    root = write_folder(tmp_path / "train", [(12, 16), (20, 10), (12, 16)], bad=False)
    resident = ResidentImages.from_folder(root)
    assert isinstance(resident.images, list) and len(resident) == 3
    images, _ = resident.batch([2, 1])
    assert [tuple(i.shape) for i in images] == [tuple(resident.images[2].shape),
                                                tuple(resident.images[1].shape)]


def test_worker_processes_build_the_same_copy(tmp_path):
    root = write_folder(tmp_path / "train", [(9, 9)] * 7)
    alone = ResidentImages.from_folder(root, workers=0, progress=False, chunk=3)
    workers = ResidentImages.from_folder(root, workers=2, progress=False, chunk=3)
    assert torch.equal(alone.images, workers.images)
    assert torch.equal(alone.indices, workers.indices)
    assert len(workers.unreadable) == 2


def test_resident_views_are_the_views_of_the_decoded_files(cifar10_mini):
    """CIFAR-10 images: augmenting the resident batch = augmenting the files decoded anew."""
    samples = image_folder(cifar10_mini / "train").samples[::1000]
    resident = ResidentImages(samples, progress=False)
    images, indices = resident.batch(range(len(resident)))
    assert images.shape == (10, 3, 32, 32)
    seeds = [sample_seed(1, 2, int(i)) for i in indices]
    aug = TwoViewAugment(32)
    from_files = aug([decode_cpu(read_bytes(path)) for path, _ in samples], seeds)
    for a, b in zip(aug(images, seeds), from_files, strict=True):
        assert torch.equal(a, b)
