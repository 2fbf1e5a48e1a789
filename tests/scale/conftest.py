"""The scale tier: each path whose memory or time grows with the data, run at the size users
run it (ImageNet's 1.28M images, LVIS v1's 20,000 validation images × 300 detections, 1,203
categories) on synthetic inputs, with a memory bound asserted.

Each measurement runs in a child process, so that its peak resident memory (VmHWM, reset when
the work starts) is its own and not the test session's. The tier is marked ``scale``; ``make test`` runs it too (it fits
the suite's time; ``pytest -m 'not scale'`` leaves it out).
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
    """Run ``code`` in a fresh interpreter (one torch thread); it must call ``base()`` before
    the work and ``done(**result)`` after it. Returns ``result`` with ``base_mib`` (the
    resident memory at ``base()``) and ``peak_mib`` (the peak resident memory since then)."""
    prologue = textwrap.dedent("""
        import json, sys, time
        import torch
        torch.set_num_threads(1)
        def _status_mib(key):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key)) / 1024
        BASE_MIB = None
        def base():
            # the peak from here on: getrusage's ru_maxrss would also count the memory of the
            # process this one was forked from (Linux keeps it across exec), so read VmHWM,
            # reset to the current size by clear_refs 5
            global BASE_MIB
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            BASE_MIB = _status_mib("VmRSS")
        def done(**result):
            print(json.dumps({**result, "base_mib": BASE_MIB, "peak_mib": _status_mib("VmHWM")}))
        """)
    proc = subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                               "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
