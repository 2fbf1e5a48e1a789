"""Evaluate a pretrained backbone (SPEC §2): kNN and linear probing on frozen features.

Both read a run directory or checkpoint, rebuild the method from its saved config, take the
teacher's or the student's backbone, and append their results to the run's metrics.jsonl.
The linear probe trains on features extracted once with the evaluation transform (no
augmentation): a fast, deterministic variant of the usual protocol, fine for comparing runs.
Its features are the backbone's pooled output as the standard protocol feeds its head
(``normalize=True``: L2-normalised first, as the kNN's are). The standard protocol itself,
augmented and resumable, is :mod:`pretrain.linear`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint
from .config import config_from_dict
from .data.folder import (
    check_same_classes,
    collate_labelled,
    describe_unreadable,
    image_folder,
)
from .data.loader import Loader
from .data.views import eval_transform
from .errors import UserError, first_line
from .knn import extract_features, knn_accuracy
from .methods import build_method
from .model import build_backbone


def checkpoint_path(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint here (give a run directory or a .pth file)")
    return path


def load_backbone(run_or_checkpoint: str | Path, branch: str) -> tuple[nn.Module, dict]:
    """The ``branch`` ("teacher"/"student") backbone of one of our checkpoints, in eval mode."""
    path = checkpoint_path(run_or_checkpoint)
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"], str(path), ranges=("model",))
    model = build_method(cfg, int(ckpt["total_steps"]))
    try:
        model.student.load_state_dict(ckpt["student"])
        model.teacher.load_state_dict(ckpt["teacher"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: checkpoint does not fit its own config: "
                        f"{first_line(exc, 200)}") from None
    return model.export_backbone(branch).eval(), {"path": str(path), "config": cfg,
                                                   "step": int(ckpt["step"])}


def random_backbone(arch: str, seed: int = 0) -> nn.Module:
    """A randomly initialised backbone: the floor every method must beat."""
    torch.manual_seed(seed)
    return build_backbone(arch)[0].eval()


def labelled_features(backbone: nn.Module, train_dir: str, val_dir: str, image_size: int,
                      device: torch.device, workers: int = 2,
                      normalize: bool = True) -> tuple[torch.Tensor, ...]:
    """Features and labels of both folders; ``normalize``: L2-normalised (the kNN's)."""
    t = eval_transform(image_size)
    train, val = image_folder(train_dir, t, "--train"), image_folder(val_dir, t, "--val")
    check_same_classes(train.classes, val.classes, train_dir, val_dir)
    backbone = backbone.to(device)
    extract = extract_features if normalize else pooled_features
    tf, tl = extract(backbone, Loader(train, batch_size=256, num_workers=workers,
                                      collate_fn=collate_labelled), device)
    vf, vl = extract(backbone, Loader(val, batch_size=256, num_workers=workers,
                                      collate_fn=collate_labelled), device)
    return tf, tl, vf, vl, torch.tensor(len(train.classes))


@torch.no_grad()
def pooled_features(backbone: nn.Module, loader: DataLoader,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled features (not normalised) and labels of every readable image in ``loader``,
    on the CPU, in eval mode; the unreadable ones named in one warning line."""
    was_training = backbone.training
    backbone.eval()
    feats, labels, bad = [], [], []
    for images, targets, unreadable in loader:
        bad += unreadable
        if len(images):
            feats.append(backbone(images.to(device)).float().cpu())
            labels.append(targets)
    backbone.train(was_training)
    root = getattr(loader.dataset, "root", "the data folder")
    if not feats:
        raise UserError(f"{root}: none of its images could be read")
    if bad:
        print(f"warning: {root}: skipped {len(bad)} unreadable image(s): "
              f"{describe_unreadable(bad)}", file=sys.stderr, flush=True)
    return torch.cat(feats), torch.cat(labels)


def knn_eval(backbone: nn.Module, train_dir: str, val_dir: str, image_size: int,
             k: int = 20, temperature: float = 0.07, device: str = "cpu",
             workers: int = 2) -> dict[str, float]:
    tf, tl, vf, vl, n = labelled_features(backbone, train_dir, val_dir, image_size,
                                          torch.device(device), workers)
    return {"knn_top1": knn_accuracy(tf, tl, vf, vl, int(n), k, temperature), "knn_k": k}


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = 256, use_bn: bool = True, seed: int = 0) -> dict[str, float]:
    """Linear (optionally BN1d → Linear) classifier on fixed features; SGD + cosine LR."""
    torch.manual_seed(seed)
    dim = train_x.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False) if use_bn else nn.Identity(),
                         nn.Linear(dim, num_classes))
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(train_x) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        head.train()
        order = torch.randperm(len(train_x))
        for i in range(0, len(train_x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2 and use_bn:
                continue
            loss = nn.functional.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    with torch.no_grad():
        logits = head(val_x)
    top5 = logits.topk(min(5, num_classes), dim=1).indices
    return {"linear_top1": 100.0 * (top5[:, 0] == val_y).float().mean().item(),
            "linear_top5": 100.0 * (top5 == val_y[:, None]).any(1).float().mean().item()}


def linear_eval(backbone: nn.Module, train_dir: str, val_dir: str, image_size: int,
                epochs: int = 100, lr: float = 0.1, use_bn: bool = True,
                device: str = "cpu", normalize: bool = False) -> dict[str, float]:
    """The fast probe: ``train_linear`` on features extracted once (``normalize``: L2-
    normalised first, the probe's behaviour before it was a setting)."""
    tf, tl, vf, vl, n = labelled_features(backbone, train_dir, val_dir, image_size,
                                          torch.device(device), normalize=normalize)
    return train_linear(tf, tl, vf, vl, int(n), epochs=epochs, lr=lr, use_bn=use_bn)


def append_metrics(run_or_checkpoint: str | Path, record: dict) -> Path | None:
    """Append ``record`` to the run directory's metrics.jsonl (when the input is in one)."""
    path = checkpoint_path(run_or_checkpoint)
    metrics = path.parent / "metrics.jsonl"
    if not (path.parent / "config.yaml").exists():
        return None
    with open(metrics, "a") as f:
        f.write(json.dumps(record) + "\n")
    return metrics


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns``."""
    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
