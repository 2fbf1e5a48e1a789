"""Fingerprint what the pipeline produces, to prove a restructuring changed no result.

    python benchmarks/no_change.py --out /tmp/before.json      # on the old code
    python benchmarks/no_change.py --out /tmp/after.json       # on the new code
    python benchmarks/no_change.py --compare /tmp/before.json /tmp/after.json

It runs, on the CPU with one thread: m2t and BYOL pretraining (6 steps, tiny ResNet-18, a
kNN evaluation, 3 steps + resume + 3 steps) and ``make demo --quick`` (pretrain, convert,
two fine-tunings, report). It records the SHA-256 of every tensor of every checkpoint and
converted file, the metrics with their timing fields removed, and the log lines with
times, speeds and paths masked. ``--compare`` lists every difference; none means the two
code versions gave the same weights, metrics and log lines.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MOMENTUM2_DATA", REPO.parent / "shared" / "data"))
TINY = ["model.arch=resnet18", "model.width=16", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.log_every=1",
        "optim.base_lr=1.0", "optim.warmup_epochs=0", "train.device=cpu", "train.steps=6",
        ]
TIMING = re.compile(r"(time|speed|eta|sec|second|img_s|images_per|_s$|wall|date|when|host|"
                    r"elapsed|rss|memory|mem_)", re.I)
MASKS = [(re.compile(r"\d+(\.\d+)?\s*(s|ms|min|h|it/s|img/s|images/s|GB|MB|MiB|GiB)\b"), "<t>"),
         (re.compile(r"\d\d:\d\d:\d\d"), "<clock>"), (re.compile(r"\d{4}-\d\d-\d\d"), "<date>"),
         (re.compile(r"eta[ =:]\s*\S+", re.I), "eta <t>"), (re.compile(r"/tmp/[^\s'\"]+"), "<path>"),
         (re.compile(r"pid[ =]\d+", re.I), "pid <n>")]


def tensor_hashes(obj, prefix: str = "") -> dict[str, str]:
    import numpy as np
    import torch
    out: dict[str, str] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = hashlib.sha256(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    elif isinstance(obj, np.ndarray):
        out[prefix] = hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensor_hashes(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensor_hashes(v, f"{prefix}[{i}]"))
    return out


def load_any(path: Path):
    import torch
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            return pickle.load(f)
    return torch.load(path, map_location="cpu", weights_only=False)


def clean_record(rec):
    if isinstance(rec, dict):
        return {k: clean_record(v) for k, v in rec.items() if not TIMING.search(k)}
    return rec


def mask(line: str) -> str:
    for pattern, repl in MASKS:
        line = pattern.sub(repl, line)
    return line.rstrip()


def fingerprint_dir(root: Path) -> dict:
    found: dict = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        rel = str(path.relative_to(root))
        if path.suffix in (".pth", ".pkl"):
            found[rel] = tensor_hashes(load_any(path))
        elif path.name.endswith(".jsonl") or path.name == "metrics.json":
            recs = []
            for line in path.read_text().splitlines():
                try:
                    recs.append(clean_record(json.loads(line)))
                except json.JSONDecodeError:
                    recs.append(mask(line))
            found[rel] = recs
        elif path.name == "results.json":
            found[rel] = clean_record(json.loads(path.read_text()))
    return found


def run(cmd: list[str], log: Path) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return [mask(x) for x in (proc.stdout + proc.stderr).splitlines()
            if x.strip() and "Warning" not in x and "warn(" not in x]


def fingerprint(work: Path) -> dict:
    py = sys.executable
    train, val = DATA / "cifar10_mini" / "train", DATA / "cifar10_mini" / "val"
    result: dict = {}
    for method in ("m2t", "byol"):
        out = work / method
        base = [py, "-m", "pretrain", "train", "--config", "resnet18_cifar", "--data", str(train),
                "--val", str(val), "--out", str(out), f"model.method={method}", *TINY]
        lines = run([*base, "--stop-after", "3"], work / f"{method}_a.log")
        lines += run([*base, "--resume"], work / f"{method}_b.log")
        result[method] = {"files": fingerprint_dir(out), "log": lines}
    demo = work / "demo"
    lines = run([py, "-m", "transfer.demo", "--quick", "--out", str(demo)], work / "demo.log")
    result["demo"] = {"files": fingerprint_dir(demo), "log": lines}
    return result


def compare(a, b, where: str = "") -> list[str]:
    """Every difference between two fingerprints (paths and times masked, NaN equal to NaN;
    log lines as a diff)."""
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{where}.{k}: only in the first" for k in a.keys() - b.keys()]
        diffs += [f"{where}.{k}: only in the second" for k in b.keys() - a.keys()]
        for k in sorted(a.keys() & b.keys()):
            diffs += compare(a[k], b[k], f"{where}.{k}")
        return diffs
    if isinstance(a, list) and isinstance(b, list):
        if all(isinstance(x, str) for x in a + b):
            lines = difflib.unified_diff([mask(x) for x in a], [mask(x) for x in b], lineterm="",
                                         n=0)
            return [f"{where}: {line}" for line in list(lines)[2:] if not line.startswith("@@")]
        if len(a) == len(b):
            return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                    for d in compare(x, y, f"{where}[{i}]")]
    if isinstance(a, str) and isinstance(b, str):
        a, b = mask(a), mask(b)
    if a == b or (a in ("nan", "NaN") and b in ("nan", "NaN")) or (
            isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
        return []
    return [f"{where}: {str(a)[:200]!r} != {str(b)[:200]!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        diffs = compare(*(json.loads(p.read_text()) for p in args.compare))
        print("\n".join(diffs) or "no difference: same weights, metrics and log lines")
        sys.exit(1 if diffs else 0)
    with tempfile.TemporaryDirectory() as tmp:
        result = fingerprint(Path(tmp))
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    n = sum(len(v) for r in result.values() for v in r["files"].values() if isinstance(v, dict))
    print(f"wrote {args.out}: {n} tensor hashes, "
          f"{sum(len(r['log']) for r in result.values())} log lines")


if __name__ == "__main__":
    main()
