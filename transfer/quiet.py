"""Keep the libraries' own warnings off the terminal (a leaf: imports only the standard library).

Used by the command (:mod:`transfer.__main__`) and by a SLURM job's processes
(:class:`transfer.slurm.TrainingJob`), whose logs should read the same.
"""

from __future__ import annotations

import logging
import warnings

#: Libraries whose own deprecation and internal notices are not the user's business (a
#: torch.meshgrid argument inside Detectron2, numpy's copy keyword inside pycocotools, ...).
QUIET_MODULES = r"(torch|torchvision|detectron2|fvcore|iopath|pycocotools|faster_coco_eval|lvis)"
#: torch's own loggers that print on import or tracing ("No CUDA runtime is found" on a CPU).
QUIET_LOGGERS = ("torch.utils.cpp_extension", "torch.fx._symbolic_trace")


def quiet_libraries() -> None:
    """Keep the libraries' warnings off the terminal; ours and Detectron2's log lines stay."""
    warnings.filterwarnings("ignore", module=QUIET_MODULES + r"(\.|$)")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
