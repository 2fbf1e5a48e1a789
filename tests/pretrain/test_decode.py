"""Decoding for the tensor path (SPEC §1.7): every image the PIL path reads, read the same;
every image it cannot read, skipped and counted, never raised."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from pretrain.data.decode import (
    EncodedImages,
    collate_encoded,
    decode_batch,
    decode_cpu,
    decode_images,
    read_header,
)
from pretrain.data.decode import _nvjpeg_ready as nvjpeg_ready
from pretrain.data.folder import Unreadable


def picture(height: int = 30, width: int = 44) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    arr = np.stack([xx * 5, yy * 7, (xx + yy) * 3], axis=-1) % 256
    arr = (arr + rng.integers(0, 30, arr.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def encode(img: Image.Image, fmt: str, **kw) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def pil_rgb(data: torch.Tensor) -> torch.Tensor:
    """What the PIL path sees: ``Image.open(...).convert("RGB")``."""
    return TF.pil_to_tensor(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB"))


@pytest.fixture(scope="module")
def files() -> dict[str, torch.Tensor]:
    img = picture()
    jpeg = encode(img, "JPEG", quality=90)
    return {
        "jpeg": jpeg,
        "progressive": encode(img, "JPEG", progressive=True),
        "cmyk": encode(img.convert("CMYK"), "JPEG"),
        "gray": encode(img.convert("L"), "JPEG"),
        "png": encode(img, "PNG"),
        "png_rgba": encode(img.convert("RGBA"), "PNG"),
        "png_palette": encode(img.convert("P"), "PNG"),
        "webp": encode(img, "WEBP", lossless=True),
        "bmp": encode(img, "BMP"),
        "tiff": encode(img, "TIFF"),
        "truncated": jpeg[: len(jpeg) // 2].clone(),
        # cut short, then an end-of-image marker: looks whole, so it goes to nvjpeg's batch
        "cut_with_end": torch.cat([jpeg[: len(jpeg) // 2], torch.tensor([0xFF, 0xD9],
                                                                        dtype=torch.uint8)]),
        "empty": torch.empty(0, dtype=torch.uint8),
        "junk": torch.arange(300, dtype=torch.int64).remainder(251).to(torch.uint8),
    }


READABLE = ["jpeg", "progressive", "cmyk", "gray", "png", "png_rgba", "png_palette", "webp",
            "bmp", "tiff"]


@pytest.mark.parametrize("name", READABLE)
def test_every_format_the_pil_path_reads_decodes_to_the_same_rgb(files, name):
    image = decode_cpu(files[name])
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 44)
    assert torch.equal(image, pil_rgb(files[name]))


def test_a_16_bit_png_is_scaled_to_8_bits():
    ramp = np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (8, 1))
    image = decode_cpu(encode(Image.fromarray(ramp), "PNG"))
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 64)
    assert torch.equal(image[0, 0], torch.arange(0, 256, 4, dtype=torch.uint8))


@pytest.mark.parametrize("name, reason", [("truncated", "truncated"),
                                          ("cut_with_end", "truncated"), ("empty", "empty file"),
                                          ("junk", "cannot identify image file")])
def test_unreadable_bytes_raise_one_line_reasons(files, name, reason):
    with pytest.raises(RuntimeError) as info:
        decode_cpu(files[name])
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert ".cpp" not in str(info.value) and "BytesIO" not in str(info.value)


@pytest.mark.parametrize("batched_jpeg", [False, True])
def test_a_mixed_batch_decodes_what_it_can_and_lists_the_rest(files, batched_jpeg):
    """JPEGs with a CMYK, a grayscale, a PNG, a truncated, an empty and a junk file among
    them: never raises; the good ones come back in order, the bad ones with reasons. With
    ``batched_jpeg`` the JPEGs go to one list decoder call first (nvjpeg's path), which a
    JPEG cut short makes fail as a whole, so each is retried alone, then on the CPU."""
    names = ["jpeg", "cmyk", "truncated", "png", "gray", "empty", "progressive", "junk", "jpeg",
             "cut_with_end"]
    data = [files[n] for n in names]
    decoded = decode_images(data, "cpu", batched_jpeg=batched_jpeg)
    assert decoded.kept == [0, 1, 3, 4, 6, 8]
    assert [k for k, _ in decoded.failed] == [2, 5, 7, 9]
    assert all(reason for _, reason in decoded.failed)
    for k, image in zip(decoded.kept, decoded.images, strict=True):
        assert torch.equal(image, pil_rgb(data[k]))


def test_batched_jpegs_are_retried_one_by_one_only_when_the_batch_fails(files, monkeypatch):
    import pretrain.data.decode as decode

    calls = []
    real = decode.decode_jpeg

    def counting(data, **kw):
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(decode, "decode_jpeg", counting)
    decoded = decode_images([files["jpeg"], files["png"], files["jpeg"]], "cpu",
                            batched_jpeg=True)
    assert decoded.kept == [0, 1, 2] and calls == [2]
    calls.clear()  # one bad JPEG: the batch call fails, each is retried alone
    decoded = decode_images([files["jpeg"], files["cut_with_end"], files["jpeg"]], "cpu",
                            batched_jpeg=True)
    assert decoded.kept == [0, 2] and calls == [3, 1, 1, 1]


def test_headers_give_sizes_and_route_only_plain_jpegs_to_nvjpeg(files):
    for name in ["jpeg", "progressive", "cmyk", "gray", "png", "png_rgba", "truncated"]:
        header = read_header(files[name])
        assert (header.height, header.width) == (30, 44), name
    assert read_header(files["cmyk"]).components == 4
    assert read_header(files["gray"]).components == 1
    for name in ["webp", "bmp", "empty", "junk"]:
        assert read_header(files[name]) is None, name
    assert read_header(files["jpeg"][:20].clone()) is None
    ready = {name: nvjpeg_ready(files[name]) for name in files if len(files[name])}
    assert {name for name, ok in ready.items() if ok} == {"jpeg", "progressive", "cut_with_end"}


def test_a_large_exif_block_before_the_frame_is_skipped():
    img = picture(12, 20)
    exif = Image.Exif()
    exif[0x010E] = "x" * 40_000  # ImageDescription
    data = encode(img, "JPEG", exif=exif.tobytes())
    header = read_header(data)
    assert (header.height, header.width, header.components) == (12, 20, 3)


def test_workers_read_bytes_and_the_batch_decodes_with_paths_for_failures(files, tmp_path: Path):
    paths = []
    for name in ["jpeg", "truncated", "png", "missing"]:
        path = tmp_path / f"{name}.img"
        if name != "missing":
            path.write_bytes(files[name].numpy().tobytes())
        paths.append(path)
    dataset = EncodedImages(paths)
    items = [dataset[i] for i in range(len(dataset))]
    assert isinstance(items[3], Unreadable) and "missing.img" in items[3].path
    batch = collate_encoded(items)
    assert batch.indices.tolist() == [0, 1, 2]
    assert batch.sizes == [(30, 44), (30, 44), (30, 44)]
    decoded = decode_batch(batch)
    assert decoded.indices.tolist() == [0, 2] and len(decoded.images) == 2
    assert sorted(Path(b.path).name for b in decoded.bad) == ["missing.img", "truncated.img"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_encoded,
                                         num_workers=1)
    (through_worker,) = list(loader)
    assert through_worker.indices.tolist() == [0, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(through_worker.data, batch.data, strict=True))
