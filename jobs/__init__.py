"""Job plumbing shared by ``m2t-pretrain`` and ``m2t-transfer`` (a leaf: it imports neither).

- :mod:`jobs.atomic`: the one atomic writer every file of the toolkit goes through.
- :mod:`jobs.ranges`: the range checker of numeric options.
- :mod:`jobs.options`: the ``--slurm`` flags, defined once, and :class:`JobOptions`, checked.
- :mod:`jobs.executor`: submitit's executor (``srun --kill-on-bad-exit=1``), submission,
  the lines that announce a job, waiting for it.
- :mod:`jobs.stop`: the stop on a preemption signal, agreed across ranks, and the requeue.

Errors are :class:`JobError` (``subject``, ``detail``); each stage turns them into its own
``error:`` line. Only :mod:`jobs.executor` and :mod:`jobs.stop` import submitit (and torch):
building a parser costs nothing.
"""

from .errors import JobError

__all__ = ["JobError"]
