"""The small-batch study (issue 6): does momentum BN keep the teacher good at small batches?

Every method trains a ResNet-18 on the same images for the same number of steps, with a
per-process batch of 32 and of 128 and no SyncBN; kNN top-1 (k = 20, cosine) of the teacher
and the student is measured on a labelled validation folder. A randomly initialised network
is the floor. Results are appended to a JSON-lines file as each cell finishes (a killed
study resumes where it stopped), then written as a Markdown table and a plot.

    python benchmarks/small_batch_study.py --train ../shared/data/cifar10_mini/train \
        --val ../shared/data/cifar10_mini/val --steps 100 --seeds 0 1

On a GPU, raise --steps, --image-size and the batches; nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.learning_curve import METHODS, knn_bank, read_rows  # noqa: E402
from jobs.atomic import replace_file, write_text  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.evaluate import knn_eval, random_backbone  # noqa: E402
from pretrain.train import Trainer  # noqa: E402


def run_cell(method: str, batch: int, seed: int, args: argparse.Namespace) -> dict:
    overrides = [*METHODS[method], "model.arch=resnet18", "model.proj_hidden_dim=1024",
                 "model.proj_dim=128", f"data.batch_size={batch}",
                 f"data.image_size={args.image_size}", f"data.workers={args.workers}",
                 "data.min_scale=0.2", f"train.steps={args.steps}", f"train.seed={seed}",
                 f"optim.base_lr={args.base_lr}", "optim.warmup_epochs=0.1",
                 f"train.log_every={max(args.steps // 5, 1)}", f"train.device={args.device}"]
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = Trainer(cfg, args.train, Path(tmp) / "run")
        trainer.run()
        seconds = time.perf_counter() - start
        row = {"method": method, "batch": batch, "seed": seed, "steps": args.steps,
               "train_seconds": round(seconds, 1), **machine()}
        for branch in ("teacher", "student"):
            backbone = trainer.model.export_backbone(branch)
            row[f"knn_{branch}"] = knn_eval(backbone, args.bank, args.val, args.image_size,
                                            device=args.device)["knn_top1"]
        with open(Path(tmp) / "run" / "metrics.jsonl") as f:
            last = [json.loads(x) for x in f if '"gap"' in x][-1]
        row["gap"] = last["gap"]
    return row


def machine() -> dict:
    """Where a cell ran: threads, cores and the load when it finished (timings depend on it)."""
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load1": round(os.getloadavg()[0], 1), "torch": torch.__version__}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (steps, batch, method) cell."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["steps"], r["batch"], r["method"]), []).append(r)
    out = []
    for (steps, batch, method), rs in sorted(cells.items()):
        s = {"method": method, "batch": batch, "steps": steps, "seeds": len(rs)}
        for key in ("knn_teacher", "knn_student", "gap", "train_seconds"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                s[key] = statistics.mean(vals)
                s[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def write_report(rows: list[dict], out_dir: Path, command: str) -> Path:
    summary = summarise(rows)
    floor = next((s for s in summary if s["method"] == "random"), None)
    trained = [s for s in summary if s["method"] != "random"]
    loads = [r["load1"] for r in rows if "load1" in r]
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    lines = ["# Small-batch study: kNN top-1 (%) on cifar10_mini val, ResNet-18", "",
             "kNN: k = 20, cosine, T = 0.07, memory bank = a class-balanced subset of the "
             "training images, queries = all validation images. Mean ± standard deviation "
             "over seeds.", "",
             "Commands (each resumes the cells it lists that are missing):", "",
             *[f"    {c}" for c in dict.fromkeys(r.get("command", command) for r in rows)], "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"device {rows[-1].get('device', 'cpu') if rows else 'cpu'}"
             + (f", {'/'.join(map(str, threads))} torch threads" if threads else "")
             + (f", load average {min(loads)}–{max(loads)} at the end of the cells "
                "(cells from before the load was recorded ran beside other jobs)"
                if loads else ""), "",
             "| steps | method | batch/process | seeds | teacher kNN | student kNN "
             "| student–teacher gap | train s/cell |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(s: dict, key: str, fmt: str = ".2f") -> str:
        if key not in s:
            return "–"
        if s["seeds"] > 1:
            return f"{s[key]:{fmt}} ± {s[key + '_std']:{fmt}}"
        return f"{s[key]:{fmt}}"

    if floor:
        lines.append(f"| 0 | random network (floor) | – | {floor['seeds']} | {cell(floor, 'knn_teacher')} | "
                     f"{cell(floor, 'knn_student')} | – | – |")
    for s in trained:
        lines.append(f"| {s['steps']} | {s['method']} | {s['batch']} | {s['seeds']} | "
                     f"{cell(s, 'knn_teacher')} | {cell(s, 'knn_student')} | {cell(s, 'gap')} | "
                     f"{cell(s, 'train_seconds', '.0f')} |")
    md = out_dir / "small_batch_study.md"
    write_text(md, "\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return md
    step_counts = sorted({s["steps"] for s in trained})
    if not step_counts:
        return md
    fig, axes = plt.subplots(1, len(step_counts), figsize=(6 + 3 * len(step_counts), 4),
                             squeeze=False)
    for ax, steps in zip(axes[0], step_counts, strict=True):
        part = [s for s in trained if s["steps"] == steps]
        methods = list(dict.fromkeys(s["method"] for s in part))
        batches = sorted({s["batch"] for s in part})
        width = 0.8 / len(batches)
        for i, b in enumerate(batches):
            vals = {s["method"]: s for s in part if s["batch"] == b}
            xs = [j + i * width for j in range(len(methods)) if methods[j] in vals]
            here = [m for m in methods if m in vals]
            ax.bar(xs, [vals[m]["knn_teacher"] for m in here], width,
                   yerr=[vals[m]["knn_teacher_std"] for m in here], capsize=3,
                   label=f"teacher, batch {b}")
        if floor:
            ax.axhline(floor["knn_teacher"], color="gray", ls="--", label="random network")
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(methods))])
        ax.set_xticklabels(methods, rotation=15)
        ax.set_ylabel("kNN top-1 (%)")
        ax.set_title(f"{steps} steps")
        lo = min([s["knn_teacher"] for s in part] + ([floor["knn_teacher"]] if floor else []))
        ax.set_ylim(max(lo - 5, 0), None)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / "small_batch_study.png"
    replace_file(png, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
    return md


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--base-lr", type=float, default=0.3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--knn-bank-per-class", type=int, default=300,
                   help="training images per class in the kNN memory bank (0 = all)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    for flag in ("train", "val"):
        if not Path(getattr(args, flag)).is_dir():
            p.error(f"--{flag} {getattr(args, flag)}: not a folder of class sub-folders")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.bank = knn_bank(args.train, args.knn_bank_per_class, Path(tempfile.mkdtemp()))
    raw = out / "small_batch_study.jsonl"
    rows = read_rows(raw)  # a line cut short by a kill is ignored: that cell runs again
    done = {(r["method"], r["batch"], r["seed"], r["steps"]) for r in rows}
    command = "python benchmarks/small_batch_study.py " + " ".join(sys.argv[1:])
    if not args.report_only:
        for seed in args.seeds:
            if ("random", 0, seed, 0) in done:
                continue
            row = {"method": "random", "batch": 0, "seed": seed, "steps": 0}
            score = knn_eval(random_backbone("resnet18", seed), args.bank, args.val,
                             args.image_size, device=args.device)["knn_top1"]
            row.update(knn_teacher=score, knn_student=score, command=command, **machine())
            rows.append(row)
            with open(raw, "a") as f:
                f.write(json.dumps(row) + "\n")
        for seed in args.seeds:
            for batch in args.batches:
                for method in args.methods:
                    if (method, batch, seed, args.steps) in done:
                        continue
                    row = run_cell(method, batch, seed, args)
                    row.update(device=args.device, command=command)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    with open(raw, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    write_report(rows, out, command)
    md = write_report(rows, out, command)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
