"""End-to-end transfer on a CPU: does fine-tuning through ``m2t-transfer`` actually learn?

Generates the three-class shapes dataset (``transfer.shapes``), converts torchvision
ResNet-18 backbones with ``convert``, fine-tunes Mask R-CNN R18-FPN (FPN 128 channels,
128 px, batch 8, LR 0.005: the calibrated small recipe; few proposals for CPU speed) with ``transfer.train.run_training``
for each (backbone, seed), and writes the side-by-side ``report.md`` / ``report.png``.

    python benchmarks/transfer_shapes.py --out bench_transfer --iters 300 --seeds 0 1

On a 2-core CPU an iteration at batch 8 takes about 5 s (one thread); on a GPU well
under 0.1 s.

A backbone is a torchvision state dict (``--backbone NAME=PATH``, e.g. the export of
``m2t-pretrain``); without one, two differently seeded random initialisations are compared,
which shows the mechanics and the seed-to-seed spread but not the value of pretraining.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision

from convert import convert_checkpoint
from transfer.report import write_report
from transfer.shapes import make_shapes
from transfer.train import run_training

SMALL_RECIPE = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "128",
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "TEST.DETECTIONS_PER_IMAGE", "10",
    "SOLVER.WARMUP_ITERS", "50",
    "TEST.PRECISE_BN.NUM_ITER", "20", "DATALOADER.NUM_WORKERS", "0",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_transfer"))
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch", type=int, default=8,
                        help="images per iteration; LR 0.005 at 8, scaled linearly")
    parser.add_argument("--train-images", type=int, default=96)
    parser.add_argument("--backbone", action="append", default=[],
                        help="NAME=PATH of a torchvision ResNet-18 state dict (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = make_shapes(args.out / "data", n_train=args.train_images, n_val=24, size=128)
    train, val = data["train_json"], data["val_json"]
    backbones = dict(b.split("=", 1) for b in args.backbone)
    if not backbones:
        for name, init_seed in (("random_init_a", 0), ("random_init_b", 1)):
            torch.manual_seed(init_seed)
            path = args.out / "weights" / f"{name}.pth"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torchvision.models.resnet18().state_dict(), path)
            backbones[name] = str(path)

    runs = []
    steps = f"({int(args.iters * 0.75)},)"
    for name, source in backbones.items():
        pkl = args.out / "weights" / f"{name}.pkl"
        convert_checkpoint(source, str(pkl), force=True)
        for seed in args.seeds:
            run = args.out / "runs" / name / f"seed{seed}"
            start = time.time()
            results = run_training(
                "mask_rcnn_R_50_FPN_1x", str(pkl), output_dir=str(run), method=name,
                train_dataset=str(train), test_dataset=str(val),
                overrides=[*SMALL_RECIPE, "SOLVER.IMS_PER_BATCH", str(args.batch),
                           "SOLVER.BASE_LR", str(0.005 * args.batch / 8),
                           "SOLVER.MAX_ITER", str(args.iters),
                           "SOLVER.STEPS", steps, "SEED", str(seed)])
            print(json.dumps({"method": name, "seed": seed, "seconds": round(time.time() - start),
                              "bbox_AP": results["bbox"]["AP"], "segm_AP": results["segm"]["AP"]}))
            runs.append(run)
    md, png = write_report(runs, args.out)
    print(md.read_text())
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    main()
