"""Detectron2 training-iteration time: our transfer protocol against Detectron2's stock config.

    .venv/bin/python benchmarks/transfer_iteration.py            # CPU, a few minutes
    .venv/bin/python benchmarks/transfer_iteration.py --device cuda

Three Mask R-CNN R18-FPN models at demo size (128 px, batch 8, 3 classes), built with
``detectron2.modeling.build_model`` and timed interleaved in one process on the same
synthetic batch (random boxes with rectangle masks; no dataset needed). One iteration =
forward with losses, backward, SGD step, as ``SimpleTrainer.run_step`` does.

- **ours**: ``configs/transfer/demo_mask_rcnn_R_18_FPN_shapes.yaml`` through
  ``transfer.config.load_config`` (SyncBN → BN on one process in backbone, FPN and heads,
  ``FREEZE_AT 0``, RGB / mean / std block, box head 2 conv + 1 fc);
- **stock**: Detectron2's model-zoo ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml``
  with the same size overrides (depth 18, res2 64 channels, FPN 128 channels, anchors, RPN and
  ROI sampling sizes, head widths and mask-head depth, input size, classes), so that only the
  protocol differs: FrozenBN backbone with ``FREEZE_AT 2``, no norm in FPN and heads, the
  2-fc box head, BGR;
- **stock + our norms**: the stock config with only our norm and freezing settings (BN in
  backbone, FPN and heads, ``FREEZE_AT 0``);
- **stock + our box head**: the stock config with only our box head (convolutions + 1 fc,
  BN); the last two separate the cost of training every BN from that of the head's shape.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._harness import (  # noqa: E402
    fmt_ms,
    interleave,
    machine,
    md_table,
    median,
    paired_ratio,
    spread,
    write_results,
)

DEMO_CONFIG = "demo_mask_rcnn_R_18_FPN_shapes"
STOCK_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
# The demo config's size settings, applied to the stock config (keys that describe the size
# of the model and of its inputs, not the protocol).
SIZE_KEYS = [
    "MODEL.RESNETS.DEPTH", "MODEL.RESNETS.RES2_OUT_CHANNELS", "MODEL.FPN.OUT_CHANNELS",
    "MODEL.ANCHOR_GENERATOR.SIZES", "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "MODEL.RPN.PRE_NMS_TOPK_TEST", "MODEL.RPN.POST_NMS_TOPK_TEST",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "MODEL.ROI_HEADS.NUM_CLASSES",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "MODEL.ROI_BOX_HEAD.CONV_DIM",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "MODEL.ROI_MASK_HEAD.NUM_CONV", "MODEL.ROI_MASK_HEAD.CONV_DIM",
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST",
]
# Our protocol's norm and freezing settings, for the third model.
NORM_KEYS = ["MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM", "MODEL.BACKBONE.FREEZE_AT"]
# Our box head's shape (the protocol's "4conv1fc", 2 convolutions at demo size), with its norm.
BOX_HEAD_KEYS = ["MODEL.ROI_BOX_HEAD.NUM_CONV", "MODEL.ROI_BOX_HEAD.NUM_FC",
                 "MODEL.ROI_BOX_HEAD.NORM"]


def configs(device: str):
    """(ours, stock, stock + our norms) Detectron2 configs."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    from transfer.config import get_key, load_config, set_key

    ours = load_config(DEMO_CONFIG, ["MODEL.DEVICE", device])
    stock = get_cfg()
    stock.merge_from_file(model_zoo.get_config_file(STOCK_CONFIG))
    for key in SIZE_KEYS:
        set_key(stock, key, get_key(ours, key))
    stock.MODEL.DEVICE = device
    stock.MODEL.WEIGHTS = ""
    norms, head = stock.clone(), stock.clone()
    for key in NORM_KEYS:
        set_key(norms, key, get_key(ours, key))
    for key in BOX_HEAD_KEYS:
        set_key(head, key, get_key(ours, key))
    return {"ours (demo_mask_rcnn_R_18_FPN_shapes)": ours, "stock model zoo, same sizes": stock,
            "stock + our norms and FREEZE_AT 0": norms,
            "stock + our box head (conv + 1 fc, BN)": head}


def differences(a, b) -> list[str]:
    from transfer.config import iter_keys

    left, right = dict(iter_keys(a)), dict(iter_keys(b))
    skip = ("DATASETS.", "SOLVER.", "TEST.", "OUTPUT_DIR", "TRANSFER.", "DATALOADER.", "SEED",
            "VERSION", "MODEL.FCOS", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "MODEL.WEIGHTS")
    return [f"`{k}`: {left.get(k)!r} vs {right.get(k)!r}"
            for k in sorted(set(left) | set(right))
            if not k.startswith(skip) and left.get(k) != right.get(k)]


def synthetic_batch(n: int, size: int, num_classes: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` images of ``size``² with 3 random boxes each and rectangle masks."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        boxes, masks = [], torch.zeros(3, size, size, dtype=torch.bool)
        for j in range(3):
            w, h = (int(v) for v in torch.randint(size // 8, size // 2, (2,), generator=g))
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            boxes.append([x0, y0, x0 + w, y0 + h])
            masks[j, y0:y0 + h, x0:x0 + w] = True
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.randint(0, num_classes, (3,), generator=g)
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def iteration(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: list[dict]):
    def run() -> None:
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on the CPU, see pretrain_speed.py)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    warnings.filterwarnings("ignore")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    from detectron2.modeling import build_model

    load_before = os.getloadavg()
    cfgs = configs(args.device)
    ours_cfg = next(iter(cfgs.values()))
    size = ours_cfg.INPUT.MAX_SIZE_TRAIN
    batch = synthetic_batch(args.batch, size, ours_cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    fns, params = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        params[name] = (sum(p.numel() for p in model.parameters()),
                        sum(p.numel() for p in trainable))
        optimizer = torch.optim.SGD(trainable, lr=1e-4, momentum=0.9, weight_decay=1e-4)
        fns[name] = iteration(model, optimizer, batch)
    print(f"Mask R-CNN R18-FPN, {args.batch} images of {size} px per iteration on {args.device}",
          flush=True)
    from detectron2.utils.events import EventStorage

    with EventStorage(0):  # the models log training statistics to it, as under a trainer
        times = interleave(fns, rounds=args.rounds, warmup=2, device=args.device)
    ref = times[next(iter(cfgs))]
    stock = times["stock model zoo, same sizes"]
    rows = []
    for name, ts in times.items():
        rows.append({"name": name, "iteration_s": median(ts), "iqr_rel": spread(ts),
                     "vs_stock": paired_ratio(ts, stock), "vs_ours": paired_ratio(ts, ref),
                     "params": params[name][0], "trainable": params[name][1], "times_s": ts})
    table = md_table(
        ["model", "median iteration (ms)", "IQR/median", "time / stock", "images/s",
         "parameters (trainable)"],
        [[r["name"], fmt_ms(r["iteration_s"]), f"{r['iqr_rel']:.2f}", f"{r['vs_stock']:.3f}",
          f"{args.batch / r['iteration_s']:.1f}",
          f"{r['params'] / 1e6:.2f} M ({r['trainable'] / 1e6:.2f} M)"] for r in rows])
    diff = differences(ours_cfg, cfgs["stock model zoo, same sizes"])
    body = "\n".join([
        f"Mask R-CNN R18-FPN, batch {args.batch} × {size} px synthetic images (3 boxes with "
        f"masks each), forward + backward + SGD step, torch threads {torch.get_num_threads()}.",
        "", table, "",
        "Model settings that differ between ours and the stock config (ours vs stock; solver, "
        "data and test keys left out):", "",
        *[f"- {d}" for d in diff],
    ])
    print("\n" + table)
    path = write_results("transfer_iteration", "Detectron2 iteration: our protocol vs stock",
                         body, {"rows": rows, "differences": diff}, machine(args.device),
                         load_before, args.out)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
