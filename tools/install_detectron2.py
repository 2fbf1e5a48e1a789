"""Install Detectron2 into the running Python environment, unless one is already importable.

Detectron2 is not on the package index under its own name. The wheel ``sal-detectron2==0.7.2``
(built for Python 3.10) carries upstream Detectron2 main at commit a59f0563 (2024-04-17), plus
upstream's later one-line ``data/common.py`` fix (400a49c1), a test helper and the version label
"0.7.2". Its
pure-Python package runs everything our configs use on CPU and GPU; only its compiled ``_C``
extension (deformable convolution, rotated boxes, the C++ COCOeval) is unusable outside
Python 3.10, so it is left out. A user with their own Detectron2 (a source build with the CUDA
ops) keeps it: this script then does nothing.

Usage: ``python tools/install_detectron2.py [--force] [--wheel PATH]`` (``--wheel``: a
``sal_detectron2`` wheel already on disk, for machines without the package index).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL = "sal-detectron2==0.7.2"


def detectron2_present() -> str | None:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent)


def install(force: bool = False, wheel: str | None = None) -> int:
    existing = detectron2_present()
    if existing and not force:
        print(f"detectron2 already importable from {existing}: keeping it")
        return 0
    site = Path(sysconfig.get_paths()["purelib"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", WHEEL, "--python-version", "3.10",
               "--only-binary=:all:", "--no-deps", "-d", tmp]
        if wheel is not None:
            if not Path(wheel).is_file():
                print(f"error: {wheel}: wheel not found", file=sys.stderr)
                return 1
            shutil.copy2(wheel, tmp)
        elif subprocess.call(cmd) != 0:
            print(f"error: could not download the {WHEEL} wheel with pip", file=sys.stderr)
            return 1
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            print(f"error: expected one wheel in {tmp}, found {wheels}", file=sys.stderr)
            return 1
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith("detectron2/") and not Path(m).name.startswith("_C.")]
            zf.extractall(staging, members)
        target = site / "detectron2"
        partial = site / "detectron2.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staging / "detectron2", partial)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)  # atomic on one filesystem: never a half-installed package
    print(f"installed the pure-Python detectron2 from {WHEEL} into {target} (without _C)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="replace an importable detectron2")
    parser.add_argument("--wheel", help="install from this sal_detectron2 wheel file (offline)")
    args = parser.parse_args()
    sys.exit(install(args.force, args.wheel))
