"""Ranks that listed a folder differently are refused, on every rank, in one line.

Each rank lists the training folder itself; a listing that differs (a file system still
syncing, another folder at the same path on one node) would make ``DistributedSampler`` shard
different lists by the same indices. ``check_same_listing`` all-gathers (count, fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.data.samples import Samples
from pretrain.distributed import check_same_listing
from pretrain.errors import UserError

from .test_knn_distributed import free_port

LISTING = [("data/cat/1.jpg", 0), ("data/cat/2.jpg", 0), ("data/dog/3.jpg", 1)]


def test_the_fingerprint_changes_with_any_path_label_order_or_boundary() -> None:
    same = Samples(LISTING).fingerprint()
    assert Samples(list(LISTING)).fingerprint() == same
    changed = [
        LISTING[:2],                                           # one image fewer
        [*LISTING[:2], ("data/dog/3.jpg", 0)],                 # a label
        [*LISTING[:2], ("data/dog/4.jpg", 1)],                 # a path
        [LISTING[1], LISTING[0], LISTING[2]],                  # the order
    ]
    for other in changed:
        assert Samples(other).fingerprint() != same, other
    # the same bytes end to end, split into paths at other places
    assert Samples([("ab", 0), ("c", 0)]).fingerprint() != Samples([("a", 0), ("bc", 0)]).fingerprint()


def _rank(rank: int, world: int, port: int, listings: list[list[tuple[str, int]]],
          out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        check_same_listing(Samples(listings[rank]), "/data/train", torch.device("cpu"))
        result = "ok"
    except UserError as err:
        result = str(err)
    Path(out, f"{rank}.txt").write_text(result)
    dist.destroy_process_group()


def _run(listings: list[list[tuple[str, int]]], tmp_path: Path) -> list[str]:
    world = len(listings)
    mp.spawn(_rank, args=(world, free_port(), listings, str(tmp_path)), nprocs=world, join=True)
    return [(tmp_path / f"{r}.txt").read_text() for r in range(world)]


def test_ranks_with_the_same_listing_go_on(tmp_path: Path) -> None:
    assert _run([LISTING] * 3, tmp_path) == ["ok"] * 3


def test_a_rank_that_lists_fewer_files_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    results = _run([LISTING, LISTING, LISTING[:2]], tmp_path)
    assert len(set(results)) == 1  # every rank raises the same error (none waits on another)
    assert results[0] == ("/data/train: the processes listed different files (rank 0: 3 images, "
                          "rank 2: 2); every process must see the same folder (a file system "
                          "still syncing, or another folder at this path on some node?)")


def test_the_same_count_of_other_files_is_named_as_such(tmp_path: Path) -> None:
    other = [*LISTING[:2], ("data/dog/4.jpg", 1)]
    results = _run([LISTING, other], tmp_path)
    assert results[0] == results[1]
    assert "(rank 0: 3 images, rank 1: 3, the same count but other files or classes)" in results[0]


def test_without_a_process_group_it_checks_nothing() -> None:
    assert not dist.is_initialized()
    check_same_listing(Samples(LISTING), "/data/train", torch.device("cpu"))



def test_the_trainer_compares_the_listings_of_data_and_val(tiny_train: Path, tiny_val: Path,
                                                           tmp_path: Path,
                                                           monkeypatch) -> None:
    """Pretraining compares what it lists: ``--data`` (the training set) and ``--val`` (the
    kNN monitor's queries), each with the list the run trains or scores on."""
    import pretrain.train
    from pretrain.config import load_config

    from .conftest import TINY

    compared: list[tuple[int, str]] = []
    monkeypatch.setattr(pretrain.train, "check_same_listing",
                        lambda samples, folder, device: compared.append((len(samples),
                                                                         str(folder))))
    trainer = pretrain.train.Trainer(load_config(None, [*TINY, "train.device=cpu"]),
                                     tiny_train, tmp_path / "run", val=str(tiny_val))
    assert compared == [(len(trainer.dataset), str(tiny_train)),
                        (len(trainer.hooks[-1].val_set), str(tiny_val))]
