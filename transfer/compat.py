"""Compatibility shims for third-party packages, applied once when ``transfer`` is imported.

The PyPI ``lvis`` package (0.5.3, the latest) still calls ``np.float``, an alias NumPy
removed in 1.24; LVIS evaluation then fails with ``AttributeError`` inside
``LVISEval.accumulate``. Restoring the alias (it always meant the builtin ``float``) is the
whole fix. This is the only place in the project that touches it.
"""

from __future__ import annotations

import numpy as np


def restore_numpy_aliases() -> None:
    """Give NumPy back ``np.float`` (= ``float``) if this NumPy removed it; idempotent.

    >>> restore_numpy_aliases(); np.float is float
    True
    """
    if "float" not in np.__dict__:
        np.float = float  # type: ignore[attr-defined]


restore_numpy_aliases()
