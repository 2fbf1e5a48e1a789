"""SPEC §1.7: the batched tensor path is §1.1's per-image pipeline, operation by operation.

Oracles: torchvision's functional ops (``transforms.v2.functional``) for each operation with
fixed parameters, torchvision's own parameter sampling for the draws, and the PIL pipeline
(``pretrain.data.views.PilTwoViews``) for whole views and their statistics. Every random
check uses fixed seeds, so none can flake; statistical bounds are 5 standard deviations.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F1
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pretrain.config import load_config
from pretrain.data import tensor_ops as pixel
from pretrain.data import tensor_params as draw
from pretrain.data.tensor_views import TwoViewAugment
from pretrain.data.views import IMAGENET_MEAN, IMAGENET_STD, PilTwoViews, view_transform
from pretrain.errors import UserError

UNIT = 1 / 255


def scene(height: int = 48, width: int = 64, seed: int = 0) -> torch.Tensor:
    """A uint8 (3, H, W) test image: smooth colour gradients, noise, a gray patch, pure
    primaries (hue ties between channels) and sharp black/white edges (bicubic overshoot)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width),
                            indexing="ij")
    img = torch.stack([xx, yy, 1 - xx * yy]) * 200 + torch.rand(3, height, width, generator=g) * 55
    img[:, :8, :8] = 128  # gray
    img[:, :8, 8:16] = torch.tensor([255.0, 0, 0]).reshape(3, 1, 1)
    img[:, :8, 16:24] = torch.tensor([255.0, 255, 0]).reshape(3, 1, 1)  # max ties r = g
    img[:, 8:, width // 2:width // 2 + 3] = 0  # a black bar on a bright field
    img[:, height - 6:, :] = 255
    return img.round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.stack([scene(seed=k) for k in range(4)])


def values(u8: torch.Tensor) -> torch.Tensor:
    """The representation the batched ops work on: float32 holding uint8 values."""
    return u8.to(torch.float32)


def assert_within_one_level(mine: torch.Tensor, ref_u8: torch.Tensor,
                            exact: float = 0.98) -> None:
    """``mine`` (uint8 values in float32) is within 1/255 of torchvision's uint8 result,
    and equal to it for at least the fraction ``exact`` of the pixels."""
    assert torch.equal(mine, mine.round()) and mine.min() >= 0 and mine.max() <= 255
    diff = (mine - ref_u8.to(torch.float32)).abs()
    assert diff.max() <= 1, f"{int((diff > 1).sum())} pixels differ by up to {diff.max()}/255"
    assert (diff == 0).float().mean() >= exact


# ---------------------------------------------------------------------------------------------
# Each operation with fixed parameters = torchvision's functional op

FACTOR_OPS = {
    "brightness": (pixel.adjust_brightness, TF.adjust_brightness, [0.6, 0.95, 1.2, 1.4]),
    "contrast": (pixel.adjust_contrast, TF.adjust_contrast, [0.6, 0.95, 1.2, 1.4]),
    "saturation": (pixel.adjust_saturation, TF.adjust_saturation, [0.8, 0.9, 1.1, 1.2]),
    "hue": (pixel.adjust_hue, TF.adjust_hue, [-0.1, -0.5, 0.03, 0.5]),
}


@pytest.mark.parametrize("name", FACTOR_OPS)
def test_jitter_op_with_a_factor_per_sample_equals_torchvisions(name, batch):
    mine_op, tv_op, factors = FACTOR_OPS[name]
    mine = mine_op(values(batch), torch.tensor(factors))
    ref = torch.stack([tv_op(img, f) for img, f in zip(batch, factors, strict=True)])
    assert_within_one_level(mine, ref)


def test_blur_with_a_sigma_per_sample_equals_torchvisions(batch):
    sigmas = [0.1, 0.6, 1.3, 2.0]
    for kernel in (3, 9, 23):
        sigma = torch.tensor(sigmas)
        ref = torch.stack([TF.gaussian_blur(img, [kernel, kernel], [s, s])
                           for img, s in zip(batch, sigmas, strict=True)])
        full = pixel.gaussian_blur(values(batch), sigma, kernel)
        trimmed = pixel.gaussian_blur(values(batch), sigma, kernel, max_sigma=max(sigmas))
        assert_within_one_level(full, ref)
        assert_within_one_level(trimmed, ref)


def test_fixed_ops_equal_torchvisions(batch):
    x = values(batch)
    assert torch.equal(pixel.horizontal_flip(x), values(TF.horizontal_flip(batch)))
    assert torch.equal(pixel.grayscale(x),
                       values(TF.rgb_to_grayscale(batch, num_output_channels=3)))
    assert torch.equal(pixel.solarize(x), values(TF.solarize(batch, threshold=128)))
    # normalisation: what ToDtype(scale) + Normalize and ToTensor + Normalize give
    square = batch[..., :48].contiguous()
    (params,) = draw.sample_views([(48, 48)] * 4, range(4), [draw.ViewRecipe(48, 0.0, 0.0)])
    params.boxes[:] = torch.tensor([0, 0, 48, 48])  # the whole image, at its size
    params.flip[:] = params.jitter[:] = params.gray[:] = False
    mine = pixel.augment(square, params, draw.ViewRecipe(48, 0.0, 0.0))
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    ref = TF.normalize(TF.to_dtype(square, torch.float32, scale=True), mean, std)
    assert torch.equal(mine, ref)
    pil = torch.stack([T.Compose([T.ToTensor(), T.Normalize(mean, std)])(
        Image.fromarray(img.permute(1, 2, 0).numpy())) for img in square])
    torch.testing.assert_close(mine, pil, atol=1e-6, rtol=0)


BOXES = [(0, 0, 48, 64), (3, 5, 20, 30), (10, 2, 30, 11), (0, 0, 7, 9), (40, 60, 8, 4)]


@pytest.mark.parametrize("size", [24, 32, 96])
def test_resized_crop_equals_torchvisions_bicubic_antialiased_op(size):
    images = [scene(seed=k) for k in range(len(BOXES))]
    boxes = torch.tensor(BOXES)
    ref = torch.stack([TF.resized_crop(img, *box, [size, size], InterpolationMode.BICUBIC,
                                       antialias=True) for img, box in zip(images, BOXES, strict=True)])
    # per image on the CPU: torchvision's own uint8 kernel
    assert torch.equal(pixel.resized_crop(images, boxes, size, batched=False), values(ref))
    # a same-size batch as matrix products (torch's fixed-point arithmetic), and the
    # two-pass form used for lists on a GPU (float arithmetic)
    assert_within_one_level(pixel.resized_crop(images, boxes, size, batched=True), ref, exact=0.999)
    two_pass = torch.stack([pixel.resize_two_pass(img[:, t:t + h, c:c + w], size)
                            for img, (t, c, h, w) in zip(images, BOXES, strict=True)])
    diff = (two_pass - values(ref)).abs()  # float rounding: now and then 2 levels
    assert diff.max() <= 2 and (diff > 1).float().mean() < 1e-3


def test_crop_and_resize_agree_with_pil_bicubic():
    """The PIL path crops and resizes PIL images. Torch's antialiased bicubic is a port of
    PIL's: within 1/255 but for rare pixels at sharp edges (here the black bar; on
    photographs 1 pixel in 7,000 beyond 1/255, up to 11/255), where torchvision's own uint8
    op, which the tensor path reproduces, differs from PIL just as much."""
    pil_img = Image.fromarray(scene(64, 80).permute(1, 2, 0).numpy())
    tensor = TF.pil_to_tensor(pil_img)
    boxes = [(0, 0, 64, 80), (5, 7, 40, 31), (10, 3, 12, 50)]
    for size in (32, 96):
        ref = torch.stack([TF.pil_to_tensor(F1.resized_crop(pil_img, *b, [size, size],
                                                            InterpolationMode.BICUBIC))
                           for b in boxes]).to(torch.float32)
        tv = torch.stack([TF.resized_crop(tensor, *b, [size, size], InterpolationMode.BICUBIC,
                                          antialias=True) for b in boxes]).to(torch.float32)
        for batched in (False, True):
            mine = pixel.resized_crop([tensor] * 3, torch.tensor(boxes), size, batched=batched)
            diff = (mine - ref).abs()
            assert (diff <= 1).float().mean() > 0.995 and diff.max() <= 12
            assert diff.max() <= (tv - ref).abs().max() + 1


def test_solarize_and_blur_agree_with_pil():
    pil_img = Image.fromarray(scene(40, 40).permute(1, 2, 0).numpy())
    x = values(TF.pil_to_tensor(pil_img))[None]
    ref = TF.pil_to_tensor(ImageOps.solarize(pil_img, 128))
    assert torch.equal(pixel.solarize(x)[0], values(ref))
    for sigma in (0.1, 1.0, 2.0):  # the PIL path's blur is torchvision's tensor blur, rounded
        ref = TF.pil_to_tensor(T.GaussianBlur(9, sigma=(sigma, sigma))(pil_img))
        assert_within_one_level(pixel.gaussian_blur(x, torch.tensor([sigma]), 9, sigma)[0], ref)


def test_blur_kernel_follows_augment_py():
    for size in (32, 64, 96, 160, 224):
        blur = [t for t in view_transform(size, 1.0, 0.0).transforms
                if isinstance(t, T.RandomApply) and isinstance(t.transforms[0], T.GaussianBlur)]
        assert blur[0].transforms[0].kernel_size == (draw.blur_kernel_size(size),) * 2


def test_a_view_is_torchvisions_uint8_ops_in_the_sampled_order(batch):
    """Whole views with sampled parameters = torchvision's ops on uint8 applied one after
    another: crop, flip, jitter in each sample's order, grayscale, blur, solarize, then
    ``ToDtype(scale)`` + normalise. Per op within one level; chained, at most two."""
    recipe = draw.ViewRecipe(32, blur_p=0.5, solarize_p=0.5)
    n = 24
    images = [scene(seed=k % 4) for k in range(n)]
    (params,) = draw.sample_views([(48, 64)] * n, range(100, 100 + n), [recipe])
    assert params.jitter.any() and not params.jitter.all()
    mine = pixel.augment(images, params, recipe)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    exact = 0
    for k in range(n):
        top, left, h, w = params.boxes[k].tolist()
        x = TF.resized_crop(images[k], top, left, h, w, [32, 32], InterpolationMode.BICUBIC,
                            antialias=True)
        if params.flip[k]:
            x = TF.horizontal_flip(x)
        if params.jitter[k]:
            for op in params.order[k].tolist():
                x = ops[op](x, float(params.factors[k, op]))
        if params.gray[k]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params.blur[k]:
            s = float(params.sigma[k])
            x = TF.gaussian_blur(x, [recipe.kernel] * 2, [s, s])
        if params.solarize[k]:
            x = TF.solarize(x, 128)
        ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(IMAGENET_MEAN),
                           list(IMAGENET_STD))
        levels = ((mine[k] - ref) * std * 255).abs()
        assert levels.max() < 2.01, (k, levels.max())
        exact += int((levels < 1e-3).sum())
    assert exact / mine.numel() > 0.98


# ---------------------------------------------------------------------------------------------
# Parameters drawn as torchvision draws them


@pytest.mark.parametrize("shape", [(37, 91), (224, 224), (480, 640), (10, 300), (300, 12)])
def test_crop_box_is_get_params_with_the_same_seed(shape):
    """The same calls in the same order: the same boxes, fallback (10 failed tries) included."""
    height, width = shape
    for seed in range(300):
        torch.manual_seed(seed)
        ref = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.08, 1.0],
                                             [3 / 4, 4 / 3])
        box = draw.crop_box(draw.Draws(torch.Generator().manual_seed(seed)), height, width,
                            (0.08, 1.0), (3 / 4, 4 / 3))
        assert box == tuple(ref), seed


def assert_replays(two: PilTwoViews, recipes: tuple[draw.ViewRecipe, ...],
                   seeds: range) -> None:
    """After both views of a 40×30 image, the global generator (PIL path) and the sample's
    generator (tensor path) are at the same state, for every seed."""
    img = Image.new("RGB", (40, 30))
    for seed in seeds:
        torch.manual_seed(seed)
        two(img)
        draws = draw.Draws(torch.Generator().manual_seed(seed))
        for recipe in recipes:
            draw.sample_view(draws, 30, 40, recipe)
        assert torch.equal(draws.generator.get_state(), torch.get_rng_state()), seed


def test_a_view_draws_what_view_transform_draws():
    """Replaying the PIL path's random calls: the tensor path draws what it draws."""
    assert_replays(PilTwoViews(16), draw.two_view_recipes(16), range(200))


def test_blur_probabilities_are_settings_of_both_paths():
    """``data.view1_blur``/``view2_blur`` reach both paths: the PIL path's random calls replay
    in the tensor path under other probabilities too, and the draws follow them."""
    blur = (0.3, 0.0)
    recipes = draw.two_view_recipes(16, blur=blur)
    assert_replays(PilTwoViews(16, blur=blur), recipes, range(100))
    n = 10_000
    view1, view2 = draw.sample_views([(32, 32)] * n, range(n), recipes)
    assert binomial_ok(int(view1.blur.sum()), n, 0.3) and not view2.blur.any()
    cfg = load_config(None, ["data.view1_blur=0.3", "data.view2_blur=0"])
    assert (cfg.data.view1_blur, cfg.data.view2_blur) == blur
    with pytest.raises(UserError, match="view2_blur"):
        load_config(None, ["data.view2_blur=1.5"])


def test_crop_distribution_matches_get_params_over_20000_draws():
    """Area fraction and log aspect ratio of 20,000 boxes, tensor path vs torchvision's
    get_params drawn from other seeds: two-sample Kolmogorov–Smirnov distance under the
    α = 1e-6 critical value."""
    n, height, width = 20_000, 180, 240
    (params,) = draw.sample_views([(height, width)] * n, range(n),
                               [draw.ViewRecipe(32, blur_p=0.0, solarize_p=0.0)])
    torch.manual_seed(12345)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, height, width),
                                                       [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    mine = params.boxes.to(torch.float64)
    critical = math.sqrt(-math.log(1e-6 / 2) / 2) * math.sqrt(2 / n)

    def ks(a: torch.Tensor, b: torch.Tensor) -> float:
        grid = torch.cat([a, b]).unique()
        cdf_a = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
        cdf_b = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
        return float((cdf_a - cdf_b).abs().max())

    for stat in (lambda b: b[:, 2] * b[:, 3] / (height * width),
                 lambda b: torch.log(b[:, 3] / b[:, 2]),
                 lambda b: b[:, 0] / height, lambda b: b[:, 1] / width):
        assert ks(stat(mine), stat(ref)) < critical
    area = mine[:, 2] * mine[:, 3] / (height * width)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0


def binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_probabilities_and_jitter_factors_follow_the_spec():
    n = 20_000
    view1, view2 = draw.sample_views([(64, 64)] * n, [draw.sample_seed(0, 0, i) for i in range(n)],
                                  draw.two_view_recipes(32))
    for view in (view1, view2):
        assert binomial_ok(int(view.flip.sum()), n, 0.5)
        assert binomial_ok(int(view.jitter.sum()), n, 0.8)
        assert binomial_ok(int(view.gray.sum()), n, 0.2)
        on = view.jitter
        for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            f = view.factors[on, k].double()
            assert f.min() >= lo and f.max() <= hi
            width = hi - lo  # uniform: mean in the middle, variance width²/12
            assert abs(f.mean() - (lo + hi) / 2) < 5 * width / math.sqrt(12 * len(f))
            assert abs(f.var() - width**2 / 12) < 5 * width**2 * math.sqrt(1 / 180 / len(f))
        # the order: each of the 24 permutations equally likely
        perms = torch.unique(view.order[on], dim=0, return_counts=True)[1]
        assert len(perms) == 24 and all(binomial_ok(int(c), int(on.sum()), 1 / 24) for c in perms)
        assert torch.equal(view.factors[~on], torch.tensor([1.0, 1, 1, 0]).expand(int((~on).sum()), 4))
        s = view.sigma[view.blur].double()
        assert s.min() >= 0.1 and s.max() <= 2.0
        assert abs(s.mean() - 1.05) < 5 * 1.9 / math.sqrt(12 * len(s))
    assert view1.blur.all() and not view1.solarize.any()
    assert binomial_ok(int(view2.blur.sum()), n, 0.1)
    assert binomial_ok(int(view2.solarize.sum()), n, 0.2)


# ---------------------------------------------------------------------------------------------
# Whole views: the PIL pipeline's, and repeatable


def cifar_images(root: Path, n: int) -> list[Path]:
    paths = sorted(root.glob("*/*.jpg"))
    # the first n of a class-interleaved order, so every class is in
    by_class: dict[str, list[Path]] = {}
    for p in paths:
        by_class.setdefault(p.parent.name, []).append(p)
    return [p for group in zip(*by_class.values(), strict=False) for p in group][:n]


def test_views_match_the_pil_pipeline_for_the_same_seeds(cifar10_mini):
    """Same seeds, same parameters: each view is the PIL path's view up to rounding (PIL
    rounds after every operation and quantises hue to 8 bits)."""
    paths = cifar_images(cifar10_mini / "train", 200)
    pil = [Image.open(p).convert("RGB") for p in paths]
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    two, aug = PilTwoViews(32), TwoViewAugment(32)
    seeds = [draw.sample_seed(7, 3, i) for i in range(len(pil))]
    refs = []
    for img, seed in zip(pil, seeds, strict=True):
        torch.manual_seed(seed)
        refs.append(two(img))
    v1, v2 = aug([TF.pil_to_tensor(p) for p in pil], seeds)
    for mine, ref in ((v1, torch.stack([r[0] for r in refs])),
                      (v2, torch.stack([r[1] for r in refs]))):
        diff = ((mine - ref) * std).abs() * 255
        assert diff.mean() < 1.5, diff.mean()
        assert torch.quantile(diff.flatten()[::7], 0.99) < 4.5
        assert (diff.flatten(1).amax(1) > 20).sum() == 0


def test_channel_statistics_match_the_pil_pipeline_over_1000_images(cifar10_mini):
    """Per-channel mean and std of each view over 1,000 images: with the same seeds within
    0.01 (normalised units, ≈ 0.6/255), with other seeds within 5 standard errors."""
    paths = cifar_images(cifar10_mini / "train", 1000)
    pil = [Image.open(p).convert("RGB") for p in paths]
    tensors = torch.stack([TF.pil_to_tensor(p) for p in pil])
    two, aug = PilTwoViews(32), TwoViewAugment(32)
    ref = {1: [], 2: []}
    for k, img in enumerate(pil):
        torch.manual_seed(k)
        a, b = two(img)
        ref[1].append(a)
        ref[2].append(b)
    same = aug(tensors, list(range(len(pil))))
    other = aug(tensors, [10**9 + k for k in range(len(pil))])
    for view in (1, 2):
        r = torch.stack(ref[view])
        for mine, tol in ((same[view - 1], None), (other[view - 1], 5)):
            for stat in (lambda v: v.mean(dim=(2, 3)), lambda v: v.std(dim=(2, 3))):
                a, b = stat(mine), stat(r)  # (N, 3) per image
                gap = (a.mean(0) - b.mean(0)).abs()
                if tol is None:
                    assert gap.max() < 0.01, gap
                else:
                    se = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
                    assert (gap < tol * se).all(), (gap, se)


def test_same_seeds_give_bit_identical_views(batch):
    aug = TwoViewAugment(32)
    seeds = [draw.sample_seed(3, 1, i) for i in range(4)]
    first = aug(batch, seeds)
    again = aug(batch, seeds)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = aug(batch, [draw.sample_seed(3, 2, i) for i in range(4)])
    assert not torch.equal(first[0], other[0])
    # a sample's views do not depend on its batch mates (up to float summation order)
    alone = aug(batch[2:3], seeds[2:3])
    torch.testing.assert_close(alone[0][0], first[0][2], atol=1e-5, rtol=0)


def test_seeds_from_a_generator_resume_from_its_saved_state():
    g = torch.Generator().manual_seed(5)
    draw.seeds_from(g, 10)
    state = g.get_state()
    nxt = draw.seeds_from(g, 10)
    g2 = torch.Generator()
    g2.set_state(state)
    assert draw.seeds_from(g2, 10) == nxt


def test_views_of_a_list_of_sizes_and_a_batch_agree(batch):
    aug = TwoViewAugment(24)
    seeds = list(range(4))
    from_batch = aug(batch, seeds)
    from_list = aug(list(batch), seeds)
    for a, b in zip(from_batch, from_list, strict=True):
        assert a.shape == (4, 3, 24, 24) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_no_images_give_empty_views_and_autocast_does_not_reach_the_ops(batch):
    aug = TwoViewAugment(16)
    v1, v2 = aug([], [])
    assert v1.shape == v2.shape == (0, 3, 16, 16)
    seeds = list(range(4))
    plain = aug(batch, seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = aug(batch, seeds)
    assert all(torch.equal(a, b) for a, b in zip(plain, under_autocast, strict=True))
