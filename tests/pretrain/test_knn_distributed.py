"""The kNN monitor sharded across ranks (each rank its slice of the bank and of the queries,
answers gathered and merged) gives the single-process accuracy; the per-class bank option."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.hooks import bank_indices
from pretrain.knn import knn_accuracy, sharded_knn_accuracy


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 16, generator=g)
    bl, ql = torch.randint(6, (701,), generator=g), torch.randint(6, (203,), generator=g)
    bank = F.normalize(centres[bl] + torch.randn(701, 16, generator=g), dim=1)
    queries = F.normalize(centres[ql] + torch.randn(203, 16, generator=g), dim=1)
    return bank, bl, queries, ql


def _rank(rank: int, world: int, port: int, k: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bank, bl, queries, ql = data()
    acc = sharded_knn_accuracy(bank[rank::world], bl[rank::world], queries[rank::world],
                               ql[rank::world], 6, k=k, chunk_bytes=4 * 203 * 16)
    Path(out, f"{rank}.txt").write_text(repr(acc))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_ranks_give_the_single_process_accuracy(tmp_path: Path) -> None:
    bank, bl, queries, ql = data()
    for k in (20, 300):  # 300: more than one rank's shard holds (234), fewer than the bank
        want = knn_accuracy(bank, bl, queries, ql, 6, k=k)
        mp.spawn(_rank, args=(3, free_port(), k, str(tmp_path)), nprocs=3, join=True)
        got = {float((tmp_path / f"{r}.txt").read_text()) for r in range(3)}
        assert got == {want}, (k, got, want)
        assert 30 < want < 100


def test_without_a_process_group_it_is_the_plain_accuracy() -> None:
    bank, bl, queries, ql = data(1)
    assert sharded_knn_accuracy(bank, bl, queries, ql, 6) == knn_accuracy(bank, bl, queries,
                                                                           ql, 6)


def test_the_per_class_bank_takes_the_first_images_of_each_class() -> None:
    targets = [0, 0, 1, 0, 2, 1, 1, 2, 0]
    assert list(bank_indices(targets, 0)) == list(range(9))
    assert bank_indices(targets, 2) == [0, 1, 2, 4, 5, 7]
    assert bank_indices(targets, 1) == [0, 2, 4]
