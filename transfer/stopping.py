"""Stopping a fine-tuning at an iteration's end with it saved, when a signal asks
(:class:`jobs.stop.StopRequest`: SIGTERM here or in a SLURM job, the preemption signal in a
SLURM job). Both the local run (:mod:`transfer.train`) and the job (:mod:`transfer.slurm`) use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detectron2.engine import HookBase


class TrainingStopped(BaseException):
    """Raised by :class:`StopHook` to leave Detectron2's training loop after a saved
    iteration (a BaseException: Detectron2 logs every ``Exception`` as a failure)."""


class StopHook(HookBase):
    """After each iteration: stop (all ranks) if the signal came, with a checkpoint saved."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop

    def after_step(self) -> None:
        trainer = self.trainer
        it = trainer.iter
        final = it + 1 >= trainer.max_iter
        if self.stop.check():
            self.stop.in_loop = False
            name = f"model_{it:07d}"
            last = Path(trainer.checkpointer.get_checkpoint_file() or "").stem
            # at the final iteration Detectron2 saved model_final just before, and at one of
            # SOLVER.CHECKPOINT_PERIOD this very checkpoint
            if not final and last != name:
                trainer.checkpointer.save(name, iteration=it)
            raise TrainingStopped(it)
        self.stop.in_loop = not final  # from the end of a session's first iteration
