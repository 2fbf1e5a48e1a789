"""The kNN monitor's search at ImageNet size: peak memory and time, blockwise against one matrix.

    python benchmarks/knn_scale.py                      # writes benchmarks/results/knn_scale.{json,md}
    python benchmarks/knn_scale.py --queries 64         # quicker

Each measurement runs in its own child process (one torch thread), so its peak resident memory
is its own. Rows:
- ``blocks, ImageNet bank``: ``pretrain.knn.nearest`` over a 1,281,167 × 2048 float16 bank
  streamed in blocks of 32,768 rows (what a rank's device holds is its shard; here the whole
  bank passes through one process), ``--queries`` queries, 1 GiB blocks (the default
  ``train.knn_chunk_mb``);
- ``one matrix`` (what the monitor did before): the whole query × bank similarity matrix and its
  top k, at the largest size that fits this machine, and the memory it would need at ImageNet's
  50,000 × 1,281,167 (computed: 4 bytes a cell);
- ``blocks, same size``: the blockwise search at that same size, side by side.
The time for 50,000 queries is extrapolated linearly from the measured queries (the work is
queries × bank rows); on a GPU each rank searches 1/ranks of the bank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGENET, IMAGENET_VAL, DIM = 1_281_167, 50_000, 2048

CHILD = """
import json, time
import torch
import torch.nn.functional as F
torch.set_num_threads(1)
from pretrain.knn import nearest
def status_mib(key):  # VmHWM: this process's peak (ru_maxrss would include its forked parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
N, Q, D, MODE, CHUNK = {n}, {q}, {d}, {mode!r}, {chunk}
B = 32768
g = torch.Generator().manual_seed(0)
pool = F.normalize(torch.randn(min(B, N), D, generator=g), dim=1).half()
def block(j):
    return pool[:min(B, N - j * B)].roll(j, dims=1)
queries = pool[:Q].float().roll(3, dims=1)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak from here on
base = status_mib("VmRSS")
t = time.perf_counter()
if MODE == "matrix":
    bank = torch.cat([block(j) for j in range((N + B - 1) // B)]).float()
    top = (queries @ bank.T).topk(20, dim=1)
else:
    top = nearest((block(j) for j in range((N + B - 1) // B)), queries, 20, CHUNK)
print(json.dumps({{"seconds": time.perf_counter() - t, "base_mib": base, "peak_mib": status_mib("VmHWM")}}))
"""


def child(n: int, q: int, d: int, mode: str, chunk: int) -> dict:
    code = textwrap.dedent(CHILD.format(n=n, q=q, d=d, mode=mode, chunk=chunk))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"error: the {mode} measurement failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"bank": n, "queries": q, "dim": d, "mode": mode, **out,
            "added_mib": out["peak_mib"] - out["base_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "knn_scale")
    args = parser.parse_args()
    gib = 1 << 30
    rows = [child(IMAGENET, args.queries, DIM, "blocks", gib)]
    small = (131_072, 2048)  # a bank of 131,072 × 2048: 1 GiB in float32, fits one matrix here
    rows.append(child(small[0], args.queries, small[1], "matrix", gib))
    rows.append(child(small[0], args.queries, small[1], "blocks", gib))
    full = rows[0]
    result = {
        "rows": rows,
        "imagenet_one_matrix_gib": IMAGENET_VAL * IMAGENET * 4 / gib,
        "imagenet_blocks_seconds_50k_queries_one_cpu": full["seconds"] * IMAGENET_VAL
        / args.queries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| search | bank × dim | queries | added peak memory (MiB) | seconds |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['bank']:,} × {r['dim']} | {r['queries']} | "
                     f"{r['added_mib']:.0f} | {r['seconds']:.1f} |")
    lines += ["", f"One matrix at ImageNet's 50,000 × 1,281,167: "
              f"{result['imagenet_one_matrix_gib']:.0f} GiB of float32 (computed).",
              f"Blocks, 50,000 queries, one CPU thread (extrapolated from {args.queries}): "
              f"{result['imagenet_blocks_seconds_50k_queries_one_cpu'] / 3600:.1f} h; "
              "a GPU rank searches its shard instead."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
