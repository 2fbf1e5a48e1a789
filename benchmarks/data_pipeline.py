"""Two-view augmentation throughput per data-loader worker, on real JPEGs.

    .venv/bin/python benchmarks/data_pipeline.py [--images ../shared/data/coco_mini/train2017]

One worker = one process with one torch thread, which is what each ``DataLoader`` worker
is. Interleaved in one process, per image (decode + both views, as
``pretrain.data.TwoViewDataset`` does):

- **PIL** (the default, ``pretrain.augment.TwoViews``): PIL decode, torchvision ``transforms``
  on PIL images, ``ToTensor`` + ``Normalize`` at the end;
- **v2 tensor**: ``torchvision.io.decode_jpeg`` to a uint8 tensor and the same recipe in
  ``torchvision.transforms.v2`` on tensors (RandomResizedCrop bicubic with antialias,
  flip, ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur σ 0.1–2 with
  p 1.0 / 0.1, solarize at 128 with p 0 / 0.2, ``ToDtype`` + ``Normalize``);
- **v2, float after the crop**: the same, converted to float32 right after crop and flip
  (the colour operations then skip their uint8 round trips);

and, to locate the cost, the decoders alone (PIL open + RGB convert vs ``decode_jpeg``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode, v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    REPO,
    fmt_ms,
    interleave,
    machine,
    md_table,
    median,
    paired_ratio,
    spread,
    write_results,
)
from pretrain.augment import IMAGENET_MEAN, IMAGENET_STD, TwoViews  # noqa: E402

DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "coco_mini" / "train2017"


def v2_view(image_size: int, blur_p: float, solarize_p: float, min_scale: float = 0.08,
            float_early: bool = False) -> v2.Compose:
    """The SPEC §1.1 view recipe in ``transforms.v2`` on uint8 image tensors.

    ``float_early``: convert to float32 right after the crop and flip, so that the colour
    operations work on floats (no uint8 round trip per operation; solarize at 128/255).
    """
    kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # as pretrain.augment.view_transform
    to_float = [v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        *(to_float if float_early else []),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomSolarize(threshold=128 / 255 if float_early else 128, p=solarize_p),
        *([] if float_early else to_float),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class V2TwoViews:
    """View 1: blur p 1.0, solarize p 0; view 2: blur p 0.1, solarize p 0.2 (uint8 tensors)."""

    def __init__(self, image_size: int, min_scale: float = 0.08, float_early: bool = False) -> None:
        self.view1 = v2_view(image_size, 1.0, 0.0, min_scale, float_early)
        self.view2 = v2_view(image_size, 0.1, 0.2, min_scale, float_early)

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(img), self.view2(img)


def pil_decode(path: Path) -> Image.Image:
    """What ``torchvision.datasets.folder.pil_loader`` does."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def tensor_decode(path: Path) -> torch.Tensor:
    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 96])
    parser.add_argument("--chunk", type=int, default=16, help="images per timed block")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(1)  # one DataLoader worker
    paths = sorted(args.images.glob("*.jpg"))
    if not paths:
        sys.exit(f"{args.images}: no .jpg images found; pass --images FOLDER")
    sizes = sorted({Image.open(p).size for p in paths[:50]})
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    cursors: dict[str, int] = {}

    def next_chunk(who: str) -> list[Path]:
        """The next ``--chunk`` images for ``who``: every pipeline walks the same sequence."""
        i = cursors.get(who, 0)
        cursors[who] = (i + args.chunk) % len(paths)
        return [paths[(i + k) % len(paths)] for k in range(args.chunk)]

    def pipeline(who: str, decode, views):
        def run() -> None:
            for k, p in enumerate(next_chunk(who)):
                random.seed(k)
                torch.manual_seed(k)
                views(decode(p))
        return run

    for size in args.sizes:
        print(f"\ntwo views at {size} px, chunks of {args.chunk} images", flush=True)
        cursors.clear()
        times = interleave({
            "PIL (pretrain.augment.TwoViews)": pipeline("pil", pil_decode, TwoViews(size)),
            "v2 on uint8 tensors": pipeline("v2", tensor_decode, V2TwoViews(size)),
            "v2, float after the crop": pipeline("v2f", tensor_decode,
                                                 V2TwoViews(size, float_early=True)),
        }, rounds=args.rounds, warmup=1)
        base = times["PIL (pretrain.augment.TwoViews)"]
        for name, ts in times.items():
            per_image = median(ts) / args.chunk
            rows.append({"size": size, "name": name, "per_image_s": per_image,
                         "images_per_s": 1 / per_image, "iqr_rel": spread(ts),
                         "ratio": paired_ratio(ts, base), "times_s": ts})

    print("\ndecoders alone", flush=True)
    cursors.clear()
    times = interleave({
        "PIL open + convert('RGB')": pipeline("pil", pil_decode, lambda img: img.load()),
        "torchvision.io.decode_jpeg": pipeline("v2", tensor_decode, lambda img: None),
    }, rounds=args.rounds, warmup=1)
    base = times["PIL open + convert('RGB')"]
    for name, ts in times.items():
        per_image = median(ts) / args.chunk
        rows.append({"size": "decode only", "name": name, "per_image_s": per_image,
                     "images_per_s": 1 / per_image, "iqr_rel": spread(ts),
                     "ratio": paired_ratio(ts, base), "times_s": ts})

    table = md_table(
        ["output size", "pipeline (decode + two views)", "ms / image", "images/s per worker",
         "IQR/median", "time / PIL"],
        [[r["size"], r["name"], fmt_ms(r["per_image_s"]), f"{r['images_per_s']:.0f}",
          f"{r['iqr_rel']:.2f}", f"{r['ratio']:.2f}"] for r in rows])
    body = (f"{len(paths)} JPEGs from `{args.images.relative_to(REPO.parent) if args.images.is_relative_to(REPO.parent) else args.images}` "
            f"(sizes such as {', '.join(f'{w}×{h}' for w, h in sizes[:3])}); one worker = one "
            f"process, 1 torch thread.\n\n{table}\n")
    print("\n" + table)
    path = write_results("data_pipeline", "Two-view augmentation throughput per worker", body,
                         {"rows": rows}, machine("cpu"), load_before, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
