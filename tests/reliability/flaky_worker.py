"""Test-only ``torchrun`` entry point: ``m2t-pretrain`` whose rank-1 worker dies once.

Runs ``pretrain.__main__.main`` with the command-line arguments. On the first attempt
(``TORCHELASTIC_RESTART_COUNT`` 0) the worker of rank 1 writes the marker file
``$M2T_DIED_MARKER`` and exits hard (``os._exit(1)``, no clean-up) right after training
step ``$M2T_DIE_AFTER_STEP``; restarted attempts run normally, except that rank 1 starts
``$M2T_RESTART_DELAY`` seconds late (so that rank 0 joins first and would read any address
the dead attempt left behind). Production code has no hook for this: the wrapper patches
``Trainer.train_step`` in this process only.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pretrain import train
from pretrain.__main__ import main


def arm() -> None:
    """Make this worker die after the configured step, if it is rank 1 on attempt 0."""
    if os.environ.get("RANK") != "1":
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0":
        time.sleep(float(os.environ.get("M2T_RESTART_DELAY", "0")))
        return
    die_after = int(os.environ["M2T_DIE_AFTER_STEP"])
    marker = Path(os.environ["M2T_DIED_MARKER"])
    original = train.Trainer.train_step

    def train_step(self: train.Trainer, v1, v2):  # type: ignore[no-untyped-def]
        out = original(self, v1, v2)
        if self.step + 1 == die_after:  # the loop counts the step once train_step returns
            marker.write_text(f"rank 1 died after step {die_after}\n")
            os._exit(1)
        return out

    train.Trainer.train_step = train_step  # type: ignore[method-assign]


if __name__ == "__main__":
    arm()
    sys.exit(main(sys.argv[1:]))
