"""kNN monitor (SPEC §2): cosine similarity, k nearest, temperature-weighted votes."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .data.folder import describe_unreadable
from .errors import UserError


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device,
                     report: bool = True,
                     on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features and labels of every image in ``loader`` (eval mode), on
    the CPU, or with ``on_device`` where the backbone runs (a GPU keeps its shard of a kNN bank
    instead of copying it to the host).

    Batches come from ``pretrain.data.folder.collate_labelled``: unreadable images are skipped
    and, when ``report``, named in one warning line; a loader with no readable image is an error.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels, bad = [], [], []
    for images, targets, unreadable in loader:
        bad += unreadable
        if len(images) == 0:
            continue
        feats.append(F.normalize(backbone(images.to(device)).float(), dim=1))
        labels.append(targets)
        if not on_device:
            feats[-1] = feats[-1].cpu()
    backbone.train(was_training)
    dataset = getattr(loader.dataset, "dataset", loader.dataset)  # a Subset: its folder
    root = getattr(dataset, "root", "the data folder")
    if not feats:
        raise UserError(f"{root}: none of its images could be read")
    if bad and report:
        print(f"warning: {root}: skipped {len(bad)} unreadable image(s): "
              f"{describe_unreadable(bad)}", file=sys.stderr, flush=True)
    return torch.cat(feats), torch.cat(labels).to(feats[0].device)


DEFAULT_CHUNK_BYTES = 1 << 30  # one similarity block: 1 GiB of float32 (train.knn_chunk_mb)
QUERY_ROWS = 4096  # queries per similarity block, at most


def nearest(bank: torch.Tensor | Iterable[torch.Tensor], queries: torch.Tensor, k: int,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank indices of each query's ``k`` nearest bank rows.

    ``bank`` is one (N, D) tensor or an iterable of (n_i, D) row blocks, read once (a generator
    streaming them from disk or from other ranks will do). No similarity block (queries × bank
    rows) and no float32 copy of bank rows holds more than ``chunk_bytes``; each block's top k is merged
    into a running top k: the same neighbours as one full similarity matrix (up to the order of
    exact ties), with memory bounded whatever N is (about three blocks at the peak, plus the
    queries' running top k). Blocks are computed in float32 on the queries' device.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    n_q = queries.shape[0]
    q_rows = max(1, min(n_q, QUERY_ROWS))
    b_rows = max(1, chunk_bytes // 4 // max(q_rows, queries.shape[1]))
    best_sim = torch.full((n_q, 0), float("-inf"), device=queries.device)
    best_idx = torch.empty((n_q, 0), dtype=torch.long, device=queries.device)
    offset = 0
    for block in ([bank] if isinstance(bank, torch.Tensor) else bank):
        for b0 in range(0, block.shape[0], b_rows):
            part = block[b0:b0 + b_rows].to(queries.device, torch.float32)
            ids = torch.arange(offset + b0, offset + b0 + part.shape[0], device=queries.device)
            sims, idxs = [], []
            for q0 in range(0, n_q, q_rows):
                sim = torch.cat([best_sim[q0:q0 + q_rows],
                                 queries[q0:q0 + q_rows].float() @ part.T], dim=1)
                idx = torch.cat([best_idx[q0:q0 + q_rows],
                                 ids.expand(sim.shape[0], -1)], dim=1)
                top, pos = sim.topk(min(k, sim.shape[1]), dim=1)
                sims.append(top)
                idxs.append(idx.gather(1, pos))
            best_sim, best_idx = torch.cat(sims), torch.cat(idxs)
        offset += block.shape[0]
    if offset == 0:
        raise ValueError("the kNN bank is empty")
    return best_sim, best_idx


def knn_predict(train_features: torch.Tensor | Iterable[torch.Tensor],
                train_labels: torch.Tensor, query_features: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Class scores of each query: Σ over its k nearest of exp(cos / T), per neighbour's class.

    Features must be L2-normalised. Returns (num_queries, num_classes). The bank may be one
    tensor or row blocks, of any floating dtype (float16 halves a 1.28M-image bank); memory is
    bounded by ``chunk_bytes`` (see ``nearest``).
    """
    k = min(k, train_labels.shape[0])
    top_sim, top_idx = nearest(train_features, query_features, k, chunk_bytes)
    return vote(top_sim, train_labels.to(top_idx.device)[top_idx], num_classes, temperature)


def vote(top_sim: torch.Tensor, top_labels: torch.Tensor, num_classes: int,
         temperature: float) -> torch.Tensor:
    """Each query's class scores from its neighbours' similarities and labels (both (Q, k)).

    With a temperature so small that exp(cos / T) would overflow, each query's scores are
    divided by exp(its best cos / T): the vote is the same, and finite.
    """
    logits = top_sim / temperature
    if logits.abs().max() > 80:  # exp(88) is the largest float32
        logits = logits - logits[:, :1]
    weights = logits.exp()
    scores = torch.zeros(top_sim.shape[0], num_classes, device=weights.device)
    return scores.scatter_add_(1, top_labels, weights)


def merge_nearest(parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest over several banks from each bank's own (similarities, labels) of its
    nearest: how ranks that each hold a shard of the bank combine their answers."""
    sims = torch.cat([p[0] for p in parts], dim=1)
    labels = torch.cat([p[1] for p in parts], dim=1)
    top, pos = sims.topk(min(k, sims.shape[1]), dim=1)
    return top, labels.gather(1, pos)


def knn_accuracy(train_features: torch.Tensor | Iterable[torch.Tensor],
                 train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> float:
    """Top-1 accuracy in percent."""
    scores = knn_predict(train_features, train_labels, query_features, num_classes, k,
                         temperature, chunk_bytes)
    hits = scores.argmax(1).cpu() == query_labels.cpu()
    return 100.0 * hits.float().mean().item()


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (any number of rows, the same trailing shape) concatenated in rank
    order; ``x`` itself without a process group. Memory: the gathered rows, once."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    rows = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(sizes, rows)
    most = max(int(n) for n in sizes)
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, sizes, strict=True)])


def sharded_knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                         query_labels: torch.Tensor, num_classes: int, k: int = 20,
                         temperature: float = 0.07,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> float:
    """kNN top-1 (percent) when each rank holds a shard of the bank and of the queries.

    The queries are gathered to every rank (ImageNet's 50,000 × 2048: 400 MB); each rank finds
    every query's ``k`` nearest in its own shard (memory bounded by ``chunk_bytes``), and the
    ranks' (Q, k) answers are gathered and merged: the neighbours of the whole bank. Without a
    process group this is :func:`knn_accuracy` on one bank. Every rank returns the result.
    """
    queries, query_labels = all_gather_rows(queries), all_gather_rows(query_labels)
    total = int(all_gather_rows(torch.tensor([bank.shape[0]], device=bank.device)).sum())
    k = min(k, total)
    sims, idx = nearest(bank, queries, min(k, bank.shape[0]), chunk_bytes)
    labels = bank_labels[idx]
    if total != bank.shape[0]:  # several ranks: merge their answers
        if sims.shape[1] < k:  # a shard smaller than k: pad with neighbours that never win
            pad = k - sims.shape[1]
            sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), float("-inf"))], 1)
            labels = torch.cat([labels, labels.new_zeros((labels.shape[0], pad))], 1)
        world = dist.get_world_size()
        all_sims = [torch.empty_like(sims) for _ in range(world)]
        all_labels = [torch.empty_like(labels) for _ in range(world)]
        dist.all_gather(all_sims, sims)
        dist.all_gather(all_labels, labels)
        sims, labels = merge_nearest(list(zip(all_sims, all_labels, strict=True)), k)
    scores = vote(sims, labels, num_classes, temperature)
    hits = scores.argmax(1) == query_labels.to(scores.device)
    return 100.0 * hits.float().mean().item()
