"""Encoded images in, uint8 RGB tensors out: JPEGs decoded in batches by nvjpeg on a GPU.

For the batched tensor path (SPEC §1.7) DataLoader workers only read files
(:class:`EncodedImages`, :func:`collate_encoded`); the main process decodes a whole batch with
:func:`decode_images` on the training device and augments it there
(:mod:`pretrain.data.tensor_views`).

Which decoder reads what:

- on a CUDA device, 8-bit three-component JPEGs (the usual YCbCr ones) go together to
  ``torchvision.io.decode_jpeg(list, device="cuda")`` (nvjpeg);
- everything else, and every image on a CPU run, is decoded on the CPU by
  ``torchvision.io.decode_image`` in RGB mode: grayscale and CMYK JPEGs come out RGB,
  PNG/WebP/GIF are read too, a 16-bit PNG is scaled to 8 bits; formats torchvision does not
  read (BMP, TIFF, ...) go to PIL, as in the PIL path;
- when nvjpeg fails on a batch, its images are decoded one by one on the GPU, and those that
  fail again on the CPU; an image no decoder reads (truncated, empty, not an image) is
  returned in ``failed`` with the reason, never raised.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from jobs.images import to_rgb

from ..errors import first_line
from .folder import Unreadable
from .samples import as_paths

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# start-of-frame markers: every C0–CF except DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageHeader(NamedTuple):
    """What a file's header says: size, and for JPEGs the frame's components and precision."""

    height: int
    width: int
    kind: str  # "jpeg", "png"
    components: int = 3
    precision: int = 8


def read_header(data: torch.Tensor | bytes) -> ImageHeader | None:
    """Size (and JPEG frame type) from the first bytes of a JPEG or PNG; None otherwise.

    Cheap (no decoding), so DataLoader workers can learn an image's size from its bytes.
    """
    buf = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data).cast("B")
    if bytes(buf[:8]) == PNG_MAGIC and len(buf) >= 24 and bytes(buf[12:16]) == b"IHDR":
        width = int.from_bytes(buf[16:20], "big")
        height = int.from_bytes(buf[20:24], "big")
        return ImageHeader(height, width, "png")
    if bytes(buf[:3]) != JPEG_MAGIC:
        return None
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        length = (buf[i + 2] << 8) | buf[i + 3]
        if marker in _SOF:
            if i + 10 > n:
                return None
            precision = buf[i + 4]
            height = (buf[i + 5] << 8) | buf[i + 6]
            width = (buf[i + 7] << 8) | buf[i + 8]
            return ImageHeader(height, width, "jpeg", buf[i + 9], precision)
        i += 2 + length
    return None


def _reason(exc: Exception) -> str:
    """A decoder's complaint without torchvision's C++ source location or PIL's object repr."""
    first = first_line(exc)
    first = re.sub(r"^\w+, \S+:\d+, ", "", first)
    first = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", first)
    return (first or type(exc).__name__)[:100]


@contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 deprecates its image decoders for TorchCodec, warning at every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def decode_cpu(data: torch.Tensor) -> torch.Tensor:
    """One image to uint8 RGB (3, H, W) on the CPU: torchvision first, PIL for the rest.

    Raises ``RuntimeError`` with the reason when neither reads it.
    """
    if len(data) == 0:
        raise RuntimeError("empty file")
    try:
        with _quiet():
            image = decode_image(data, mode=ImageReadMode.RGB)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means: try PIL
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return TF.pil_to_tensor(to_rgb(img))  # 16-bit grayscale scaled
        except Exception as pil_exc:  # noqa: BLE001 - whatever PIL raises, the image is unreadable
            unsupported = "Unsupported image file" in str(exc)
            raise RuntimeError(_reason(pil_exc if unsupported else exc)) from None
    if image.dtype != torch.uint8:  # 16-bit PNG
        image = TF.to_dtype(image, torch.uint8, scale=True)
    return image


class Decoded(NamedTuple):
    """The images that decoded (uint8 RGB on the device, in input order), their positions in
    the input, and the (position, reason) of those that did not."""

    images: list[torch.Tensor]
    kept: list[int]
    failed: list[tuple[int, str]]


def _nvjpeg_ready(data: torch.Tensor) -> bool:
    """An 8-bit three-component JPEG that ends with its end-of-image marker (nvjpeg may
    decode a truncated file without complaint; the CPU decoder refuses it, as PIL does)."""
    header = read_header(data)
    if header is None or header.kind != "jpeg" or header.components != 3 or header.precision != 8:
        return False
    tail = data[-32:].numpy().tobytes()
    return b"\xff\xd9" in tail


def decode_images(data: Sequence[torch.Tensor], device: torch.device | str = "cpu",
                  batched_jpeg: bool | None = None) -> Decoded:
    """Decode a batch of encoded images (1-D uint8 CPU tensors) to uint8 RGB on ``device``.

    JPEGs are decoded together by nvjpeg on a CUDA device (``batched_jpeg``, by default
    whether ``device`` is CUDA; on the CPU it runs torchvision's list decoder, which fails
    as a whole like nvjpeg, so tests reach the fallbacks); see the module docstring for the
    rest. Never raises for a bad image: it is listed in ``failed``.
    """
    device = torch.device(device)
    out: dict[int, torch.Tensor] = {}
    failed: dict[int, str] = {}
    on_cpu = list(range(len(data)))
    if batched_jpeg is None:
        batched_jpeg = device.type == "cuda"
    if batched_jpeg:
        gpu = [k for k in on_cpu if _nvjpeg_ready(data[k])]
        on_cpu = sorted(set(on_cpu) - set(gpu))
        for k, image in zip(gpu, _decode_nvjpeg([data[k] for k in gpu], device), strict=True):
            if image is None:
                on_cpu.append(k)
            else:
                out[k] = image
    for k in on_cpu:
        try:
            out[k] = decode_cpu(data[k]).to(device, non_blocking=True)
        except RuntimeError as exc:
            failed[k] = str(exc)
    kept = sorted(out)
    return Decoded([out[k] for k in kept], kept, sorted(failed.items()))


def _decode_nvjpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """nvjpeg on the whole list at once; if that fails, on each image alone (None: failed).

    On a GPU the decoder runs with a stream of its own current, on which nothing else is
    queued: nvJPEG's hardware engine may write its output before work already queued on the
    current stream has run, and the caching allocator may hand it a block that such work is
    still reading (pytorch/vision#9606, meta-pytorch/torchcodec#1634). The images are then
    handed to the caller's stream (``record_stream``), so their blocks are reused only after
    the caller's work on them is done.
    """
    if not data:
        return []
    if device.type != "cuda":
        return _decode_jpegs(data, device)
    caller = torch.cuda.current_stream(device)
    side = _decode_stream(device)  # waits for nothing: the inputs are CPU bytes
    with torch.cuda.stream(side):
        images = _decode_jpegs(data, device)
    caller.wait_stream(side)
    for image in images:
        if image is not None:
            image.record_stream(caller)
    return images


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = torch.device("cuda", index)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(key)
    return _STREAMS[key]


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    with _quiet():
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 - nvjpeg refused one of them: find which
            pass
        images: list[torch.Tensor | None] = []
        for d in data:
            try:
                images.append(decode_jpeg([d], mode=ImageReadMode.RGB, device=device)[0])
            except Exception:  # noqa: BLE001 - left to the CPU decoder
                images.append(None)
        return images


# ---------------------------------------------------------------------------------------------
# What DataLoader workers do on the tensor path: read bytes


class Encoded(NamedTuple):
    """One file's bytes (1-D uint8 tensor), its dataset index and path."""

    index: int
    data: torch.Tensor
    path: str


def read_bytes(path: str | Path) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor (no copy through ``bytes``)."""
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


class EncodedImages(torch.utils.data.Dataset):
    """The files of a dataset as bytes: ``Encoded`` or, for a file that cannot be read,
    ``Unreadable`` (a decode failure is found later, by :func:`decode_images`)."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = as_paths(paths)  # one buffer, not a str per file (``.samples``)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Encoded | Unreadable:
        path = self.paths[index]
        try:
            return Encoded(index, read_bytes(path), path)
        except OSError as exc:
            return Unreadable.of(path, exc)


class EncodedBatch(NamedTuple):
    """A batch of encoded images: dataset indices (LongTensor), bytes, paths, the sizes their
    headers give (None where the header says nothing), the files that could not be read, and
    whatever a ``collate_fn`` drew for them in the worker (``pretrain.data.tensor_pipeline``)."""

    indices: torch.Tensor
    data: list[torch.Tensor]
    paths: list[str]
    sizes: list[tuple[int, int] | None]
    bad: list[Unreadable]
    params: Any = None


def collate_encoded(batch: Sequence[Encoded | Unreadable]) -> EncodedBatch:
    """``collate_fn`` for :class:`EncodedImages`: keep the bytes as a list (sizes differ)."""
    good = [b for b in batch if isinstance(b, Encoded)]
    sizes = []
    for b in good:
        header = read_header(b.data)
        known = header is not None and header.height > 0 and header.width > 0
        sizes.append((header.height, header.width) if known else None)
    return EncodedBatch(torch.tensor([b.index for b in good], dtype=torch.long),
                        [b.data for b in good], [b.path for b in good], sizes,
                        [b for b in batch if isinstance(b, Unreadable)])


class DecodedBatch(NamedTuple):
    """Decoded images with their dataset indices and positions in the batch, and every image
    of the batch not read."""

    images: list[torch.Tensor]
    indices: torch.Tensor
    kept: list[int]
    bad: list[Unreadable]


def decode_batch(batch: EncodedBatch, device: torch.device | str = "cpu") -> DecodedBatch:
    """:func:`decode_images` for a collated batch; failures join ``bad`` with their paths."""
    decoded = decode_images(batch.data, device)
    bad = list(batch.bad) + [Unreadable(batch.paths[k], reason) for k, reason in decoded.failed]
    return DecodedBatch(decoded.images, batch.indices[decoded.kept], decoded.kept, bad)
