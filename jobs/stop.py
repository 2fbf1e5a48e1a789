"""A stop asked for by the preemption signal, agreed across ranks, and the requeue.

SLURM (or submitit's local executor) sends SIGUSR2 ``signal_delay_s`` before a time limit or
at a preemption. The handler only sets a flag (nothing else is safe in a signal handler) while
the training loop runs; after each step the loop calls :meth:`StopRequest.check`, one
all-reduce of the flag, so that every rank stops after the same step. The stage saves its
checkpoint, then :meth:`StopRequest.requeue` hands over to submitit's handler (which calls the
job's ``checkpoint()`` and requeues it). Outside the loop, with nothing unsaved, the handler
requeues at once.
"""

from __future__ import annotations

import signal
from typing import Any, Self


def preemption_signal() -> int:
    """SIGUSR2, or what ``SUBMITIT_PREEMPT_SIGNAL`` names."""
    import submitit

    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


class _Handler:
    """A handler of signal ``signum`` (``_handle``) that keeps the one it replaces."""

    signum: int
    previous: Any = None

    def install(self) -> Self:
        self.previous = signal.signal(self.signum, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the handler it replaced back."""
        signal.signal(self.signum, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        raise NotImplementedError


class StopRequest(_Handler):
    """A stop asked for by a signal, on any rank.

    ``in_loop``: while true, the handler notes the signal for :meth:`check`; while false, it
    requeues at once. The handler it replaces (submitit's) is kept: :meth:`requeue` calls it.
    """

    def __init__(self, signum: int, in_loop: bool = False) -> None:
        self.signum = signum
        self.in_loop = in_loop
        self.asked = False
        self.agreed = False
        self._world_size = 1
        self._group: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.in_loop:
            self.asked = True
        else:
            self.requeue()

    def attach(self, world_size: int) -> None:
        """Agree on the flag among ``world_size`` ranks, over a gloo group (on the CPU: no GPU
        synchronisation per step)."""
        import torch.distributed as dist

        self._world_size = world_size
        if world_size > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")

    def check(self) -> bool:
        """Whether any rank got the signal (a collective: every rank calls it, after the same
        step); kept in ``agreed``."""
        if self._world_size > 1:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(self.asked)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            self.agreed = bool(flag.item())
        else:
            self.agreed = self.asked
        return self.agreed

    def requeue(self) -> None:
        """submitit's handler: on rank 0 it calls ``checkpoint()``, requeues the job and exits;
        the other ranks leave without a result (the requeued job runs them again). Not under
        submitit (no handler to call) it returns."""
        self.in_loop = False
        if callable(self.previous):
            self.previous(self.signum, None)
            raise SystemExit(0)


class ForwardToWorkers(_Handler):
    """Pass signal ``signum`` on to this process's worker processes (those ``multiprocessing``
    started: Detectron2's ``launch`` spawns its ranks so) and note it in ``got``. ``kill`` and
    a container's stop signal only the process they name; its workers then stop as they do
    on the signal (:class:`StopRequest`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.got = False

    def _handle(self, signum: int, frame: Any) -> None:
        import contextlib
        import multiprocessing
        import os

        self.got = True
        for child in multiprocessing.active_children():
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a container's stop, ``scancel`` or a preemption without ``--signal``)
    raised where SIGINT raises ``KeyboardInterrupt``: the command stops as after Ctrl-C (a
    save in progress is abandoned by the atomic writer, its temporary removed; the last
    checkpoint is intact) instead of dying at once with no message. Raised with a message by
    a stage that stopped at a step boundary with that step saved."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def terminate_as_interrupt() -> None:
    """Handle SIGTERM as SIGINT (:class:`Terminated`) in this process, if it runs Python's
    default handling of SIGTERM in its main thread (a handler set by someone else, such as
    submitit's, is left in place)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_terminated)
