"""Shared plumbing of the speed benchmarks: interleaved timing, machine facts, result files.

Every benchmark compares things *run interleaved in one process* (A, B, A, B, ...), because
the machines these run on are shared and absolute timings drift with the load; medians of
interleaved rounds and their ratios are what survive that. Each script writes
``benchmarks/results/<script>.md`` (and ``.json``) with the machine, versions and command.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from jobs.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it; no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
               inner: int = 1, device: torch.device | str = "cpu",
               progress: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in interleaved rounds.

    Each function runs ``warmup`` times first (in turn). Then ``rounds`` times: every function
    runs ``inner`` calls back to back, timed as one block (then divided), the order rotating
    from round to round so that no function always follows the same one.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / inner)
        if progress:
            print(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names), flush=True)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i]: each ratio pairs two timings taken moments apart,
    so a load change between rounds cancels out (more robust than a ratio of medians)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def spread(xs: Sequence[float]) -> float:
    """Interquartile range relative to the median (a noise indicator for the tables)."""
    if len(xs) < 4:
        return (max(xs) - min(xs)) / statistics.median(xs)
    q = statistics.quantiles(xs, n=4)
    return (q[2] - q[0]) / statistics.median(xs)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def detectron2_version() -> str:
    try:
        import detectron2
        return detectron2.__version__
    except ImportError:
        return "not installed"


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The facts a reader needs to judge a timing: hardware, load, versions, commit."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "lightly": package_version("lightly"),
        "detectron2": detectron2_version(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                        capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pretrain", "convert",
                                "transfer"], cwd=REPO, capture_output=True, text=True).stdout
        if dirty.strip():
            info["commit"] += " (+ uncommitted changes in the packages)"
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = "unknown"
    return info


def machine_lines(info: dict[str, Any], load_before: Sequence[float] | None = None) -> list[str]:
    load = " / ".join(f"{x:.2f}" for x in info["load_average"])
    before = ""
    if load_before is not None:
        before = " (at start: " + " / ".join(f"{x:.2f}" for x in load_before) + ")"
    lines = [
        f"- date: {info['date']}; commit {info['commit']}",
        f"- machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads; "
        f"load average (1/5/15 min) at the end {load}{before}",
        f"- device: {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else ""),
        f"- python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
        f"lightly {info['lightly']}, detectron2 {info['detectron2']}",
    ]
    return lines


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return "" if x is None else str(x)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(out)


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", shlex.quote(str(script)),
                     *(shlex.quote(a) for a in sys.argv[1:])])




def write_results(script: str, title: str, body: str, data: dict[str, Any],
                  info: dict[str, Any], load_before: Sequence[float] | None = None,
                  out_dir: Path | None = None) -> Path:
    """Write ``<script>.md`` (title, command, machine, body) and ``<script>.json``."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", "```bash", command_line(), "```", "", *machine_lines(info, load_before),
          "", body.rstrip(), ""]
    path = out_dir / f"{script}.md"
    write_text(path, "\n".join(md))  # a killed run never leaves half a result file
    payload = {"command": command_line(), "machine": info, "load_average_at_start": load_before,
               **data}
    write_text(out_dir / f"{script}.json", json.dumps(payload, indent=1, default=str) + "\n")
    return path


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"
