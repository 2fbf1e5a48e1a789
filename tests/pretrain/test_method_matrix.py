"""Every method, not only m2t, resumes exactly, converts and runs under DDP (issue 6).

The m2t-only versions of these checks live in test_training_run.py and test_distributed.py;
here each sibling method goes through the same path a user's run takes. AMP for every method:
test_components.py (bf16 autocast on this CPU is about 13× slower than fp32, too slow for
whole training runs in the suite).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from convert.__main__ import main as convert_main
from pretrain.__main__ import main
from pretrain.checkpoint import load_checkpoint

from .conftest import TINY, run_ddp_checks

METHODS = {
    "byol": ["model.method=byol"],
    "eman": ["model.method=eman"],
    "projector_only": ["model.method=projector_only"],
    "m2t+residual": ["model.method=m2t", "model.residual=true"],
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_resumes_exactly_and_converts(method: str, tiny_train: Path,
                                                            tmp_path: Path) -> None:
    # torchvision's width (not TINY's 16): the backbone is converted to Detectron2 below
    args = [*TINY, "model.width=64", *METHODS[method], "train.steps=6"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--data", str(tiny_train), "--out", str(full), *args]) == 0
    assert main(["train", "--data", str(tiny_train), "--out", str(split), *args,
                 "--stop-after", "3"]) == 0
    assert main(["train", "--data", str(tiny_train), "--out", str(split), "--resume"]) == 0
    a, b = load_checkpoint(full / "last.pth"), load_checkpoint(split / "last.pth")
    assert a["step"] == b["step"] == 6
    for branch in ("student", "teacher"):
        assert a[branch].keys() == b[branch].keys()
        for key, value in a[branch].items():
            assert torch.equal(value, b[branch][key]), f"{method}: {branch}.{key} differs"

    # the exported backbone is what each method's authors evaluate (SPEC §3): the teacher for
    # m2t, the online network for BYOL and EMAN, the only backbone for projector_only
    out = tmp_path / "backbone.pkl"
    assert convert_main([str(full / "last.pth"), str(out), "--verify"]) == 0
    with open(out, "rb") as f:
        d2 = pickle.load(f)["model"]
    branch = {"byol": "student", "eman": "student", "projector_only": "student",
              "m2t+residual": "teacher"}[method]
    if method == "projector_only":
        assert not any(k.startswith("backbone.") for k in a["teacher"])
    source = a[branch]
    for d2_key, tv_key in [("stem.conv1.weight", "conv1.weight"),
                           ("res5.1.conv2.weight", "layer4.1.conv2.weight"),
                           ("res2.0.conv1.norm.running_var", "layer1.0.bn1.running_var")]:
        assert torch.equal(torch.as_tensor(d2[d2_key]), source["backbone." + tv_key]), d2_key
    if method != "projector_only":  # the teacher has moved away from the student
        assert not torch.equal(a["teacher"]["backbone.conv1.weight"],
                               a["student"]["backbone.conv1.weight"])


@pytest.mark.slow
def test_every_method_keeps_two_gloo_ranks_in_lock_step(tiny_train: Path, tmp_path: Path) -> None:
    runs = {tmp_path / method.replace("+", "_"): [*METHODS[method], "train.steps=2"]
            for method in METHODS}  # one torchrun start-up, one run per method
    stdout, lines = run_ddp_checks(tiny_train, runs)
    for method, run in zip(METHODS, runs, strict=True):
        for name in ("student", "teacher"):
            assert sum(f" {name} " in line and "identical_across_ranks=True" in line
                       for line in lines[run.name]) == 2, (method, stdout)
        assert (run / "last.pth").exists(), method
        assert f"{METHODS[method][0].split('=')[1]} resnet18" in stdout  # the method really ran
