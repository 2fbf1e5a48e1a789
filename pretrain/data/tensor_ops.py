"""The pixel operations of SPEC §1.1's views, for a whole batch of uint8 image tensors, on any
device (SPEC §1.7).

:mod:`pretrain.data.views` runs torchvision's transforms on one PIL image at a time. Here a
batch is augmented at once, on the device its images are on, every sample with its own
parameters, drawn beforehand by :mod:`pretrain.data.tensor_params`: :func:`augment` applies
one view's parameters to a batch: resized crop (bicubic, antialiased), horizontal flip,
colour jitter in each sample's own order of the four adjustments, grayscale, Gaussian blur,
solarize, normalisation. Nothing here draws a random number.

Between the crop and the normalisation, images are float32 tensors holding uint8 values
(integers 0–255), and every operation rounds as torchvision's op on a uint8 tensor does
(truncating after a blend, rounding after the blur). A view is thus torchvision's
``transforms.v2`` recipe on uint8 tensors, which keeps the PIL path's rounding too (PIL also
truncates its blends): each operation equals torchvision's functional op on uint8 for the
same parameters within 1/255 (``tests/pretrain/test_tensor_augment.py``). torchvision's
functional ops take one factor per call; where a batch needs a factor per sample
(brightness, contrast, saturation, hue, blur, and the resized crop of a same-size batch) the
formula is written here, broadcast over the batch, and says which op it transcribes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .tensor_params import ViewParams, ViewRecipe
from .views import IMAGENET_MEAN, IMAGENET_STD

Images = torch.Tensor | Sequence[torch.Tensor]
"""A uint8 batch ``(N, 3, H, W)``, or a list of uint8 ``(3, H_i, W_i)`` images of any sizes."""

SOLARIZE_THRESHOLD = 128
"""PIL's: pixels ≥ 128 are inverted."""


# ---------------------------------------------------------------------------------------------
# Batched operations on float32 images (N, 3, H, W) holding uint8 values, factors (N,) on the
# same device; each returns uint8 values again, rounded as torchvision's uint8 op rounds


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.reshape(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """v2 ``_blend`` on uint8 (``ratio·a + (1 − ratio)·b``, clamped, truncated) with a ratio
    per sample."""
    r = _per_sample(ratio)
    return a.mul(r).add_(b.mul(1 - r)).clamp_(0, 255).floor_()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """The luma that v2's contrast and saturation blend with on uint8 (floored)."""
    return TF.rgb_to_grayscale(x).floor_()


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_brightness`` with a factor per sample: ``x·f`` clamped, truncated."""
    return x.mul(_per_sample(factor)).clamp_(0, 255).floor_()


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_contrast`` with a factor per sample: blend with the mean of the image's luma."""
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_saturation`` with a factor per sample: blend with the image's luma."""
    return _blend(x, _gray(x), factor)


_HUE_OFFSETS = (5.0, 3.0, 1.0)  # red, green, blue
_TO_UINT8 = (255 + 1 - 1e-3) / 255  # v2 ``to_dtype(float → uint8, scale=True)``, then truncated


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``adjust_hue`` with a factor per sample: rotate the HSV hue by ``factor`` turns.

    torchvision converts RGB → HSV (``_rgb_to_hsv``, Pillow's formula), adds the factor to
    H modulo 1, converts back (``_hsv_to_rgb``) and to uint8. Here the same hue (6H, from
    whichever channel is the maximum) goes straight back through the closed form of
    HSV → RGB: channel n ∈ {R: 5, G: 3, B: 1} is ``V − C·clamp(min(k, 4 − k), 0, 1)`` with
    ``k = (n + 6H) mod 6``, V the maximum and C = V − minimum (V and S are unchanged).
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = torch.where(chroma > 0, chroma.reciprocal(), 0.0)
    hue6 = torch.where(maxc == r, g - b,
                       torch.where(maxc == g, torch.add(b - r, chroma, alpha=2),
                                   torch.add(r - g, chroma, alpha=4)))
    hue6.mul_(inv).add_(_per_sample(factor * 6.0))
    offsets = torch.tensor(_HUE_OFFSETS, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)
    k = (hue6 + offsets).remainder_(6.0)
    out = torch.addcmul(maxc, chroma, torch.minimum(k, 4.0 - k).clamp_(0, 1), value=-1)
    return out.mul_(_TO_UINT8).floor_()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``rgb_to_grayscale`` to three channels, truncated as on uint8."""
    return TF.rgb_to_grayscale(x, num_output_channels=3).floor()


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, K) 1-D Gaussian kernels, one per σ: v2 ``_get_gaussian_kernel1d`` per sample."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax(x.div(sigma.reshape(-1, 1)).pow(2).neg(), dim=1)


NEGLIGIBLE_TAP = 1e-7
"""Blur taps lighter than this (for every σ of the batch) are left out: all of them together
move a pixel by less than 3e-6 of full scale, where the tolerance is 1/255 = 4e-3."""


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int,
                  max_sigma: float | None = None) -> torch.Tensor:
    """``gaussian_blur`` (reflect padding, K×K Gaussian) with a σ per sample.

    torchvision convolves with the K×K outer product of the 1-D kernel; here the same kernel
    is applied as two 1-D passes (K instead of K² multiply-adds per pixel), every sample's
    channels a group of a depthwise convolution; rounded as on uint8. Given ``max_sigma`` (the largest σ, known
    on the CPU), the outer taps whose weight is below ``NEGLIGIBLE_TAP`` are skipped.
    """
    n, c, h, w = x.shape
    radius = kernel_size // 2
    if max_sigma is not None:
        radius = min(radius, math.ceil(max_sigma * math.sqrt(2 * math.log(1 / NEGLIGIBLE_TAP))))
    taps = 2 * radius + 1
    kernel = gaussian_kernels(sigma.to(torch.float32), kernel_size).to(x.dtype)
    trim = kernel_size // 2 - radius
    kernel = kernel[:, trim:kernel_size - trim].repeat_interleave(c, dim=0)  # (N·C, taps)
    y = F.pad(x, [radius] * 4, mode="reflect").reshape(1, n * c, h + 2 * radius, w + 2 * radius)
    y = F.conv2d(y, kernel.reshape(n * c, 1, 1, taps), groups=n * c)
    y = F.conv2d(y, kernel.reshape(n * c, 1, taps, 1), groups=n * c)
    return y.reshape(n, c, h, w).round_()


def solarize(x: torch.Tensor) -> torch.Tensor:
    """``solarize`` at PIL's 128: pixels ≥ 128 become 255 − pixel."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 255 - x, x)


def horizontal_flip(x: torch.Tensor) -> torch.Tensor:
    return TF.horizontal_flip(x)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """The bicubic filter (a = −0.5) of PIL's and torch's antialiased resampling, in torch's
    order of operations (``cubic_convolution1``/``2``)."""
    x = x.abs()
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch's uint8 antialiased bicubic resampling of the pixels ``[start, start + length)``
    of each sample's row to ``out_size`` pixels, as a matrix: (weights (N, out_size, in_size),
    precision (N,)). The weights are integers; a pixel is
    ``(Σ weight·input + 2^(precision−1)) >> precision``, clamped to 0–255.

    ``upsample_bicubic2d_aa`` (a port of PIL's ``ImagingResample``) and its uint8 kernel
    (``_compute_index_ranges_int16_weights``): output pixel i has centre ``s·(i + 0.5)``,
    ``s = length / out_size``; its weights are the filter at ``(j − centre + 0.5) / max(s, 1)``
    over the crop's pixels j, divided by their sum, then scaled by 2^precision (the largest
    that keeps the largest weight of the row set under 2^15) and rounded half away from zero.
    Pixels outside the crop weigh 0, so the matrix crops and resizes at once.
    """
    start = start.to(torch.float64).reshape(-1, 1, 1)
    length = length.to(torch.float64).reshape(-1, 1, 1)
    scale = length / out_size
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    i = torch.arange(out_size, dtype=torch.float64, device=start.device).reshape(1, -1, 1)
    j = torch.arange(in_size, dtype=torch.float64, device=start.device).reshape(1, 1, -1)
    w = _cubic((j - start - scale * (i + 0.5) + 0.5) * inv)
    w = w * ((j >= start) & (j < start + length))
    w = w / w.sum(dim=-1, keepdim=True)
    top = w.amax(dim=(1, 2))
    bits = torch.arange(22, dtype=torch.float64, device=w.device)
    fits = torch.floor(0.5 + top.reshape(-1, 1) * 2 ** (bits + 1)) < 2**15
    precision = fits.to(torch.int64).cumprod(dim=1).sum(dim=1)  # the first p that does not fit
    w = w * (2.0 ** precision).reshape(-1, 1, 1)
    w = torch.where(w < 0, torch.ceil(w - 0.5), torch.floor(w + 0.5))
    return w.to(torch.float32), precision


def _shift_round(acc: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(acc + 2^(p−1)) >> p`` clamped to 0–255, for exact integer ``acc`` held in float32."""
    unit = (2.0 ** precision.to(torch.float32)).reshape(-1, 1, 1, 1)
    return torch.floor_(acc.add_(unit / 2).div_(unit)).clamp_(0, 255)


def resized_crop_batch(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (N, 4: top, left, height, width) of a same-size uint8 batch (N, C, H, W)
    and resize each crop to ``size``², bicubic with antialias: (N, C, size, size). torchvision's ``resized_crop`` on uint8 (torch's uint8 kernel, on the CPU) per
    sample, without a loop (float32 holding uint8 values, like the other ops here): its
    fixed-point arithmetic as two matrix products, width then
    height, each rounded as that kernel rounds. Sums stay under 2^24, so float32 holds them
    exactly (with TF32 matmuls, which this turns off for its own products, they would not).

    (torchvision's op on float, or on a GPU, does not round between the two passes and can
    differ from its uint8 op by up to 11/255 at sharp edges of photographs.)
    """
    _, _, h, w = images.shape
    dev = images.device
    boxes = boxes.to(dev)
    rows, row_bits = resample_weights(boxes[:, 0], boxes[:, 2], h, size)
    cols, col_bits = resample_weights(boxes[:, 1], boxes[:, 3], w, size)
    with _exact_matmul(dev):
        x = torch.matmul(images.to(torch.float32), cols.transpose(1, 2).unsqueeze(1))
        x = _shift_round(x, col_bits)
        return _shift_round(torch.matmul(rows.unsqueeze(1), x), row_bits)


@contextmanager
def _exact_matmul(device: torch.device) -> Iterator[None]:
    """float32 products in full precision: no TF32 on a GPU, no autocast."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before


def resize_two_pass(crop: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a uint8 (C, h, w) crop to ``size``² by ``interpolate`` on
    float, width then height, rounded to uint8 values in between as torch's uint8 kernel
    does (one pass on float differs from it by up to 11/255 at sharp edges)."""
    x = crop[None].to(torch.float32)
    x = F.interpolate(x, size=(x.shape[-2], size), mode="bicubic", antialias=True,
                      align_corners=False).clamp_(0, 255).round_()
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x[0].clamp_(0, 255).round_()


def resized_crop(images: Images, boxes: torch.Tensor, size: int,
                 batched: bool | None = None) -> torch.Tensor:
    """``resized_crop`` (bicubic, antialias) of every sample to ``size``²: float32 holding
    uint8 values.

    Batched (the default for images of one size, except large ones on the CPU, where a loop
    over torchvision's uint8 kernel is faster than the products): :func:`resized_crop_batch`.
    Otherwise each image is cropped and resized on its own: by torchvision's op on uint8 on
    the CPU (its native uint8 kernel), by :func:`resize_two_pass` elsewhere.
    """
    if batched is None:
        first = images[0]
        same = isinstance(images, torch.Tensor) or len({tuple(i.shape) for i in images}) == 1
        batched = same and (first.device.type != "cpu" or max(first.shape[-2:]) <= 2 * size)
    if batched:
        if not isinstance(images, torch.Tensor):
            images = torch.stack(list(images))
        return resized_crop_batch(images, boxes, size)
    out = []
    for img, (top, left, h, w) in zip(images, boxes.tolist(), strict=True):
        if img.device.type == "cpu":
            out.append(TF.resized_crop(img, top, left, h, w, [size, size],
                                       InterpolationMode.BICUBIC, antialias=True))
        else:
            out.append(resize_two_pass(img[:, top:top + h, left:left + w], size))
    return torch.stack(out).to(torch.float32)


def _on(x: torch.Tensor, rows: torch.Tensor, op: Callable[..., torch.Tensor],
        *factors: torch.Tensor) -> torch.Tensor:
    """``op`` applied to the samples where the CPU mask ``rows`` is true (the rest untouched)."""
    count = int(rows.sum())
    if count == 0:
        return x
    if count == len(rows):
        return op(x, *(f.to(x.device, non_blocking=True) for f in factors))
    idx = rows.nonzero().squeeze(1)
    idx_dev = idx.to(x.device, non_blocking=True)
    sub = op(x.index_select(0, idx_dev), *(f[idx].to(x.device, non_blocking=True)
                                            for f in factors))
    return x.index_copy_(0, idx_dev, sub)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
"""``ColorJitter``'s numbering of its four adjustments (``fn_idx``)."""


def augment(images: Images, params: ViewParams, recipe: ViewRecipe,
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One view of every sample: (N, 3, size, size) normalised, on the images' device.

    ``images`` are uint8: a (N, 3, H, W) batch or a list of (3, H_i, W_i) images. The view
    recipe's probabilities are already in ``params``; ``recipe`` supplies the size and kernel.
    Runs in float32 even inside an autocast region.
    """
    with torch.autocast(device_of(images).type, enabled=False):
        x = resized_crop(images, params.boxes, recipe.size)
        return after_crop(x, params, recipe, mean, std).to(dtype)


def device_of(images: Images) -> torch.device:
    return images.device if isinstance(images, torch.Tensor) else images[0].device


def image_sizes(images: Images) -> list[tuple[int, int]]:
    """(height, width) of every image of a batch or list."""
    if isinstance(images, torch.Tensor):
        return [tuple(images.shape[-2:])] * len(images)
    return [tuple(i.shape[-2:]) for i in images]


def after_crop(x: torch.Tensor, params: ViewParams, recipe: ViewRecipe,
                mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Flip, jitter in each sample's order, grayscale, blur, solarize, normalise."""
    x = _on(x, params.flip, horizontal_flip)
    if bool(params.jitter.any()):
        ranges = recipe.jitter_ranges
        at = params.jitter.reshape(-1, 1, 1) & (params.order.unsqueeze(2) == torch.arange(4))
        for position in range(4):  # at[i, position, k]: op k is sample i's position-th
            for k, op in enumerate(JITTER_OPS):
                if ranges[k] is not None:
                    x = _on(x, at[:, position, k], op, params.factors[:, k])
    x = _on(x, params.gray, grayscale)
    if bool(params.blur.any()):
        top = float(params.sigma[params.blur].max())
        x = _on(x, params.blur, lambda y, s: gaussian_blur(y, s, recipe.kernel, top), params.sigma)
    x = _on(x, params.solarize, solarize)
    x = x.mul_(1 / 255)  # v2 ``to_dtype(float32, scale=True)``
    return TF.normalize(x, list(mean), list(std), inplace=True)
