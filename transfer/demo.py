"""``make demo``: the whole pipeline on embedded data, with the real commands, in minutes.

1. data      generated shapes with instance masks (COCO format) for fine-tuning; the real
             CIFAR-10 slice in ../shared/data for pretraining when present, else the shapes
2. pretrain  m2t-pretrain: Momentum² Teacher, ResNet-18, small images
3. convert   m2t-convert --verify: teacher backbone → Detectron2 .pkl; the same for a randomly
             initialised ResNet-18 (the baseline goes through the identical path)
4. transfer  m2t-transfer train: Mask R-CNN R18-FPN on the shapes, from each initialisation,
             with the same budget; each run evaluates itself (COCO box and mask AP)
5. report    m2t-transfer report: the runs side by side (Markdown + PNG)

Every command is printed before it runs, so it can be copied. The demo ends with the AP table
and, read back from the files each stage wrote, what each stage showed: the pretraining's
schedule and loss (``metrics.jsonl``), the conversion's feature difference inside Detectron2
(the ``--verify`` lines of its log), each fine-tuning's AP and the evaluator that scored it
(``results.json``). The two initialisations are a smoke run of the pipeline, not a ranking of
methods. ``--quick`` shrinks every stage to seconds (used by the tests). Only the output
directory is overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jobs.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = Path(os.environ.get("MOMENTUM2_DATA", REPO.parent / "shared" / "data")) / "cifar10_mini"

# (full demo, --quick) settings
SETTINGS = {
    "full": {"shapes_train": 300, "shapes_val": 50, "shapes_size": 64,
             "pretrain": ["train.steps=60", "data.batch_size=32", "data.image_size=32",
                          "optim.warmup_epochs=0.05"],
             "transfer": ["SOLVER.MAX_ITER", "80", "SOLVER.STEPS", "(60,)",
                          "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "10",
                          "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
                          "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
                          "TEST.PRECISE_BN.NUM_ITER", "4"]},
    "quick": {"shapes_train": 8, "shapes_val": 4, "shapes_size": 64,
              "pretrain": ["train.steps=2", "data.batch_size=8", "data.image_size=32",
                           "data.workers=0", "train.log_every=1"],
              "transfer": ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.IMS_PER_BATCH",
                           "2", "SOLVER.WARMUP_ITERS", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                           "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
                           "INPUT.MAX_SIZE_TEST", "64", "TEST.PRECISE_BN.ENABLED", "False",
                           "DATALOADER.NUM_WORKERS", "0",
                           # after 2 iterations the scores sit near the 0.05 test threshold;
                           # keep every detection so that a smoke run always scores something
                           "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]},
}


def run(cmd: list[str], log: Path) -> None:
    """Print ``cmd`` as a copyable shell line, run it, tee its output to ``log``."""
    shown = " ".join(shlex.quote(c) for c in cmd)
    shown = shown.replace(str(Path(sys.executable).parent) + "/", "").replace(str(REPO) + "/", "")
    print(f"\n$ {shown}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if _worth_showing(line):
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"error: this step failed (exit {code}); its output is in {log}")
    print(f"  [{time.perf_counter() - start:.0f} s, log: {log}]", flush=True)


def _worth_showing(line: str) -> bool:
    """Progress and results, not Detectron2's long set-up chatter."""
    keys = ("step ", "kNN", "checkpoint:", "wrote:", "verify:", "detected:", "iter:",
            "copypaste: AP", "| bbox", "| segm", "| task", "train_json", "error")
    return line.startswith(keys) or any(k in line for k in ("eta: ", "verification", "| bbox"))


def bin_(module: str) -> list[str]:
    """The console script of ``module`` next to this Python (``python -m`` if not installed)."""
    script = Path(sys.executable).parent / {"pretrain": "m2t-pretrain", "convert": "m2t-convert",
                                            "transfer": "m2t-transfer"}[module]
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_output", help="output directory (overwritten)")
    p.add_argument("--quick", action="store_true", help="seconds-long version (tests)")
    a = p.parse_args(argv)
    s = SETTINGS["quick" if a.quick else "full"]
    out = Path(a.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "logs").mkdir(parents=True)
    logs = out / "logs"
    t0 = time.perf_counter()
    py = sys.executable

    # 1. data
    shapes = out / "data" / "shapes"
    run([py, "-m", "transfer.shapes", str(shapes), "--train", str(s["shapes_train"]),
         "--val", str(s["shapes_val"]), "--size", str(s["shapes_size"])], logs / "1_data.log")
    if (SHARED_CIFAR / "train").is_dir():
        pretrain_data, what = SHARED_CIFAR / "train", "CIFAR-10 slice (real images)"
    else:  # the shapes themselves, as a one-class ImageFolder
        pretrain_data, what = out / "data" / "shapes_imagefolder", "generated shapes"
        (pretrain_data / "shapes").mkdir(parents=True)
        for img in (shapes / "train").iterdir():
            os.symlink(img, pretrain_data / "shapes" / img.name)
    print(f"  pretraining data: {pretrain_data} ({what})")

    # 2. pretrain
    run([*bin_("pretrain"), "train", "--config", "resnet18_cifar", "--data", str(pretrain_data),
         "--out", str(out / "pretrain"), *s["pretrain"]], logs / "2_pretrain.log")

    # 3. convert: the teacher, and a random initialisation of the same network
    m2t_pkl, random_pkl = out / "weights" / "m2t_r18.pkl", out / "weights" / "random_r18.pkl"
    m2t_pkl.parent.mkdir()
    run([*bin_("convert"), str(out / "pretrain" / "last.pth"), str(m2t_pkl), "--verify"],
        logs / "3_convert.log")
    random_pth = out / "weights" / "random_r18_torchvision.pth"
    subprocess.run([py, "-c", "import torch, torchvision; torch.manual_seed(0); "
                    f"torch.save(torchvision.models.resnet18().state_dict(), {str(random_pth)!r})"],
                   check=True)
    run([*bin_("convert"), str(random_pth), str(random_pkl)], logs / "3_convert_random.log")

    # 4. transfer, same budget from each initialisation
    data_args = ["--train-dataset", str(shapes / "annotations" / "instances_train.json"),
                 "--train-images", str(shapes / "train"),
                 "--test-dataset", str(shapes / "annotations" / "instances_val.json"),
                 "--test-images", str(shapes / "val")]
    runs = []
    for method, weights in (("m2t", m2t_pkl), ("random_init", random_pkl)):
        run_dir = out / "transfer" / method
        run([*bin_("transfer"), "train", "--config", "demo_mask_rcnn_R_18_FPN_shapes",
             "--weights", str(weights), "--method", method, "--output-dir", str(run_dir),
             *data_args, *s["transfer"]], logs / f"4_transfer_{method}.log")
        runs.append(run_dir)

    # 5. report
    run([*bin_("transfer"), "report", *map(str, runs), "--output-dir", str(out / "report")],
        logs / "5_report.log")

    table = ["| initialisation | box AP | box AP50 | mask AP | mask AP50 |", "|---|---:|---:|---:|---:|"]
    for run_dir in runs:
        r = json.loads((run_dir / "results.json").read_text())

        def f(task: str, key: str, r: dict = r) -> str:
            v = r.get(task, {}).get(key)
            return "–" if v is None else f"{v:.1f}"

        table.append(f"| {r.get('method')} | {f('bbox', 'AP')} | {f('bbox', 'AP50')} | "
                     f"{f('segm', 'AP')} | {f('segm', 'AP50')} |")
    minutes = (time.perf_counter() - t0) / 60
    text = "\n".join(table)
    proved = stage_lines(out, runs)
    write_text(out / "summary.md", text + "\n\n" + "\n".join(proved) + "\n")
    print(f"\nDemo finished in {minutes:.1f} min. Fine-tuning Mask R-CNN R18-FPN on generated shapes "
          f"({s['shapes_train']} train / {s['shapes_val']} val images), same budget:\n")
    print(text)
    print(f"\nreport: {out / 'report' / 'report.md'}\nplot:   {out / 'report' / 'report.png'}")
    print("\n" + "\n".join(proved))
    return 0


# --- what each stage proved, read back from the files the stage wrote --------------------------

#: The header ``m2t-pretrain train`` prints first (pretrain/hooks.py, ProgressLog).
_PRETRAIN_HEADER = re.compile(r"^momentum2 pretrain: (?P<method>\S+) (?P<arch>\S+), "
                              r"(?P<images>\d+) images, (?P<per_epoch>\d+) steps/epoch, "
                              r"(?P<steps>\d+) steps, batch (?P<batch>\d+)×(?P<world>\d+), "
                              r"lr (?P<lr>\S+), device", re.M)
#: What ``m2t-convert --verify`` prints (convert/verify.py, VerifyReport.lines).
_CONVERT_LOADED = re.compile(r"DetectionCheckpointer loaded (?P<loaded>\d+)/(?P<total>\d+) "
                             r"backbone tensors")
_CONVERT_DIFF = re.compile(r"max \|torchvision layer1\.\.4 - Detectron2 res2\.\.5\| = "
                           r"(?P<diff>\S+) \(tolerance (?P<tolerance>[^;]+);")
_CONVERT_VERDICT = re.compile(r"verification (?P<verdict>passed|FAILED)")
#: The evaluators ``results.json`` names (transfer/scoring.py).
EVALUATOR_TEXT = {"fast": "faster-coco-eval's C++ COCOeval",
                  "official": "pycocotools' COCOeval / the lvis package's LVISEval"}


def pretrain_facts(run: Path, log: Path) -> dict:
    """The pretraining's schedule (its header line and ``config.yaml``) and its loss at the
    first and the last step ``metrics.jsonl`` recorded."""
    import yaml

    header = _PRETRAIN_HEADER.search(log.read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    first = last = None
    with open(run / "metrics.jsonl", encoding="utf-8") as lines:  # line by line: any length
        for line in lines:
            if '"loss"' in line:
                record = json.loads(line)
                if "loss" in record:
                    first, last = first or record, record
    return {"header": header.groupdict() if header else None, "config": config,
            "first": first, "last": last}


def convert_facts(log: Path) -> dict:
    """What ``m2t-convert --verify`` reported in ``log``: tensors loaded by Detectron2, the
    largest feature difference against torchvision, and the verdict (None where absent)."""
    text = log.read_text()
    found: dict = {}
    for pattern in (_CONVERT_LOADED, _CONVERT_DIFF, _CONVERT_VERDICT):
        m = pattern.search(text)
        found.update(m.groupdict() if m else dict.fromkeys(pattern.groupindex))
    return found


def stage_lines(out: Path, runs: list[Path]) -> list[str]:
    """One line per stage saying what it showed, from the files the stage wrote."""
    lines = ["What each stage showed (read back from the files it wrote):"]
    p = pretrain_facts(out / "pretrain", out / "logs" / "2_pretrain.log")
    h, cfg, first, last = p["header"], p["config"], p["first"], p["last"]
    if h and first and last:
        lines += [
            f"  pretrain  {h['method']} {h['arch']}, {h['steps']} steps of batch {h['batch']}×"
            f"{h['world']} at {cfg['data']['image_size']} px ({h['images']} images, "
            f"{h['per_epoch']} steps/epoch)   [logs/2_pretrain.log, pretrain/config.yaml]",
            f"            LR {h['lr']}: linear warm-up over optim.warmup_epochs="
            f"{cfg['optim']['warmup_epochs']}, then cosine; lr {first['lr']:.4g} at step "
            f"{first['step']}, {last['lr']:.4g} at step {last['step']}",
            f"            loss {first['loss']:.4f} at step {first['step']} → {last['loss']:.4f} "
            f"at step {last['step']}   [pretrain/metrics.jsonl]"]
    else:
        lines.append("  pretrain  no header or loss found in logs/2_pretrain.log and "
                     "pretrain/metrics.jsonl")
    c = convert_facts(out / "logs" / "3_convert.log")
    if c["diff"] is not None:
        lines += [
            f"  convert   Detectron2's DetectionCheckpointer loaded {c['loaded']}/{c['total']} "
            f"backbone tensors of the teacher   [logs/3_convert.log]",
            f"            feature difference inside Detectron2, max |torchvision layer1..4 - "
            f"Detectron2 res2..5| = {c['diff']} (tolerance {c['tolerance']}): verification "
            f"{c['verdict']}"]
    else:
        lines.append("  convert   no verification result found in logs/3_convert.log")
    for run_dir in runs:
        r = json.loads((run_dir / "results.json").read_text())

        def ap(task: str, r: dict = r) -> str:
            v = r.get(task, {}).get("AP")
            return "–" if v is None else f"{v:.1f}"

        evaluator = r.get("evaluator", "?")
        lines.append(
            f"  transfer  {r.get('method')}: box AP {ap('bbox')}, mask AP {ap('segm')} after "
            f"{r.get('iterations')} iterations of {r.get('total_batch')} images, scored by the "
            f"{evaluator} evaluator ({EVALUATOR_TEXT.get(evaluator, 'unknown')})   "
            f"[transfer/{run_dir.name}/results.json]")
    lines.append("The two initialisations are a smoke run of the pipeline, not a ranking of "
                 "methods: minutes of CPU pretraining on 32 px images are far from the paper's "
                 "regime (docs/getting-started.md#what-the-demo-shows).")
    return lines


if __name__ == "__main__":
    sys.exit(main())
