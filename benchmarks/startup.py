"""How long each command takes to start, and what ``m2t-transfer evaluate`` imports.

    .venv/bin/python benchmarks/startup.py                          # about 1 min on 2 CPU cores
    git archive HEAD | tar -x -C /tmp/before                        # the code of a commit
    .venv/bin/python benchmarks/startup.py --tree /tmp/before --name startup_before

Runs ``--help`` of ``m2t-pretrain``, ``m2t-convert``, ``m2t-transfer`` and ``m2t-transfer
evaluate`` in a fresh process each, ``--repeat`` times, interleaved, and reports the median
wall time beside that of a bare ``python -c pass`` (the interpreter's own start). Each runs as
``python -m PACKAGE`` (what the ``m2t-*`` console scripts run: ``PACKAGE.__main__.main``) from
``--tree``, so that another checkout (a commit before a change) can be measured with this
virtualenv. Then scores a small COCO results file (the ground-truth boxes of the first
``--images`` images of ``coco_mini`` val, as detections) with ``m2t-transfer evaluate`` under
``python -X importtime``, and lists the top-level packages outside the standard library that
the run imported (``sys.modules`` at its end), each with the time its import took (what it
imports of other packages included, so the times overlap). Writes ``benchmarks/results/<name>.md``
and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import REPO, machine, md_table, write_results  # noqa: E402

DATA = Path(os.environ.get("MOMENTUM2_DATA", REPO.parent / "shared" / "data"))
COCO_VAL = DATA / "coco_mini" / "annotations" / "instances_val2017.json"
PY = sys.executable
COMMANDS = {
    "python -c pass": [PY, "-c", "pass"],
    "m2t-pretrain --help": [PY, "-m", "pretrain", "--help"],
    "m2t-convert --help": [PY, "-m", "convert", "--help"],
    "m2t-transfer --help": [PY, "-m", "transfer", "--help"],
    "m2t-transfer evaluate --help": [PY, "-m", "transfer", "evaluate", "--help"],
}
#: The goal for every command's ``--help`` (issue 27).
GOAL_S = 0.5
#: Runs ``m2t-transfer evaluate`` as the console script does, then lists what it imported.
EVALUATE_CHILD = """
import json, sys
from transfer.__main__ import main
gt, dets, out = sys.argv[1:4]
try:
    status = main(["evaluate", "--dataset", gt, "--predictions", dets])
finally:
    with open(out, "w") as f:
        json.dump(sorted({name.split(".")[0] for name in sys.modules}), f)
sys.exit(status)
"""


def time_once(command: list[str], tree: Path) -> float:
    """Wall seconds of one run of ``command`` in a fresh process; fails if it fails."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=tree)
    return time.perf_counter() - start


def time_commands(repeat: int, tree: Path) -> dict[str, list[float]]:
    """Seconds of every command, ``repeat`` rounds interleaved (after one warm-up round)."""
    for command in COMMANDS.values():
        time_once(command, tree)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeat):
        for name, command in COMMANDS.items():
            times[name].append(time_once(command, tree))
    return times


def results_file(folder: Path, images: int) -> tuple[Path, Path]:
    """A ground-truth file of ``images`` coco_mini val images and a results file holding
    their ground-truth boxes as detections (score 0.9)."""
    gt = json.loads(COCO_VAL.read_text())
    keep = {img["id"] for img in gt["images"][:images]}
    gt["images"] = [img for img in gt["images"] if img["id"] in keep]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 0.9} for a in gt["annotations"]]
    gt_path, dets_path = folder / "gt.json", folder / "results.json"
    gt_path.write_text(json.dumps(gt))
    dets_path.write_text(json.dumps(dets))
    return gt_path, dets_path


def import_seconds(importtime: str) -> dict[str, float]:
    """Seconds spent importing each top-level package, from ``-X importtime``'s report: the
    cumulative time of each of its modules imported from outside the package (a module's
    own submodules are inside its time; another package's imports are too, so the times
    overlap)."""
    entries = []
    for line in importtime.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            _, cumulative, name = line[len("import time:"):].split("|")
            if cumulative.strip().isdigit():
                depth = (len(name) - len(name.lstrip())) // 2
                entries.append((depth, name.strip(), int(cumulative) / 1e6))
    seconds: dict[str, float] = {}
    above: list[str] = []  # the packages of the modules importing this one
    for depth, name, cumulative in reversed(entries):  # the report lists parents last
        package = name.split(".")[0]
        del above[depth:]
        if package not in above:
            seconds[package] = seconds.get(package, 0.0) + cumulative
        above.append(package)
    return dict(sorted(seconds.items()))


def evaluate_imports(images: int, tree: Path) -> dict[str, Any]:
    """One ``m2t-transfer evaluate`` run under ``-X importtime``: its wall time and the
    top-level third-party packages it imported (cumulative import seconds of each)."""
    with tempfile.TemporaryDirectory() as tmp:
        gt, dets = results_file(Path(tmp), images)
        listed = Path(tmp) / "modules.json"
        command = [PY, "-X", "importtime", "-c", EVALUATE_CHILD, str(gt), str(dets), str(listed)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=tree)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"m2t-transfer evaluate failed:\n{proc.stderr[-2000:]}")
        loaded = set(json.loads(listed.read_text()))
    packages = {name: seconds for name, seconds in import_seconds(proc.stderr).items()
                if name in loaded and name not in sys.stdlib_module_names
                and not name.startswith("_")}
    return {"command": f"m2t-transfer evaluate --dataset GT --predictions RESULTS "
                       f"({images} images)", "seconds": seconds,
            "packages": dict(sorted(packages.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command")
    parser.add_argument("--images", type=int, default=96,
                        help="images in the results file that evaluate scores")
    parser.add_argument("--name", default="startup",
                        help="result file name under benchmarks/results (no extension)")
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="checkout whose packages run (default: this one)")
    args = parser.parse_args()
    load_before = list(os.getloadavg())
    info = machine()
    times = time_commands(args.repeat, args.tree)
    evaluate = evaluate_imports(args.images, args.tree)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [[name, f"{medians[name]:.2f}", f"{min(ts):.2f}", f"{max(ts):.2f}",
             "" if name.startswith("python") else ("yes" if medians[name] < GOAL_S else "no")]
            for name, ts in times.items()]
    table = md_table(["command", "median s", "min s", "max s", f"under {GOAL_S} s"], rows)
    imported = md_table(["package", "import s"],
                        [[name, f"{s:.3f}"] for name, s in evaluate["packages"].items()])
    body = "\n".join([
        f"Code from `{args.tree}`. Wall time of a fresh process (`python -m PACKAGE ...`), "
        f"median of {args.repeat} interleaved runs each:", "",
        table, "",
        f"`{evaluate['command']}`, bounding boxes, took "
        f"{evaluate['seconds']:.2f} s under `-X importtime` and imported these top-level "
        f"packages outside the standard library:", "",
        imported])
    print(body)
    data = {"tree": str(args.tree), "repeat": args.repeat, "seconds": times,
            "median_seconds": medians, "goal_seconds": GOAL_S, "evaluate": evaluate}
    path = write_results(args.name, "Start-up time of the commands", body, data, info,
                         load_before)
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
