"""A dataset's file list as two numpy buffers, not a Python object per sample.

A list of 1.28M ``(path, label)`` tuples is about 3.7 million Python objects. Every
DataLoader worker forked from the main process shares their pages at first, but reading an
object writes its reference count, so each worker copies, page by page, the whole list it
touches in an epoch: the known PyTorch "memory leak" (pytorch/pytorch#13246), 8–10 copies per
GPU. Detectron2 keeps its dataset as one serialised numpy buffer for this reason
(``detectron2/data/common.py``, ``DatasetFromList(serialize=True)``); :class:`Paths` and
:class:`Samples` do the same for a file list: the paths' bytes end to end in one ``uint8``
array with an array of end offsets, the labels in one ``int64`` array. Reading an entry
touches no shared object, so a worker's private memory stays flat over the epoch
(``benchmarks/data_scale.py``).

Entries come back exactly as they went in: paths are encoded with ``os.fsencode`` (file
names that are not valid UTF-8 round-trip too) and labels as Python ints.

>>> s = Samples([("a/x.jpg", 0), ("b/y.jpg", 1)])
>>> s[1], len(s), list(s.paths)
(('b/y.jpg', 1), 2, ['a/x.jpg', 'b/y.jpg'])
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np


class Paths(Sequence[str]):
    """File paths held as one byte buffer and their end offsets."""

    def __init__(self, paths: Iterable[str | Path]) -> None:
        data, ends = bytearray(), array("q")
        for path in paths:  # one pass, no list of the encoded paths on the way
            data += os.fsencode(path)
            ends.append(len(data))
        self._ends = np.frombuffer(ends, dtype=np.int64).copy()
        self._bytes = np.frombuffer(bytes(data), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Paths: ...

    def __getitem__(self, index: int | slice) -> str | Paths:
        if isinstance(index, slice):
            return Paths(self[i] for i in range(*index.indices(len(self))))
        n = len(self._ends)
        if not -n <= index < n:
            raise IndexError(f"path index {index} out of range for {n} paths")
        index %= n
        start = int(self._ends[index - 1]) if index else 0
        return os.fsdecode(self._bytes[start:int(self._ends[index])].tobytes())

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Memory the buffer holds."""
        return self._bytes.nbytes + self._ends.nbytes

    @property
    def buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """The paths' bytes end to end and their end offsets (read-only views)."""
        return self._bytes, self._ends


class Samples(Sequence[tuple[str, int]]):
    """``(path, label)`` pairs (``ImageFolder.samples``) as :class:`Paths` and a label array.

    ``targets`` is the ``int64`` array of labels (``ImageFolder.targets``, as an array).
    """

    def __init__(self, pairs: Iterable[tuple[str | Path, int]]) -> None:
        targets = array("q")

        def paths() -> Iterator[str | Path]:
            for path, target in pairs:
                targets.append(target)
                yield path

        self.paths = Paths(paths())
        self.targets = np.frombuffer(targets, dtype=np.int64).copy()

    def __len__(self) -> int:
        return len(self.targets)

    @overload
    def __getitem__(self, index: int) -> tuple[str, int]: ...

    @overload
    def __getitem__(self, index: slice) -> Samples: ...

    def __getitem__(self, index: int | slice) -> tuple[str, int] | Samples:
        if isinstance(index, slice):
            return Samples([self[i] for i in range(*index.indices(len(self)))])
        return self.paths[index], int(self.targets[index])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == tuple(b) for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        """Memory the buffers hold."""
        return self.paths.nbytes + self.targets.nbytes

    def fingerprint(self) -> int:
        """A signed 64-bit digest of every path and label, in order (SHA-256 over the buffers:
        about 0.1 s for ImageNet's 1.28M entries), for ranks to compare their listings."""
        digest = hashlib.sha256()
        for buffer in (*self.paths.buffers, self.targets):
            digest.update(memoryview(np.ascontiguousarray(buffer)).cast("B"))
        return int.from_bytes(digest.digest()[:8], "little", signed=True)


def as_paths(paths: Sequence[str | Path] | Paths) -> Paths:
    """``paths`` as a :class:`Paths` buffer (itself when it is one already)."""
    return paths if isinstance(paths, Paths) else Paths(paths)
