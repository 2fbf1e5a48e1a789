"""ImageNet's file list (1,281,167 entries): held as one buffer, read by a DataLoader worker
over a whole epoch without the worker copying it."""

from __future__ import annotations

import pytest

from .conftest import measure

IMAGENET = 1_281_167

#: Builds the listing (``buffer``: ``pretrain.data.samples.Samples``; ``list``: the
#: ``(path, label)`` tuples torchvision's ImageFolder holds), then reads every entry once in
#: one forked worker, in a shuffled order, as ``TwoViewDataset.__getitem__`` reads it.
EPOCH = """
    import gc, os, sys
    from torch.utils.data import DataLoader, Dataset
    from pretrain.data.samples import Samples
    N = {n}
    def entries():
        for k in range(N):
            c = k % 1000
            yield f"/datasets/imagenet/train/n{{c:08d}}/n{{c:08d}}_{{k}}.JPEG", c
    def uss(pid):
        with open(f"/proc/{{pid}}/smaps_rollup") as f:
            return sum(int(l.split()[1]) for l in f if l.startswith("Private_")) / 1024
    class Entries(Dataset):
        def __init__(self, samples):
            self.samples = samples
        def __len__(self):
            return len(self.samples)
        def __getitem__(self, index):
            path, label = self.samples[index]
            return len(path) + label
    base()
    samples = Samples(entries()) if "{kind}" == "buffer" else list(entries())
    gc.collect()
    with open("/proc/self/status") as f:
        rss_now = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
    loader = DataLoader(Entries(samples), batch_size=1024, num_workers=1, shuffle=True,
                        collate_fn=sum)
    it = iter(loader)
    pid, seen, first = it._workers[0].pid, 0, None
    t = time.perf_counter()
    for k, batch in enumerate(it):
        seen += 1
        if k == 0:
            first = uss(pid)
        if k == len(loader) - 1:
            last = uss(pid)
    done(kind="{kind}", rss_mib=rss_now, worker_first_mib=first, worker_last_mib=last,
         batches=seen, epoch_s=time.perf_counter() - t,
         nbytes=samples.nbytes if "{kind}" == "buffer" else None)
    """


@pytest.fixture(scope="module")
def epochs() -> dict[str, dict]:
    return {kind: measure(EPOCH.format(n=IMAGENET, kind=kind)) for kind in ("buffer", "list")}


def test_the_listing_as_a_buffer_is_a_third_of_the_tuples(epochs: dict[str, dict]) -> None:
    buffer, tuples = epochs["buffer"], epochs["list"]
    # the paths' bytes (62 a path here), an end offset and a label: 78 bytes an entry, 95 MiB
    assert buffer["nbytes"] / IMAGENET < 80
    assert buffer["peak_mib"] - buffer["base_mib"] < 250  # built once: buffer + its copy
    # the tuples: a tuple, a str and a list slot each, 200+ bytes an entry (243 MiB here)
    assert tuples["peak_mib"] - tuples["base_mib"] > 200
    assert buffer["rss_mib"] < tuples["rss_mib"] - 100


def test_a_worker_reading_a_whole_epoch_does_not_copy_the_buffer(epochs: dict[str, dict]
                                                                  ) -> None:
    buffer, tuples = epochs["buffer"], epochs["list"]
    assert buffer["batches"] == tuples["batches"] == -(-IMAGENET // 1024)
    grown = buffer["worker_last_mib"] - buffer["worker_first_mib"]
    assert grown < 16, buffer  # flat: a few MiB of the worker's own objects
    # the tuples are copied page by page into the worker as their reference counts change:
    # the whole list ends up private to it (each of 8-10 workers per GPU)
    assert tuples["worker_last_mib"] - tuples["worker_first_mib"] > 150, tuples


FINGERPRINT = """
    from pretrain.data.samples import Samples
    N = {n}
    samples = Samples((f"/datasets/imagenet/train/n{{k % 1000:08d}}/n{{k % 1000:08d}}_{{k}}.JPEG",
                       k % 1000) for k in range(N))
    base()
    t = time.perf_counter()
    first = samples.fingerprint()
    seconds = time.perf_counter() - t
    samples.targets[N // 2] += 1  # one label in the middle of the list
    done(seconds=seconds, same=first == samples.fingerprint())
    """


def test_the_listing_fingerprint_reads_the_buffers_in_place() -> None:
    """The ranks' listing check (``check_same_listing``) on ImageNet's list: no copy of the
    list on the way (the hash reads the buffers), and one changed label in 1.28M is seen."""
    result = measure(FINGERPRINT.format(n=IMAGENET))
    assert result["peak_mib"] - result["base_mib"] < 8, result
    assert result["same"] is False
