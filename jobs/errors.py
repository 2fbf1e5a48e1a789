"""The error of the job plumbing: what is wrong (``detail``) with what (``subject``)."""

from __future__ import annotations


class JobError(Exception):
    """Bad job options, or a job that failed. ``str(err)`` is ``text`` when given, else
    ``"<subject>: <detail>"``; a stage that words its errors ``<path>: <what is wrong>``
    takes ``subject`` and ``detail``, one that prints the sentence takes ``str(err)``."""

    def __init__(self, subject: str, detail: str, *, text: str | None = None) -> None:
        super().__init__(f"{subject}: {detail}" if text is None else text)
        self.subject = str(subject)
        self.detail = detail
