"""Does pretraining learn? kNN top-1 against images seen and wall time, and the small-batch study.

Each cell (method × per-process batch × seed) trains the shipped small-image recipe
(``configs/pretrain/resnet18_cifar_cpu.yaml`` unless ``--config``) for the same number of
images, pausing ``--points`` times to score the teacher's and the student's backbone with
kNN (k = 20, cosine, T = 0.07; memory bank: ``--bank-per-class`` training images per class;
queries: every ``--val`` image). The point at 0 images is the network as initialised: the
random-network floor of that seed. Evaluation time is not counted as training time.

Every scored point is appended to ``<out>/learning_curve.jsonl`` as it is measured, so a
killed study resumes: finished cells are skipped, an unfinished one starts again. The table
(``learning_curve.md``: the curve, the final points as mean ± std over seeds, and m2t − byol
paired by seed at each batch) and the plot (``learning_curve.png``) are rewritten after every
cell.

    python benchmarks/learning_curve.py --train ../shared/data/cifar10_mini/train \\
        --val ../shared/data/cifar10_mini/val --methods m2t byol --seeds 0 1 --images 100000

    # the small-batch study: same images seen at per-process batch 32 and 256
    python benchmarks/learning_curve.py ... --batches 32 256 --methods m2t byol --seeds 0 1

On a GPU add ``--device cuda`` and the full CIFAR-10 training set; ``--quick`` is a tiny run
for the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._harness import machine  # noqa: E402
from jobs.atomic import replace_file, write_text  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.errors import UserError  # noqa: E402
from pretrain.evaluate import knn_eval  # noqa: E402
from pretrain.train import Trainer  # noqa: E402

RECIPE = REPO / "configs" / "pretrain" / "resnet18_cifar_cpu.yaml"
METHODS = {
    "m2t": ["model.method=m2t"],
    "byol": ["model.method=byol"],
    "eman": ["model.method=eman"],
    "projector_only": ["model.method=projector_only"],
    "m2t+residual": ["model.method=m2t", "model.residual=true"],
}


def knn_bank(train: str, per_class: int, out: Path) -> str:
    """A class-balanced subset of ``train`` (symlinks) as the kNN memory bank; 0 = all."""
    if per_class <= 0:
        return train
    bank = out / f"knn_bank_{per_class}"
    if not bank.exists():
        for cls in sorted(p for p in Path(train).iterdir() if p.is_dir()):
            (bank / cls.name).mkdir(parents=True)
            for img in sorted(cls.iterdir())[:per_class]:
                (bank / cls.name / img.name).symlink_to(img.resolve())
    return str(bank)


def cell_key(row: dict[str, Any]) -> tuple:
    return row["method"], row["batch"], row["seed"], row["images_budget"]


def cell_config(method: str, batch: int, seed: int, steps: int, args: argparse.Namespace):
    return load_config(args.config, [*METHODS[method], f"data.batch_size={batch}",
                                     f"train.steps={steps}", f"train.seed={seed}",
                                     f"train.device={args.device}",
                                     f"train.log_every={max(steps // 20, 1)}", *args.set])


def images_for(minutes: float, method: str, batch: int, args: argparse.Namespace) -> int:
    """Images one cell can see in ``minutes`` of training, from 20 timed steps (after 5)."""
    cfg = cell_config(method, batch, 0, 10**6, args)
    trainer = Trainer(cfg, args.train, Path(args.runs) / f"calibrate_{method}_{batch}")
    trainer.stop_after = 5
    trainer.run()
    start = time.perf_counter()
    trainer.stop_after = 20
    trainer.run()
    rate = 20 * batch / (time.perf_counter() - start)
    images = int(rate * minutes * 60 // batch * batch)
    print(f"calibration: {method}, batch {batch}: {rate:.0f} images/s → {images:,} images in "
          f"{minutes:g} min", flush=True)
    return images


def run_cell(method: str, batch: int, seed: int, args: argparse.Namespace,
             emit: Any) -> None:
    """Train one cell, scoring it at ``args.points`` + 1 evenly spaced points (0 included)."""
    steps = max(1, round(args.images / batch))
    cfg = cell_config(method, batch, seed, steps, args)
    run_dir = Path(args.runs) / f"{method}_b{batch}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished cell starts again
    trainer = Trainer(cfg, args.train, run_dir)
    marks = sorted({round(steps * i / args.points) for i in range(args.points + 1)})
    trained = 0.0
    for mark in marks:
        if mark > trainer.step:
            trainer.stop_after = mark - trainer.step
            start = time.perf_counter()
            trainer.run()
            trained += time.perf_counter() - start
        row = {"method": method, "batch": batch, "seed": seed, "images_budget": args.images,
               "steps_total": steps, "step": trainer.step,
               "images_seen": trainer.step * batch, "train_seconds": round(trained, 1)}
        for branch in ("teacher", "student"):
            backbone = trainer.model.export_backbone(branch)
            row[f"knn_{branch}"] = knn_eval(backbone, args.bank, args.val,
                                            cfg.data.image_size, device=args.device,
                                            workers=args.eval_workers)["knn_top1"]
        row["gap"] = last_gap(run_dir)
        row.update(final=mark == steps, arch=f"{cfg.model.arch}/{cfg.model.stem}/w{cfg.model.width}",
                   image_size=cfg.data.image_size, optim=f"{cfg.optim.name} {cfg.optim.base_lr}",
                   threads=torch.get_num_threads(), load1=round(os.getloadavg()[0], 1))
        emit(row)
    shutil.rmtree(run_dir, ignore_errors=True)


def last_gap(run_dir: Path) -> float | None:
    """The student–teacher gap of the run's last logged step (None before the first log)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    gap = None
    with open(path, encoding="utf-8") as lines:  # line by line: a long run's file is large
        for line in lines:
            if '"gap"' in line:
                gap = json.loads(line)["gap"]
    return gap


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


def finished(rows: list[dict]) -> list[dict]:
    """Rows of cells whose final point was measured (a killed cell's rows are left out)."""
    done = {cell_key(r) for r in rows if r.get("final")}
    return [r for r in rows if cell_key(r) in done]


def write_report(rows: list[dict], out: Path, command: str, info: dict) -> Path:
    rows = finished(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["batch"], r["images_budget"]), []).append(r)
    lines = ["# Does pretraining learn? kNN top-1 (%) on the validation images", "",
             "kNN: k = 20, cosine, T = 0.07; memory bank: a class-balanced subset of the "
             "training images; queries: every validation image. Images seen = steps × batch; "
             "training seconds exclude the kNN evaluations. The row at 0 images is each seed's "
             "network as initialised (the random-network floor). Mean ± std over seeds.", "",
             "Commands (each resumes: finished cells are skipped):", "",
             *[f"    {c}" for c in dict.fromkeys(r.get("command", command) for r in rows)], "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
             f"device {rows[-1].get('device', 'cpu') if rows else 'cpu'}, "
             f"{'/'.join(sorted({str(r['threads']) for r in rows}))} torch threads, load "
             f"average {min((r['load1'] for r in rows), default=0)}–"
             f"{max((r['load1'] for r in rows), default=0)} at the scored points.", ""]
    if rows:
        r0 = rows[0]
        lines += [f"Recipe: {r0['arch']}, {r0['image_size']} px, {r0['optim']} (base LR per "
                  f"256 images).", ""]
    lines += ["## Final points (with several batches: the small-batch study)", "",
              "| method | batch/process | images seen | seeds | floor (step 0) | teacher kNN "
              "| student kNN | teacher − floor | student–teacher gap | train min |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for (method, batch, _budget), rs in sorted(groups.items()):
        seeds = sorted({r["seed"] for r in rs})
        first = [min((r for r in rs if r["seed"] == s), key=lambda r: r["step"]) for s in seeds]
        last = [max((r for r in rs if r["seed"] == s), key=lambda r: r["step"]) for s in seeds]
        gain = [b["knn_teacher"] - a["knn_teacher"] for a, b in zip(first, last, strict=True)]
        gaps = [r["gap"] for r in last if r.get("gap") is not None]
        lines.append(f"| {method} | {batch} | {last[0]['images_seen']:,} | {len(seeds)} | "
                     f"{_pm([r['knn_teacher'] for r in first])} | "
                     f"{_pm([r['knn_teacher'] for r in last])} | "
                     f"{_pm([r['knn_student'] for r in last])} | {_pm(gain)} | "
                     f"{_pm(gaps, '.3f')} | {_pm([r['train_seconds'] / 60 for r in last])} |")
    lines += paired_lines(rows)
    lines += ["", "## The curves", "",
              "| method | batch | images seen | train min | teacher kNN | student kNN |",
              "|---|---|---|---|---|---|"]
    for (method, batch, _), rs in sorted(groups.items()):
        for step in sorted({r["step"] for r in rs}):
            at = [r for r in rs if r["step"] == step]
            lines.append(f"| {method} | {batch} | {at[0]['images_seen']:,} | "
                         f"{_pm([r['train_seconds'] / 60 for r in at])} | "
                         f"{_pm([r['knn_teacher'] for r in at])} | "
                         f"{_pm([r['knn_student'] for r in at])} |")
    md = out / "learning_curve.md"
    write_text(md, "\n".join(lines) + "\n")
    plot(groups, out / "learning_curve.png")
    return md


def paired_differences(rows: list[dict], a: str = "m2t", b: str = "byol") -> list[dict]:
    """Final kNN of method ``a`` minus method ``b``, seed by seed, at each (batch, budget).

    Only seeds where both cells finished count: both methods start from the same network for
    a given seed, so the paired difference is free of the seed's floor.
    """
    final = {(r["method"], r["batch"], r["images_budget"], r["seed"]): r
             for r in finished(rows) if r.get("final")}
    out = []
    for batch, budget in sorted({(k[1], k[2]) for k in final}):
        seeds = sorted(k[3] for k in final if k[:3] == (a, batch, budget)
                       and (b, batch, budget, k[3]) in final)
        if not seeds:
            continue
        diff = {branch: [final[(a, batch, budget, s)][f"knn_{branch}"]
                         - final[(b, batch, budget, s)][f"knn_{branch}"] for s in seeds]
                for branch in ("teacher", "student")}
        out.append({"batch": batch, "images_seen": final[(a, batch, budget, seeds[0])]["images_seen"],
                    "seeds": seeds, **diff})
    return out


def paired_lines(rows: list[dict]) -> list[str]:
    pairs = paired_differences(rows)
    if not pairs:
        return []
    lines = ["", "## m2t − byol, paired by seed (the paper: byol degrades at small batch, m2t "
             "does not)", "",
             "| batch/process | images seen | seeds | teacher: m2t − byol | student: m2t − byol "
             "| teacher, per seed |", "|---|---|---|---|---|---|"]
    def signed(values: list[float]) -> str:
        mean, std = _mean_std(values)
        return f"{mean:+.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:+.1f}"

    for p in pairs:
        each = ", ".join(f"{d:+.1f}" for d in p["teacher"])
        lines.append(f"| {p['batch']} | {p['images_seen']:,} | {len(p['seeds'])} | "
                     f"{signed(p['teacher'])} | {signed(p['student'])} | {each} |")
    return lines


def plot(groups: dict[tuple, list[dict]], png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not groups:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (method, batch, _), rs in sorted(groups.items()):
        steps = sorted({r["step"] for r in rs})
        mean = [statistics.mean(r["knn_teacher"] for r in rs if r["step"] == s) for s in steps]
        std = [_mean_std([r["knn_teacher"] for r in rs if r["step"] == s])[1] for s in steps]
        images = [next(r["images_seen"] for r in rs if r["step"] == s) for s in steps]
        minutes = [statistics.mean(r["train_seconds"] / 60 for r in rs if r["step"] == s)
                   for s in steps]
        label = f"{method}, batch {batch} (teacher)"
        for ax, x in zip(axes, (images, minutes), strict=True):
            line = ax.errorbar(x, mean, yerr=std, marker="o", ms=3, capsize=2, label=label)
            student = [statistics.mean(r["knn_student"] for r in rs if r["step"] == s)
                       for s in steps]
            ax.plot(x, student, ls=":", color=line[0].get_color(), alpha=0.7)
    for ax, name in zip(axes, ("images seen", "training minutes"), strict=True):
        ax.set_xlabel(name)
        ax.set_ylabel("kNN top-1 (%)  (dotted: student)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("kNN top-1 on the validation images; step 0 = the random-network floor")
    fig.tight_layout()
    replace_file(png, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


def read_rows(raw: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(raw.read_text().splitlines() if raw.exists() else [], 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: that cell runs again
            print(f"{raw}:{n}: not a JSON result line, ignored", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="ImageFolder to pretrain on")
    p.add_argument("--val", required=True, help="labelled ImageFolder the kNN scores")
    p.add_argument("--bank", help="labelled ImageFolder for the kNN memory bank "
                                  "(default: a class-balanced subset of --train)")
    p.add_argument("--bank-per-class", type=int, default=100)
    p.add_argument("--config", default=str(RECIPE))
    p.add_argument("--methods", nargs="+", default=["m2t", "byol"], choices=list(METHODS))
    p.add_argument("--batches", type=int, nargs="+", default=[256])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--images", type=int, default=100_000, help="images seen per cell")
    p.add_argument("--minutes", type=float, help="instead of --images: as many images as "
                   "the first method at the largest batch trains in this many minutes here "
                   "(measured before the first cell)")
    p.add_argument("--points", type=int, default=8, help="kNN points after step 0")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides, key=value")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-workers", type=int, default=0,
                   help="loader processes for the kNN features (0: decode in this process, "
                        "quickest for CIFAR-size images)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny budget, for the test suite")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    for flag in ("train", "val"):
        if not Path(getattr(args, flag)).is_dir():
            p.error(f"--{flag} {getattr(args, flag)}: not a folder of class sub-folders")
    if args.quick:
        args.images, args.points, args.bank_per_class = 2 * max(args.batches), 2, 5
    try:  # a bad --config or --set is one line now, not a traceback after the first cell
        for method in args.methods:
            cell_config(method, max(args.batches), args.seeds[0], 1, args)
    except UserError as exc:
        p.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="m2t_curve_"))
    args.runs = scratch
    args.bank = args.bank or knn_bank(args.train, args.bank_per_class, scratch)
    if args.minutes and not args.report_only:
        args.images = images_for(args.minutes, args.methods[0], max(args.batches), args)
    raw = out / "learning_curve.jsonl"
    rows = read_rows(raw)
    command = "python benchmarks/learning_curve.py " + " ".join(argv or sys.argv[1:])
    info = machine(args.device)
    done = {cell_key(r) for r in finished(rows)}

    def emit(row: dict) -> None:
        row.update(device=args.device, command=command)
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(raw, "a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        if not args.report_only:
            for seed in args.seeds:
                for batch in args.batches:
                    for method in args.methods:
                        if (method, batch, seed, args.images) in done:
                            continue
                        stale = (method, batch, seed, args.images)
                        if any(cell_key(r) == stale for r in rows):  # a killed cell's points
                            rows[:] = [r for r in rows if cell_key(r) != stale]
                            write_text(raw, "".join(json.dumps(r) + "\n" for r in rows))
                        run_cell(method, batch, seed, args, emit)
                        write_report(rows, out, command, info)
        md = write_report(rows, out, command, info)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
