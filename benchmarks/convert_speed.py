"""How long m2t-convert takes on a ResNet-50, with and without ``--verify``.

    .venv/bin/python benchmarks/convert_speed.py [--arch resnet50] [--repeat 5]

Times ``convert_checkpoint`` in-process (the conversion itself: read, recognise, check,
rename, write) as the median of ``--repeat`` runs after one warm-up, and the whole command
once as a user runs it (``m2t-convert`` in a fresh process: Python, torch and torchvision
start-up included). The input is a random-init torchvision state dict; the numbers depend on
the disk and CPU, not on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

from convert import convert_checkpoint


def _median_seconds(repeat: int, **kwargs) -> float:
    convert_checkpoint(force=True, **kwargs)  # warm-up: imports, lazily built tables
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        convert_checkpoint(force=True, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # Detectron2's torch.jit notes
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"{args.arch}.pth"
        torch.save(getattr(torchvision.models, args.arch)().state_dict(), source)
        size = source.stat().st_size / 2**20
        print(f"input: torchvision {args.arch} state dict, {size:.0f} MiB; "
              f"{torch.get_num_threads()} torch threads")
        rows = [
            ("convert_checkpoint -> .pkl (Detectron2)",
             _median_seconds(args.repeat, input=source, output=Path(tmp) / "out.pkl")),
            ("convert_checkpoint -> .pth (torchvision)",
             _median_seconds(args.repeat, input=source, output=Path(tmp) / "out.pth")),
            ("convert_checkpoint -> .pkl --verify",
             _median_seconds(max(1, args.repeat // 2), input=source,
                             output=Path(tmp) / "out.pkl", verify=True)),
        ]
        for flags in ([], ["--verify"]):
            command = [sys.executable, "-m", "convert", str(source), str(Path(tmp) / "cli.pkl"),
                       "--force", *flags]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            rows.append((f"m2t-convert {args.arch}.pth out.pkl {' '.join(flags)}".rstrip()
                         + " (fresh process)", time.perf_counter() - start))
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:6.3f} s")


if __name__ == "__main__":
    main()
