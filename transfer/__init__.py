"""Transfer stage: fine-tune Detectron2 detectors from a converted checkpoint and report AP.

Modules, one idea each:

- ``config``: the shipped configs (``configs/transfer/``), name resolution, overrides, the
  linear batch-scaling switch and the SyncBN -> BN fallback.
- ``datasets``: COCO / LVIS by builtin name or any COCO-format JSON + image folder, checked
  before anything starts.
- ``modeling``: what the configs need beyond Detectron2's yacs registry (FCOS, the MoCo C4 head).
- ``weights``: loading a converted ``.pkl`` and proving the backbone really received it.
- ``train``: ``run_training`` / ``run_evaluation`` on Detectron2's ``DefaultTrainer`` + ``launch``.
- ``scoring``: the two COCO/LVIS evaluators, ``fast`` (faster-coco-eval) and ``official``
  (pycocotools / lvis), with the same numbers.
- ``evaluate``: score a COCO-format results file, and the trainer's evaluator.
- ``report``: ``results.json`` + ``report.md`` per run, and runs side by side.
- ``shapes``: a generated three-class shapes dataset in COCO format (demo, tests).

Importing the package applies the ``lvis`` NumPy shim (``compat``).
"""

from . import compat as _compat  # noqa: F401  (side effect: np.float for the lvis package)
