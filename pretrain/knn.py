"""kNN monitor (SPEC §2): cosine similarity, k nearest, temperature-weighted votes."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data import describe_unreadable
from .errors import UserError


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device,
                     report: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features and labels of every image in ``loader`` (eval mode).

    Batches come from ``pretrain.data.collate_labelled``: unreadable images are skipped and,
    when ``report``, named in one warning line; a loader with no readable image is an error.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels, bad = [], [], []
    for images, targets, unreadable in loader:
        bad += unreadable
        if len(images) == 0:
            continue
        feats.append(F.normalize(backbone(images.to(device)).float(), dim=1).cpu())
        labels.append(targets)
    backbone.train(was_training)
    root = getattr(loader.dataset, "root", "the data folder")
    if not feats:
        raise UserError(f"{root}: none of its images could be read")
    if bad and report:
        print(f"warning: {root}: skipped {len(bad)} unreadable image(s): "
              f"{describe_unreadable(bad)}", file=sys.stderr, flush=True)
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor,
                query_features: torch.Tensor, num_classes: int, k: int = 20,
                temperature: float = 0.07) -> torch.Tensor:
    """Class scores of each query: Σ over its k nearest of exp(cos / T), per neighbour's class.

    Features must be L2-normalised. Returns (num_queries, num_classes). With a temperature so
    small that exp(cos / T) would overflow, each query's scores are divided by exp(its best
    cos / T): the vote is the same, and finite.
    """
    k = min(k, train_features.shape[0])
    sim = query_features @ train_features.T
    top_sim, top_idx = sim.topk(k, dim=1)
    logits = top_sim / temperature
    if logits.abs().max() > 80:  # exp(88) is the largest float32
        logits = logits - logits[:, :1]
    weights = logits.exp()
    scores = torch.zeros(query_features.shape[0], num_classes)
    scores.scatter_add_(1, train_labels[top_idx], weights)
    return scores


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 query_features: torch.Tensor, query_labels: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy in percent."""
    scores = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature)
    return 100.0 * (scores.argmax(1) == query_labels).float().mean().item()
