"""The two asymmetric views of SPEC §1.1 (BYOL augmentations), as torchvision transforms on
one PIL image at a time (the batched tensor path: :mod:`pretrain.data.tensor_views`)."""

from __future__ import annotations

import torchvision.transforms as T
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Solarize:
    """PIL solarisation at threshold 128 (pixels ≥ 128 inverted)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, 128)


def view_transform(image_size: int, blur_p: float, solarize_p: float,
                   min_scale: float = 0.08) -> T.Compose:
    """RandomResizedCrop → flip → colour jitter (p 0.8) → grey (p 0.2) → blur → solarize → norm."""
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # ~10% of the side, odd
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomApply([Solarize()], p=solarize_p),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class PilTwoViews:
    """View 1: blur p 1.0, solarize p 0; view 2: blur p 0.1, solarize p 0.2 (SPEC §1.1).

    ``blur`` changes the two blur probabilities (``data.view1_blur``, ``data.view2_blur``).
    """

    def __init__(self, image_size: int, min_scale: float = 0.08,
                 blur: tuple[float, float] = (1.0, 0.1)) -> None:
        self.view1 = view_transform(image_size, blur_p=blur[0], solarize_p=0.0,
                                    min_scale=min_scale)
        self.view2 = view_transform(image_size, blur_p=blur[1], solarize_p=0.2,
                                    min_scale=min_scale)

    def __call__(self, img: Image.Image):
        return self.view1(img), self.view2(img)


def eval_transform(image_size: int) -> T.Compose:
    """Resize (short side ×8/7) + centre crop + normalisation, for kNN and linear evaluation."""
    return T.Compose([
        T.Resize(int(round(image_size * 8 / 7)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
