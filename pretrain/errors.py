"""The one exception type that reaches the user as a single ``error:`` line, and its wording.

``m2t-pretrain`` prints a ``UserError`` as ``error: <path>: <what is wrong>`` and exits with
status 2, as ``m2t-convert`` and ``m2t-transfer`` do for theirs.
"""

from __future__ import annotations

import re


class UserError(Exception):
    """Bad input a user can act on: a path, a config key, a checkpoint. Printed, not traced."""


# ----- the same in pretrain/, convert/ and transfer/ (the packages import nothing of each
# other): one wording for every error line and every refused pickle -------------------------

#: How torch's weights-only unpickler names a global it refuses (its wordings in torch 2.x).
_REFUSED_GLOBAL = re.compile(
    r"(?:Unsupported global: GLOBAL |unsupported GLOBAL |but got <class ')([\w.]+)")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of ``str(exc)`` (the type's name if that is empty), at most ``limit``
    characters: what an ``error:`` line quotes of a library's exception.

    >>> first_line(ValueError("bad header\\n  at byte 12"))
    'bad header'
    """
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def refused_global(exc: BaseException) -> str | None:
    """The dotted name of the global that weights-only unpickling refused in ``exc``, if any."""
    found = _REFUSED_GLOBAL.search(str(exc))
    return found.group(1) if found else None


def refused_pickle(name: str, advice: str) -> str:
    """What is wrong with a file that pickles ``name``, which safe loading never runs."""
    return (f"the file pickles a {name} object, which safe loading refuses (it could run "
            f"code); {advice}")
