"""The process group and the device of a pretraining process (one process per device).

``check_device`` refuses, before anything starts, a device this machine does not have;
``start_process`` then joins the process group torchrun describes (if any) and takes this
process's device. ``Trainer`` calls each once. ``check_same_listing`` refuses a run whose
ranks listed a folder differently (each rank lists it itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from .errors import UserError

if TYPE_CHECKING:
    from .data.samples import Samples


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_device(name: str, option: str = "train.device=") -> None:
    """Refuse, in one line and before anything starts, a device this machine does not have.

    ``option`` is how the user gave it (``"train.device="``, ``"--device "``).
    """
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{option}{name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UserError(f"{option}{name}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise UserError(f"{option}{name} but no CUDA device is available; use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{option}{name} but this machine has {torch.cuda.device_count()} "
                        f"CUDA device(s)")


def start_process(name: str) -> tuple[Dist, torch.device]:
    """Join the process group (if any) and take the device ``name`` (``train.device``, already
    passed by :func:`check_device`) resolves to for this process."""
    uses_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    d = init_distributed("cuda" if uses_cuda else "cpu")
    return d, resolve_device(name, d)


def init_distributed(device_kind: str) -> Dist:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("GROUP_WORLD_SIZE") == "1":
            # torchrun keeps its store across worker restarts, with the addresses the workers
            # of a failed attempt left in it: restarted workers could read those and connect
            # to dead peers (a hang, or "Connection refused"). A prefix per attempt keeps
            # attempts apart; on one node every worker sees the same restart count.
            store, rank, world_size = next(rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"m2t/attempt{attempt}",
                                                                    store),
                                    rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, d: Dist) -> torch.device:
    """The device of process ``d``: its local rank's GPU for ``cuda`` (``auto`` on a machine
    with one), else the CPU. ``name`` was checked by :func:`check_device`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise UserError(f"process LOCAL_RANK={d.local_rank} but this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s): start at most that "
                            f"many processes per node (--nproc_per_node)")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def check_same_listing(samples: Samples, folder: object, device: torch.device) -> None:
    """Refuse, on every rank at once, a listing of ``folder`` that differs between the ranks.

    Each rank lists the folder itself (about 6 s for ImageNet), so a file system still
    syncing, or a node given another folder of the same name, would give ranks different
    lists. ``DistributedSampler`` shards by index: every rank would then train on a shard of
    its own list, some images twice and others never, without any error. The ranks all-gather
    (count, fingerprint) pairs: two int64 per rank. A no-op without a process group.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = torch.tensor([len(samples), samples.fingerprint()], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    pairs = [tuple(int(v) for v in t.tolist()) for t in every]
    if len(set(pairs)) == 1:
        return
    odd = next(r for r, pair in enumerate(pairs) if pair != pairs[0])
    same_count = pairs[odd][0] == pairs[0][0]
    raise UserError(f"{folder}: the processes listed different files (rank 0: {pairs[0][0]:,} "
                    f"images, rank {odd}: {pairs[odd][0]:,}"
                    f"{', the same count but other files or classes' if same_count else ''}); "
                    f"every process must see the same folder (a file system still syncing, "
                    f"or another folder at this path on some node?)")
