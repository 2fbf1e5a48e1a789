"""Two-view data pipeline throughput: the PIL path vs the batched tensor path (issue 14).

    .venv/bin/python benchmarks/data_pipeline.py                  # per CPU core
    .venv/bin/python benchmarks/data_pipeline.py --device cuda    # on a GPU, vs PIL on every core

**Per core** (the default): one process, one torch thread, which is what one ``DataLoader``
worker is. Interleaved in one run (A, B, C, A, ..., the order rotating), decode + both views
of SPEC §1.1 for the same images, seeded per sample as ``pretrain.data.folder`` seeds them:

- **PIL** (``pretrain.data.views.PilTwoViews``, today's path): PIL decode, torchvision transforms
  on PIL images, one image at a time;
- **v2 per image**: ``decode_jpeg`` + the same recipe in ``torchvision.transforms.v2`` on one
  uint8 tensor at a time (for reference);
- **tensor, batched** (``pretrain.data.tensor_views.TwoViewAugment``): ``decode_images`` on a
  chunk of files, then both views of the whole chunk at once;

at 224 and 96 px on COCO JPEGs; the decoders alone; and at 32 px on CIFAR-10 JPEGs, where the
batched path also runs on a resident uint8 copy (``pretrain.data.resident``: no file, no decode).

**Device mode** (``--device cuda``; ``--device cpu`` runs the same code on the CPU, slowly,
to prove it works): JPEG bytes → two normalised views on the device, in images/s:
DataLoader workers on every core read bytes and draw parameters
(``pretrain.data.tensor_pipeline.SampleInWorker``), the main process decodes (nvjpeg) and augments
on the device (``views_from_encoded``); against the PIL path with the same workers, its views
copied to the device as a trainer would. Also the device's decode alone, augmentation alone,
and a resident CIFAR-10 copy on the device. Results go to ``data_pipeline_<device>.md``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
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
    synchronize,
    write_results,
)
from pretrain.data.decode import (  # noqa: E402
    EncodedImages,
    decode_cpu,
    decode_images,
    read_bytes,
)
from pretrain.data.resident import ResidentImages  # noqa: E402
from pretrain.data.tensor_ops import image_sizes  # noqa: E402
from pretrain.data.tensor_params import blur_kernel_size, sample_seed  # noqa: E402
from pretrain.data.tensor_pipeline import SampleInWorker, views_from_encoded  # noqa: E402
from pretrain.data.tensor_views import TwoViewAugment  # noqa: E402
from pretrain.data.views import IMAGENET_MEAN, IMAGENET_STD, PilTwoViews  # noqa: E402

DATA = REPO.parent / "shared" / "data"
DEFAULT_IMAGES = DATA / "coco_mini" / "train2017"
DEFAULT_CIFAR = DATA / "cifar10_mini" / "train"


def v2_view(image_size: int, blur_p: float, solarize_p: float) -> v2.Compose:
    """The SPEC §1.1 view recipe in ``transforms.v2`` on one uint8 image tensor."""
    kernel = blur_kernel_size(image_size)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.08, 1.0),
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class V2TwoViews:
    def __init__(self, image_size: int) -> None:
        self.view1 = v2_view(image_size, 1.0, 0.0)
        self.view2 = v2_view(image_size, 0.1, 0.2)

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(img), self.view2(img)


def pil_decode(path: Path | str) -> Image.Image:
    """What ``torchvision.datasets.folder.pil_loader`` does."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def seed_like_data_py(index: int) -> None:
    """``TwoViewDataset``'s per-sample seeding (seed 0, epoch 0)."""
    s = sample_seed(0, 0, index)
    random.seed(s)
    torch.manual_seed(s)


def rows_from(times: dict[str, list[float]], base: str, per: int, size: Any,
              rows: list[dict[str, Any]]) -> None:
    for name, ts in times.items():
        per_image = median(ts) / per
        rows.append({"size": size, "name": name, "per_image_s": per_image,
                     "images_per_s": 1 / per_image, "iqr_rel": spread(ts),
                     "ratio": paired_ratio(ts, times[base]), "times_s": ts})


# ---------------------------------------------------------------------------------------------
# Per core


def per_core(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # one DataLoader worker
    paths = sorted(args.images.glob("*.jpg"))
    if not paths:
        sys.exit(f"{args.images}: no .jpg images found; pass --images FOLDER")
    shapes = sorted({Image.open(p).size for p in paths[:50]})
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []

    def chunks(items: list[Path], n: int):
        """Every pipeline walks the same sequence of chunks of ``n`` (index, path)."""
        cursor = [0]

        def next_chunk() -> list[tuple[int, Path]]:
            i = cursor[0]
            cursor[0] = (i + n) % len(items)
            return [((i + k) % len(items), items[(i + k) % len(items)]) for k in range(n)]
        return next_chunk

    def pil_path(size: int, items: list[Path], n: int):
        views, nxt = PilTwoViews(size), chunks(items, n)

        def run() -> None:
            for index, path in nxt():
                seed_like_data_py(index)
                views(pil_decode(path))
        return run

    def v2_path(size: int, items: list[Path], n: int):
        views, nxt = V2TwoViews(size), chunks(items, n)

        def run() -> None:
            for index, path in nxt():
                seed_like_data_py(index)
                views(decode_cpu(read_bytes(path)))
        return run

    def tensor_path(size: int, items: list[Path], n: int):
        aug, nxt = TwoViewAugment(size), chunks(items, n)

        def run() -> None:
            chunk = nxt()
            decoded = decode_images([read_bytes(p) for _, p in chunk], "cpu")
            aug(decoded.images, [sample_seed(0, 0, chunk[k][0]) for k in decoded.kept])
        return run

    pil_name = "PIL, per image (pretrain.data.views.PilTwoViews)"
    for size in args.sizes:
        print(f"\ntwo views at {size} px, chunks of {args.chunk} images", flush=True)
        times = interleave({
            pil_name: pil_path(size, paths, args.chunk),
            "torchvision v2, per image": v2_path(size, paths, args.chunk),
            "tensor, batched (TwoViewAugment)": tensor_path(size, paths, args.chunk),
        }, rounds=args.rounds, warmup=1)
        rows_from(times, pil_name, args.chunk, size, rows)

    print("\ndecoders alone", flush=True)
    nxt_pil, nxt_tv = chunks(paths, args.chunk), chunks(paths, args.chunk)
    times = interleave({
        "PIL open + convert('RGB')": lambda: [pil_decode(p).load() for _, p in nxt_pil()],
        "decode_images (torchvision)": lambda: decode_images(
            [read_bytes(p) for _, p in nxt_tv()], "cpu"),
    }, rounds=args.rounds, warmup=1)
    rows_from(times, "PIL open + convert('RGB')", args.chunk, "decode only", rows)

    cifar = sorted(args.cifar.glob("*/*.jpg"))[:args.cifar_images or 1024] if args.cifar else []
    if cifar:
        print(f"\nCIFAR-10 at 32 px, chunks of {args.cifar_chunk} images", flush=True)
        resident = ResidentImages(cifar, progress=False)
        aug32, cursor = TwoViewAugment(32), [0]

        def resident_path() -> None:
            i = cursor[0]
            cursor[0] = (i + args.cifar_chunk) % len(resident)
            pos = [(i + k) % len(resident) for k in range(args.cifar_chunk)]
            images, indices = resident.batch(pos)
            aug32(images, [sample_seed(0, 0, int(j)) for j in indices])

        times = interleave({
            pil_name: pil_path(32, cifar, args.cifar_chunk),
            "tensor, batched (TwoViewAugment)": tensor_path(32, cifar, args.cifar_chunk),
            "tensor, resident uint8 copy (no decode)": resident_path,
        }, rounds=args.rounds, warmup=1)
        rows_from(times, pil_name, args.cifar_chunk, "32 (CIFAR)", rows)

    table = md_table(
        ["output size", "pipeline (decode + two views)", "ms / image", "images/s per core",
         "IQR/median", "time / PIL"],
        [[r["size"], r["name"], fmt_ms(r["per_image_s"]), f"{r['images_per_s']:.0f}",
          f"{r['iqr_rel']:.2f}", f"{r['ratio']:.2f}"] for r in rows])
    where = (args.images.relative_to(REPO.parent) if args.images.is_relative_to(REPO.parent)
             else args.images)
    body = (f"{len(paths)} JPEGs from `{where}` (sizes such as "
            f"{', '.join(f'{w}×{h}' for w, h in shapes[:3])})"
            + (f", and {len(cifar)} CIFAR-10 JPEGs (32×32)" if cifar else "")
            + f"; one core = one process, 1 torch thread; the batched path takes chunks of "
            f"{args.chunk} images ({args.cifar_chunk} for CIFAR). `time / PIL` is the median "
            f"of per-round ratios.\n\n{table}\n")
    print("\n" + table)
    path = write_results("data_pipeline", "Two-view data pipeline throughput per core", body,
                         {"rows": rows}, machine("cpu"), load_before, args.out)
    print(f"written to {path}")


# ---------------------------------------------------------------------------------------------
# Device mode


class PilViews(Dataset):
    """The PIL path as ``TwoViewDataset`` runs it (decode + views in a worker)."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.views = paths, PilTwoViews(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed_like_data_py(index)
        return self.views(pil_decode(self.paths[index]))


def stream_rate(loader: DataLoader, step, warm: int, timed: int, device: torch.device) -> float:
    """Images/s of ``step(batch)`` over ``timed`` batches of a fresh iterator, after ``warm``
    (worker start-up and the first prefetches are not timed)."""
    it = iter(loader)
    for _ in range(warm):
        step(next(it))
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(timed):
        images += step(next(it))
    synchronize(device)
    rate = images / (time.perf_counter() - start)
    del it
    return rate


def device_mode(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 16)
    timed = args.timed_batches or (30 if cuda else 2)
    warm = args.warm_batches if args.warm_batches is not None else (8 if cuda else 1)
    workers = args.workers or len(os.sched_getaffinity(0))
    size = args.sizes[0]
    found = sorted(args.images.glob("*.jpg"))
    if not found:
        sys.exit(f"{args.images}: no .jpg images found; pass --images FOLDER")
    need = batch * (warm + timed)
    paths = [found[k % len(found)] for k in range(need)]
    load_before = os.getloadavg()
    aug = TwoViewAugment(size)
    rows: list[dict[str, Any]] = []

    def record(name: str, rates: list[float], note: str = "") -> None:
        rows.append({"name": name, "images_per_s": median(rates), "rates": rates, "note": note})
        print(f"  {name}: {median(rates):,.0f} images/s ({', '.join(f'{r:,.0f}' for r in rates)})",
              flush=True)

    tensor_loader = DataLoader(EncodedImages(paths), batch_size=batch, num_workers=workers,
                               collate_fn=SampleInWorker(aug, 0, 0), prefetch_factor=4)
    pil_loader = DataLoader(PilViews(paths, size), batch_size=batch, num_workers=workers,
                            pin_memory=cuda, prefetch_factor=4)

    def tensor_step(b) -> int:
        views = views_from_encoded(b, aug, device, 0, 0)
        return len(views.indices)

    def pil_step(b) -> int:
        v1, v2_ = (t.to(device, non_blocking=True) for t in b)
        return len(v1)

    print(f"JPEG bytes → two {size} px views on {device}, batches of {batch}, {workers} "
          f"workers, {timed} timed batches after {warm}", flush=True)
    rates: dict[str, list[float]] = {"tensor": [], "pil": []}
    for r in range(args.rounds):
        order = ["tensor", "pil"] if r % 2 == 0 else ["pil", "tensor"]
        for who in order:
            loader, step = ((tensor_loader, tensor_step) if who == "tensor"
                            else (pil_loader, pil_step))
            rates[who].append(stream_rate(loader, step, warm, timed, device))
            print(f"  round {r + 1}: {who} {rates[who][-1]:,.0f} images/s", flush=True)
    record(f"tensor path: {workers} workers read bytes, nvjpeg + batched views on {device}"
           if cuda else f"tensor path: {workers} workers read bytes, decode + views on {device}",
           rates["tensor"])
    record(f"PIL path: {workers} worker processes, views copied to {device}", rates["pil"])

    # the device's share alone: decode, then augmentation, of one batch already in memory
    data = [read_bytes(p) for p in paths[:batch]]
    images = decode_images(data, device).images
    seeds = [sample_seed(0, 0, k) for k in range(len(images))]
    params = aug.sample(image_sizes(images), seeds)
    inner = 3 if cuda else 1
    times = interleave({
        "decode alone": lambda: decode_images(data, device),
        "views alone (parameters drawn)": lambda: aug.apply(images, params),
    }, rounds=args.rounds + 2, warmup=1, inner=inner, device=device, progress=False)
    for name, ts in times.items():
        record(f"{name}: {'nvjpeg' if cuda and name.startswith('decode') else ''} "
               f"batch of {batch} on {device}".replace(":  ", ": "),
               [len(images) / t for t in ts])
    start = time.perf_counter()
    aug.sample(image_sizes(images), seeds)
    record("parameter draws alone, one CPU core (done in the workers)",
           [len(images) / (time.perf_counter() - start)])

    # agreement: the device's decode and views against the CPU's, same parameters
    on_cpu = decode_images(data, "cpu").images
    decode_diff = torch.cat([(a.cpu().float() - b.float()).abs().flatten()
                             for a, b in zip(images, on_cpu, strict=True)])
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1) * 255
    view_diff = torch.cat([((a.cpu() - b) * std).abs().flatten() for a, b in
                           zip(aug.apply(images, params), aug.apply(on_cpu, params),
                               strict=True)])
    same_input = torch.cat([((a.cpu() - b) * std).abs().flatten() for a, b in
                            zip(aug.apply(images, params),
                                aug.apply([i.cpu() for i in images], params), strict=True)])
    agreement = {
        "decode vs CPU decode (levels)": decode_diff,
        "views vs CPU views, each from its own decode (levels)": view_diff,
        "views vs CPU views, same decoded images (levels)": same_input,
    }
    for name, diff in agreement.items():
        rows.append({"name": name, "agreement": {
            "mean": float(diff.mean()), "max": float(diff.max()),
            "over_one_level": float((diff > 1.01).float().mean())}})
        print(f"  {name}: mean {diff.mean():.3f}, max {diff.max():.1f}, "
              f"{float((diff > 1.01).float().mean()):.2e} over one level", flush=True)

    cifar = sorted(args.cifar.glob("*/*.jpg"))[:args.cifar_images] if args.cifar else []
    if cifar:
        resident = ResidentImages(cifar, device, workers=min(workers, 8), progress=False)
        aug32 = TwoViewAugment(32)
        n32 = batch * 2
        pos = torch.arange(n32) % len(resident)

        def resident_step() -> None:
            images32, indices = resident.batch(pos)
            aug32(images32, [sample_seed(0, 0, int(i)) for i in indices])

        times = interleave({"resident": resident_step}, rounds=args.rounds + 2, warmup=1,
                           inner=inner, device=device, progress=False)
        record(f"resident CIFAR-10 ({len(resident):,} images on {device}), two 32 px views, "
               f"batch {n32}", [n32 / t for t in times["resident"]])

    table = md_table(["pipeline", "images/s (median)", "per round"],
                     [[r["name"], f"{r['images_per_s']:,.0f}",
                       ", ".join(f"{x:,.0f}" for x in r["rates"])]
                      for r in rows if "rates" in r])
    table += "\n\n" + md_table(
        ["agreement with the CPU path, one batch", "mean", "max", "share over one level"],
        [[r["name"], f"{r['agreement']['mean']:.3f}", f"{r['agreement']['max']:.1f}",
          f"{r['agreement']['over_one_level']:.2e}"] for r in rows if "agreement" in r])
    body = (f"JPEG bytes → two normalised {size} px views (SPEC §1.1) on `{device}`; "
            f"{len(found)} COCO JPEGs cycled, batches of {batch}, {workers} DataLoader "
            f"workers, {args.rounds} interleaved rounds of {timed} timed batches after {warm} "
            f"untimed ones. Goal (issue 14): ≥ 3,000 images/s per GPU.\n\n{table}\n")
    print("\n" + table)
    path = write_results(f"data_pipeline_{device.type}", "Two-view data pipeline on a device",
                         body, {"rows": rows, "batch": batch, "workers": workers},
                         machine(device), load_before, args.out)
    print(f"written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None,
                        help="device mode on this device (cuda, or cpu to try it here)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR if DEFAULT_CIFAR.is_dir()
                        else None, help="CIFAR-10 JPEG folder for the 32 px rows")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="output sizes (per core: 224 96; device mode: 224)")
    parser.add_argument("--chunk", type=int, default=16, help="per core: images per timed block")
    parser.add_argument("--cifar-chunk", type=int, default=64)
    parser.add_argument("--cifar-images", type=int, default=None,
                        help="CIFAR images used (per core: 1024; device mode: all)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=None, help="device mode: batch size")
    parser.add_argument("--timed-batches", type=int, default=None)
    parser.add_argument("--warm-batches", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None,
                        help="device mode: DataLoader workers (default: every core)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.device is None:
        args.sizes = args.sizes or [224, 96]
        args.rounds = args.rounds or 12
        per_core(args)
    else:
        args.sizes = args.sizes or [224]
        args.rounds = args.rounds or 2
        device_mode(args)


if __name__ == "__main__":
    main()
