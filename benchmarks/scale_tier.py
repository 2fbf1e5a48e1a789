"""Peak memory and time of each data-size-dependent path at its real size, before and after
issue 30: the measurements of the scale tier (``tests/scale/``), run and tabulated.

    .venv/bin/python benchmarks/scale_tier.py                 # about 8 min on 2 CPU cores
    .venv/bin/python benchmarks/scale_tier.py --only listing,metrics

Each row runs in a fresh interpreter (``tests/scale/conftest.py::measure``): ``peak`` is its
peak RSS, ``work`` the peak less that of the interpreter just before the work (imports and
inputs built). "before" rows run the code the path ran before (the whole-file metrics trim;
the list of tuples), "after" rows today's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import machine, md_table, write_results  # noqa: E402
from tests.scale.conftest import measure  # noqa: E402
from tests.scale.test_checkpoint_scale import CAPTURE  # noqa: E402
from tests.scale.test_eval_scale import LVIS, REPORT  # noqa: E402
from tests.scale.test_listing_scale import EPOCH, IMAGENET  # noqa: E402
from tests.scale.test_metrics_scale import STEPS, TRIM  # noqa: E402


def rows_for(part: str, lvis_dets: int) -> list[tuple[str, str, str, dict]]:
    """(path, size, before/after, measurement) for one part."""
    if part == "listing":
        return [("file list + one worker's epoch", f"{IMAGENET:,} entries", when,
                 measure(EPOCH.format(n=IMAGENET, kind=kind)))
                for when, kind in (("before (tuples)", "list"), ("after (buffer)", "buffer"))]
    if part == "metrics":
        return [("metrics.jsonl trim on resume", f"{STEPS:,} records", when,
                 measure(TRIM.format(trim=fn, steps=STEPS)))
                for when, fn in (("before (whole file)", "whole_file"),
                                 ("after (line by line)", "trim_metrics"))]
    if part == "checkpoint":
        return [("checkpoint capture + save, ResNet-50 m2t", f"{w} rank(s)", "unchanged",
                 measure(CAPTURE.format(world=w))) for w in (1, 64)]
    if part == "lvis":
        return [("LVIS bbox evaluation (fast)", f"20,000 images × {lvis_dets} dets", "unchanged",
                 measure(LVIS.format(images=20_000, dets=lvis_dets), timeout=3600))]
    if part == "report":
        return [("report, 15 runs × 1,203 categories", "bbox + segm", "unchanged",
                 measure(REPORT))]
    raise SystemExit(f"unknown part {part!r}")


def detail(r: dict) -> str:
    keys = {"worker_first_mib": "worker USS first batch {:.0f} MiB",
            "worker_last_mib": "last {:.0f} MiB", "bytes": "file {:,.0f} B",
            "buffer_bytes": "per-rank buffers {:,.0f} B", "dets": "{:,} dets",
            "kib": "report.md {:.0f} KiB", "size_mib": "file {:.0f} MiB"}
    return "; ".join(fmt.format(r[k]) for k, fmt in keys.items() if r.get(k) is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="listing,metrics,checkpoint,report,lvis")
    ap.add_argument("--lvis-dets", type=int, default=300)
    args = ap.parse_args()
    info, load_before = machine(), [round(x, 2) for x in os.getloadavg()]
    rows, raw = [], []
    for part in args.only.split(","):
        for path, size, when, r in rows_for(part, args.lvis_dets):
            seconds = r.get("seconds", r.get("epoch_s"))
            rows.append([path, size, when, f"{r['peak_mib']:,.0f}",
                         f"{r['peak_mib'] - r['base_mib']:,.0f}",
                         "" if seconds is None else f"{seconds:.1f}", detail(r)])
            raw.append({"part": part, "path": path, "size": size, "when": when,
                        **{k: v for k, v in r.items() if k != "text"}})
            print(" | ".join(rows[-1]), flush=True)
    body = md_table(["path", "size", "code", "peak MiB", "work MiB", "s", "also"], rows)
    path = write_results("scale_tier", "Each data-size-dependent path at its real size", body,
                         {"rows": raw}, info, load_before)
    print(body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
