"""An interrupted Detectron2 fine-tuning (kill -9) continues with ``m2t-transfer train --resume``."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision

from .conftest import ENV, REPO, make_coco_dataset

pytestmark = pytest.mark.slow

#: Mask R-CNN R50-FPN made small: a ResNet-18 body, 128 px, batch 2, few proposals.
SMALL = [
    "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
    "SOLVER.WARMUP_ITERS", "2", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "TEST.PRECISE_BN.NUM_ITER", "1",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "30", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "10", "SEED", "0",
]


@pytest.fixture(scope="module")
def r18_pkl(module_tmp: Callable[[str], Path]) -> Path:
    from convert import convert_checkpoint

    folder = module_tmp("r18")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / "r18.pth")
    convert_checkpoint(str(folder / "r18.pth"), str(folder / "r18.pkl"))
    return folder / "r18.pkl"


def test_a_killed_fine_tuning_resumes_from_its_last_checkpoint(r18_pkl: Path, tmp_path: Path,
                                                              ledger) -> None:
    from transfer.__main__ import main

    annotations = make_coco_dataset(tmp_path / "squares")
    run = tmp_path / "run"
    argv = ["train", "--config", "mask_rcnn_R_50_FPN_1x", "--weights", str(r18_pkl),
            "--train-dataset", str(annotations), "--test-dataset", str(annotations),
            "--output-dir", str(run)]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "transfer", *argv, *SMALL], cwd=REPO,
                                env=ENV, stdout=log, stderr=subprocess.STDOUT)
    tag = run / "last_checkpoint"
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline and not tag.exists():
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ledger.fault("transfer: kill -9 of a Detectron2 fine-tuning")
    assert not (run / "model_final.pth").exists()  # it really was interrupted
    saved = tag.read_text().strip()
    done = int(re.fullmatch(r"model_(\d+)\.pth", saved).group(1))  # last finished iteration

    assert main([*argv, "--resume", *SMALL]) == 0
    log = (run / "log.txt").read_text()
    assert f"Starting training from iteration {done + 1}" in log
    final = torch.load(run / "model_final.pth", weights_only=True)
    assert final["iteration"] == 3  # iterations 0..3: MAX_ITER 4, none repeated or skipped
    assert (run / "results.json").exists()
