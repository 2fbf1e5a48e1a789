"""An installed wheel (not this checkout) carries configs/ and finds configs by short name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "convert", "transfer")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy so that the checkout gets no build/ folder.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in (*PACKAGES, "configs"):
        shutil.copytree(ROOT / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("momentum2-*.whl")
    return whl


def test_the_wheel_carries_every_config_byte_for_byte(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if n.endswith(".yaml")}
        for part in ("pretrain", "transfer"):
            shipped = sorted((ROOT / "configs" / part).glob("*.yaml"))
            assert shipped, f"no configs in configs/{part}"
            for path in shipped:
                name = f"{part}/configs/{path.name}"
                assert name in names, f"{name} missing from {wheel.name}"
                assert z.read(name) == path.read_bytes()
        assert {n.split("/")[0] for n in names} == {"pretrain", "transfer"}


def test_short_config_names_resolve_in_an_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    probe = (
        "import pretrain.__main__ as p, transfer.config as t\n"
        "print(p.__file__); print(t.__file__)\n"
        "print(p.resolve_config_path('resnet18_cifar'))\n"
        "print(t.resolve_config('mask_rcnn_R_50_FPN_1x'))\n"
        "print(t.load_config('lvis_v1_mask_rcnn_R_50_FPN_1x').SOLVER.MAX_ITER)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()[-5:]
    installed = target.resolve()
    for line in lines[:4]:
        assert Path(line).resolve().is_relative_to(installed), f"{line} is not from the wheel"
    assert Path(lines[2]).name == "resnet18_cifar.yaml"
    assert Path(lines[3]).name == "mask_rcnn_R_50_FPN_1x.yaml"
    # _BASE_ chains are followed inside the installed package too.
    assert lines[4] == "180000"
