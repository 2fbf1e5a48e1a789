"""``trim_metrics`` reads metrics.jsonl line by line (a 500k-step run's file is 100 MB+) and
leaves exactly what the whole-file version it replaced left: same bytes, same count."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pretrain.rundir import _step, trim_metrics


def whole_file_trim(data: bytes, step: int) -> tuple[bytes, int]:
    """The version that read the whole file (before issue 30), as the oracle."""
    lines = data.splitlines(keepends=True)
    kept = [line for line in lines if _step(line) is None or _step(line) <= step]
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1:] = [kept[-1] + b"\n"] if _step(kept[-1]) is not None else []
    return b"".join(kept), len(lines) - len(kept)


CASES = [
    b"",
    b'{"step": 1}\n{"step": 2}\n{"step": 3}\n',
    b'{"step": 1}\n{"step": 2}\n{"step": 3}',  # last record without its newline
    b'{"step": 1}\n{"step": 2}\n{"ste',  # cut mid-write
    b'{"step": 1}\nnot json\n{"step": 9}\n{"step": 2}\n',  # late record among kept ones
    b'{"step": 1}\r\n{"step": 5}\r{"step": 2}\r',  # other line endings
    b'{"step": 1}\n{"step": 9}',  # a late record without its newline
    b'[1, 2]\n{"step": true}\n{"step": 2.5}\n\n{"step": 1}\nx',
]


@pytest.mark.parametrize("data", CASES)
def test_trimming_line_by_line_leaves_what_the_whole_file_version_left(data: bytes,
                                                                        tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(data)
    want, dropped = whole_file_trim(data, 2)
    assert trim_metrics(path, 2) == dropped
    assert path.read_bytes() == want


def test_random_files_trim_as_before(tmp_path: Path) -> None:
    rng = random.Random(0)
    pieces = [b'{"step": %d, "loss": 1.5}' % k for k in range(8)] + [
        b"junk", b"", b'{"step": "x"}', b'{"st']
    for trial in range(300):
        data = b"".join(rng.choice(pieces) + rng.choice([b"\n", b"\n", b"\r\n", b"\r", b""])
                        for _ in range(rng.randrange(8)))
        path = tmp_path / f"{trial}.jsonl"
        path.write_bytes(data)
        step = rng.randrange(8)
        want, dropped = whole_file_trim(data, step)
        assert trim_metrics(path, step) == dropped, data
        assert path.read_bytes() == want, data


def test_an_unchanged_file_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": k}) + "\n" for k in range(5)))
    before = path.stat()
    assert trim_metrics(path, 10) == 0
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
