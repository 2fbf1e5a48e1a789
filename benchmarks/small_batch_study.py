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
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.config import load_config  # noqa: E402
from pretrain.evaluate import knn_eval, random_backbone  # noqa: E402
from pretrain.train import Trainer  # noqa: E402

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
               "train_seconds": round(seconds, 1)}
        for branch in ("teacher", "student"):
            backbone = trainer.model.export_backbone(branch)
            row[f"knn_{branch}"] = knn_eval(backbone, args.bank, args.val, args.image_size,
                                            device=args.device)["knn_top1"]
        with open(Path(tmp) / "run" / "metrics.jsonl") as f:
            last = [json.loads(x) for x in f if '"gap"' in x][-1]
        row["gap"] = last["gap"]
    return row


def summarise(rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["batch"]), []).append(r)
    out = []
    for (method, batch), rs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        s = {"method": method, "batch": batch, "seeds": len(rs)}
        for key in ("knn_teacher", "knn_student", "gap"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                s[key] = statistics.mean(vals)
                s[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(s)
    return out


def write_report(rows: list[dict], out_dir: Path, command: str) -> Path:
    summary = summarise(rows)
    lines = ["# Small-batch study: kNN top-1 (%) on cifar10_mini val, ResNet-18", "",
             "kNN: k = 20, cosine, T = 0.07, memory bank = a class-balanced subset of the "
             "training images, queries = all validation images.", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"device {rows[0].get('device', 'cpu') if rows else 'cpu'}", "",
             "| method | batch/process | seeds | teacher kNN | student kNN | student–teacher gap |",
             "|---|---|---|---|---|---|"]

    def cell(s: dict, key: str) -> str:
        if key not in s:
            return "–"
        return f"{s[key]:.2f} ± {s[key + '_std']:.2f}" if s["seeds"] > 1 else f"{s[key]:.2f}"

    for s in summary:
        batch = s["batch"] or "–"
        lines.append(f"| {s['method']} | {batch} | {s['seeds']} | {cell(s, 'knn_teacher')} | "
                     f"{cell(s, 'knn_student')} | {cell(s, 'gap')} |")
    md = out_dir / "small_batch_study.md"
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = [s["method"] for s in summary if s["batch"] == summary[0]["batch"]]
        batches = sorted({s["batch"] for s in summary})
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / max(len(batches), 1)
        for i, b in enumerate(batches):
            vals = {s["method"]: s for s in summary if s["batch"] == b}
            xs = [j + i * width for j in range(len(methods))]
            ax.bar(xs, [vals.get(m, {}).get("knn_teacher", 0) for m in methods], width,
                   yerr=[vals.get(m, {}).get("knn_teacher_std", 0) for m in methods],
                   label=f"teacher, batch {b}")
        ax.set_xticks([j + width * (len(batches) - 1) / 2 for j in range(len(methods))])
        ax.set_xticklabels(methods, rotation=15)
        ax.set_ylabel("kNN top-1 (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "small_batch_study.png", dpi=120)
    except ImportError:
        pass
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.bank = knn_bank(args.train, args.knn_bank_per_class, Path(tempfile.mkdtemp()))
    raw = out / "small_batch_study.jsonl"
    rows = [json.loads(x) for x in raw.read_text().splitlines()] if raw.exists() else []
    done = {(r["method"], r["batch"], r["seed"]) for r in rows}
    command = "python benchmarks/small_batch_study.py " + " ".join(sys.argv[1:])
    if not args.report_only:
        if ("random", 0, 0) not in done:
            row = {"method": "random init", "batch": 0, "seed": 0, "steps": 0}
            for branch in ("teacher", "student"):
                row[f"knn_{branch}"] = knn_eval(random_backbone("resnet18"), args.bank,
                                                args.val, args.image_size)["knn_top1"]
            rows.append({**row, "method": "random"})
            with open(raw, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        for seed in args.seeds:
            for batch in args.batches:
                for method in args.methods:
                    if (method, batch, seed) in done:
                        continue
                    row = run_cell(method, batch, seed, args)
                    row["device"] = args.device
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
