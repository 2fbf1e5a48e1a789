"""Memory of DataLoader workers over an epoch of an ImageNet-sized file list, and the time to
list it.

    .venv/bin/python benchmarks/data_scale.py                 # about 2 min on 2 CPU cores

**Workers.** A synthetic listing of ``--images`` (1,281,167: ImageNet's) entries in 1,000
class folders, named as ImageNet's are (``<root>/n01440764/n01440764_10026.JPEG``): the
class folders are symbolic links to the ten class folders of ``cifar10_mini/train``, and each
entry's file is one of that folder's real images, cycled, so every path opens a real file.
The dataset objects are the pipelines' own (``TwoViewDataset`` over ``LabelledImages`` for
the PIL path, ``EncodedImages`` for the tensor path) holding the listing either as the lists
of Python objects they held before (``list``: torchvision's ``(path, label)`` tuples, a
``str`` per file) or as the numpy buffers they hold now (``buffer``:
``pretrain.data.samples``). Each configuration runs in a fresh process, which builds its
listing, then iterates one shuffled epoch with ``--workers`` workers (fork), sampling each
worker's memory from ``/proc/PID/smaps_rollup`` every ``--every`` batches: USS (its private
pages: Private_Clean + Private_Dirty, what it costs on its own), PSS and RSS.

- ``pil listing``: the PIL dataset's listing over the whole epoch, each entry read as
  ``TwoViewDataset.__getitem__`` reads it (``folder.samples[index]``), but not seeded nor
  decoded: the listing's share of a worker's memory, over all 1.28M entries;
- ``tensor listing``: the tensor path's dataset over the whole epoch, every file read
  (bytes), not decoded;
- ``pil decode`` / ``tensor decode``: both pipelines in full (decode + two 32 px views on
  the CPU) over ``--decode`` entries spread over the shuffled epoch.

**Listing.** ``--list-files`` empty files in 1,000 class folders on the local disk, listed
by ``image_folder`` (torchvision's scan: ``os.scandir`` of each folder, sorted) twice (the
second with the directory entries cached), and the 1.28M figure extrapolated linearly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import REPO, machine, md_table, write_results  # noqa: E402

DATA = Path(os.environ.get("MOMENTUM2_DATA", REPO.parent / "shared" / "data"))
IMAGENET = 1_281_167
CLASSES = 1000

#: One configuration, in a child process: argv = representation, part, images, workers,
#: every, decode, root. Prints one JSON line.
CHILD = r'''
import gc, json, os, sys, time
import torch
from pretrain.data.decode import EncodedImages
from pretrain.data.folder import TwoViewDataset, collate_views
from pretrain.data.loader import build_loader
from pretrain.data.samples import Samples
from pretrain.data.tensor_pipeline import AugmentInWorker
from pretrain.data.tensor_views import TwoViewAugment
from pretrain.data.views import PilTwoViews

kind, part, n, workers, every, decode, root, tiny = sys.argv[1:]
n, workers, every, decode = int(n), int(workers), int(every), int(decode)
torch.set_num_threads(1)

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

def listing():
    names = {c: sorted(os.listdir(os.path.join(root, f"n{c:08d}"))) for c in range(10)}
    for k in range(n):
        c = k % 1000
        files = names[c % 10]
        yield os.path.join(root, f"n{c:08d}", files[(k // 1000) % len(files)]), c

def object_mib(pairs):
    """What a list of (str, int) tuples holds: the list, each tuple, str and (large) int."""
    small = sys.getsizeof(pairs) + sum(sys.getsizeof(t) + sys.getsizeof(t[0]) for t in pairs)
    return (small + sum(sys.getsizeof(t[1]) for t in pairs if t[1] > 256)) / 2**20

t = time.perf_counter()
pairs = sorted(listing())  # torchvision's order: by class folder, then by file name
if kind == "buffer":
    samples = Samples(pairs)
    listing_mib = samples.nbytes / 2**20
    del pairs
else:
    samples = pairs
    listing_mib = object_mib(pairs)
gc.collect()
build_s = time.perf_counter() - t

def smaps(pid):
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                out[key] = int(rest.split()[0]) / 1024
    return {"uss": out["Private_Clean"] + out["Private_Dirty"], "pss": out["Pss"],
            "rss": out["Rss"]}

class Entries(torch.utils.data.Dataset):
    """What TwoViewDataset.__getitem__ reads of the listing (``folder.samples[index]``),
    without its seeding (torch.manual_seed: ~0.1 ms a sample here) and decoding."""
    def __init__(self, dataset):
        self.dataset = dataset
    def __len__(self):
        return len(self.dataset)
    def __getitem__(self, index):
        path, _ = self.dataset.folder.samples[index]
        return len(path)

if part.startswith("pil"):
    dataset = TwoViewDataset(tiny, PilTwoViews(32, 0.2, (1.0, 0.1)), seed=0)
    folder = dataset.folder
    folder.samples = folder.imgs = samples
    folder.targets = samples.targets if kind == "buffer" else [c for _, c in samples]
    if part == "pil listing":
        dataset, collate = Entries(dataset), len
    else:
        collate = collate_views
else:
    # before: the folder's tuples and EncodedImages' own list of str, both alive
    dataset = EncodedImages(samples.paths if kind == "buffer" else [])
    if kind == "list":
        dataset.paths = [p for p, _ in samples]  # what EncodedImages held before
    if part == "tensor listing":
        collate = lambda batch: len(batch)  # bytes read, not decoded
    else:
        collate = AugmentInWorker(TwoViewAugment(32, 0.2, blur=(1.0, 0.1)), 0, 0)
gc.collect()
loader = build_loader(dataset, batch_size=256, workers=workers, rank=0, world_size=1, epoch=0,
                      start_batch=0, seed=0, collate_fn=collate)
if part.endswith("decode"):  # --decode entries spread over the shuffled epoch
    sampler = loader.batch_sampler.sampler
    order = list(sampler)
    step = max(1, len(order) // decode)
    keep = order[::step][:decode]
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=keep,
                                         num_workers=workers, collate_fn=collate)
samples_at, t = [], time.perf_counter()
it = iter(loader)
pids = [w.pid for w in it._workers]
batches = 0
total = len(loader)
for _ in it:
    batches += 1
    if batches == 1 or batches % every == 0 or batches == total:  # workers still alive
        mem = [smaps(p) for p in pids]
        samples_at.append({"batch": batches, "seconds": round(time.perf_counter() - t, 2),
                           "uss": [round(m["uss"], 1) for m in mem],
                           "pss": [round(m["pss"], 1) for m in mem],
                           "rss": [round(m["rss"], 1) for m in mem]})
print(json.dumps({"kind": kind, "part": part, "entries": n, "build_s": round(build_s, 2),
                  "listing_mib": round(listing_mib, 1), "main_rss_mib": round(rss_mib(), 1),
                  "epoch_s": round(time.perf_counter() - t, 1), "batches": batches,
                  "samples": samples_at}))
'''


def class_tree(tmp: Path) -> tuple[Path, Path]:
    """1,000 class folders ``n00000000..`` linking in turn to cifar10_mini's ten; and a tiny
    real ImageFolder (two classes) for the datasets' other attributes."""
    cifar = sorted((DATA / "cifar10_mini" / "train").iterdir())
    root = tmp / "imagenet_like"
    root.mkdir()
    for c in range(CLASSES):
        (root / f"n{c:08d}").symlink_to(cifar[c % len(cifar)], target_is_directory=True)
    tiny = tmp / "tiny"
    for c in range(2):
        (tiny / f"c{c}").mkdir(parents=True)
        first = sorted(cifar[c].iterdir())[0]
        (tiny / f"c{c}" / first.name).symlink_to(first)
    return root, tiny


def run_child(args: argparse.Namespace, kind: str, part: str, root: Path, tiny: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, part, str(args.images),
                           str(args.workers), str(args.every), str(args.decode), str(root),
                           str(tiny)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {part} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_listing(tmp: Path, files: int) -> dict[str, Any]:
    """``files`` empty files in 1,000 class folders, listed by ``image_folder`` twice."""
    from pretrain.data.folder import image_folder

    root = tmp / "listing"
    per = files // CLASSES
    t = time.perf_counter()
    for c in range(CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for k in range(per):
            (folder / f"n{c:08d}_{k}.JPEG").touch()
    created = time.perf_counter() - t
    times = []
    for _ in range(2):
        t = time.perf_counter()
        folder = image_folder(root)
        times.append(time.perf_counter() - t)
    assert len(folder) == per * CLASSES
    return {"files": per * CLASSES, "create_s": round(created, 1),
            "list_first_s": round(times[0], 2), "list_again_s": round(times[1], 2),
            "per_file_us": round(times[1] / (per * CLASSES) * 1e6, 2),
            "imagenet_s": round(times[1] / (per * CLASSES) * IMAGENET, 1)}


def growth(result: dict) -> tuple[float, float, float]:
    """(USS after the first batch, at the end, largest) of the most grown worker, MiB."""
    first, last = result["samples"][0]["uss"], result["samples"][-1]["uss"]
    worst = max(range(len(first)), key=lambda w: last[w] - first[w])
    peak = max(s["uss"][worst] for s in result["samples"])
    return first[worst], last[worst], peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=IMAGENET)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--every", type=int, default=250, help="sample memory every N batches")
    ap.add_argument("--decode", type=int, default=4096,
                    help="entries decoded per pipeline (spread over the epoch)")
    ap.add_argument("--list-files", type=int, default=128_000)
    ap.add_argument("--parts", default="pil listing,tensor listing,pil decode,tensor decode")
    ap.add_argument("--name", default="data_scale")
    args = ap.parse_args()
    info, load_before = machine(), [round(x, 2) for x in os.getloadavg()]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root, tiny = class_tree(Path(tmp))
        for part in args.parts.split(","):
            for kind in ("list", "buffer"):
                r = run_child(args, kind, part, root, tiny)
                first, last, peak = growth(r)
                print(f"{part:15s} {kind:6s}: listing {r['listing_mib']:.0f} MiB, worker USS "
                      f"{first:.0f} → {last:.0f} MiB (peak {peak:.0f}) over {r['batches']} "
                      f"batches, {r['epoch_s']:.0f} s", flush=True)
                results.append(r)
        listing = time_listing(Path(tmp), args.list_files) if args.list_files else None
    rows = []
    for r in results:
        first, last, peak = growth(r)
        rss = r["samples"][-1]["rss"]
        rows.append([r["part"], r["kind"], f"{r['entries']:,}", f"{r['listing_mib']:.0f}",
                     r["batches"] * (256 if "listing" in r["part"] else 64), f"{first:.0f}",
                     f"{last:.0f}", f"{peak:.0f}", f"{max(rss):.0f}", f"{r['epoch_s']:.0f}"])
    body = [f"Synthetic listing of {args.images:,} entries in {CLASSES:,} class folders (every "
            f"file one of `cifar10_mini/train`'s, cycled), {args.workers} DataLoader workers "
            f"(fork), one shuffled epoch. `list`: the Python lists the datasets held before "
            f"(`(path, label)` tuples, a `str` per file); `buffer`: the numpy buffers of "
            f"`pretrain.data.samples`. Worker memory from `/proc/PID/smaps_rollup` every "
            f"{args.every} batches; USS = Private_Clean + Private_Dirty of the worker that "
            f"grew most. `listing MiB`: what the listing holds (the objects' `sys.getsizeof`, "
            f"or the buffers' bytes).", "",
            md_table(["part", "listing as", "entries", "listing MiB", "samples read",
                      "worker USS at start MiB", "at end MiB", "peak MiB", "worker RSS end MiB",
                      "s"], rows)]
    if listing:
        body += ["", f"Listing {listing['files']:,} empty files in {CLASSES:,} class folders "
                 f"with `image_folder` (torchvision's scan): {listing['list_first_s']} s the "
                 f"first time (just created: entries cached), {listing['list_again_s']} s again, "
                 f"{listing['per_file_us']} µs a file; at {IMAGENET:,} files, linearly, "
                 f"{listing['imagenet_s']} s per process. (Creating them took "
                 f"{listing['create_s']} s.) Cold on a network file system it is slower: this "
                 f"measures the scan's own cost, not the storage's."]
    path = write_results(args.name, "Data loading at ImageNet size: worker memory and listing",
                         "\n".join(body), {"args": vars(args), "results": results,
                                           "listing": listing}, info, load_before)
    print("\n".join(body))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
