"""Images as 8-bit RGB the same way in every stage, where PIL's own conversion is wrong.

PIL opens a 16-bit grayscale PNG (or TIFF) as mode ``I;16`` (or ``I``), and
``convert("RGB")`` clips its values at 255: nearly every pixel of a real 16-bit image turns
white. torchvision's decoder, which pretraining's tensor path uses
(``pretrain.data.decode``), scales such an image to 8 bits instead (value >> 8).
:func:`to_rgb` does the same for a PIL image, so that pretraining's PIL path, the kNN and
linear evaluations and fine-tuning (Detectron2's ``read_image``) see the pixels the tensor
path sees. 16-bit RGB PNGs need nothing: PIL keeps their high bytes, as torchvision does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: PIL modes of 16-bit single-channel images; ``I`` (32-bit) is one only when read from a
#: 16-bit PNG (older Pillow versions), see :func:`is_wide_grayscale`.
WIDE_GRAYSCALE = ("I;16", "I;16L", "I;16B", "I;16N")


def is_wide_grayscale(image: Image.Image) -> bool:
    """Whether ``image`` is a 16-bit grayscale image that ``convert`` would clip."""
    return image.mode in WIDE_GRAYSCALE or (image.mode == "I" and image.format == "PNG")


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale ``image`` as 8-bit grayscale (``L``), its values shifted right by 8
    as torchvision's ``to_dtype(..., scale=True)`` does; any other image as it is."""
    if not is_wide_grayscale(image):
        return image
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")``, with 16-bit grayscale scaled first (:func:`to_8bit`)."""
    return to_8bit(image).convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB: torchvision's ``pil_loader`` with :func:`to_rgb`."""
    with open(path, "rb") as f:
        image = Image.open(f)
        return to_rgb(image)
