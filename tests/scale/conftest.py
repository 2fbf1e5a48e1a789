"""The scale tier: each path whose memory or time grows with the data, run at the size users
run it (ImageNet's 1.28M images, LVIS v1's 20,000 validation images × 300 detections, 1,203
categories) on synthetic inputs, with a memory bound asserted.

Each measurement runs in a child process, so that its peak resident memory (ru_maxrss) is its
own and not the test session's. The tier is marked ``scale``; ``make test`` runs it too (it fits
the suite's time; ``make test-fast`` leaves it out).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/scale/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.scale)


def measure(code: str, timeout: int = 900) -> dict:
    """Run ``code`` in a fresh interpreter (one torch thread); it must print one JSON object as
    its last line. Returns that object with ``peak_mib`` (the child's peak RSS) and
    ``base_mib`` (the peak RSS of the same interpreter after its imports, before the work)."""
    prologue = textwrap.dedent("""
        import json, resource, sys, time
        import torch
        torch.set_num_threads(1)
        def _rss_mib():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        BASE_MIB = None
        def base():
            global BASE_MIB
            BASE_MIB = _rss_mib()
        def done(**result):
            print(json.dumps({**result, "base_mib": BASE_MIB, "peak_mib": _rss_mib()}))
        """)
    proc = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
