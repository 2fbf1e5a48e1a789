"""Install Detectron2 into the running Python environment, unless one is already importable.

Detectron2 is not on the package index under its own name. The wheel ``sal-detectron2==0.7.2``
(built for Python 3.10) carries upstream Detectron2 main at commit a59f0563 (2024-04-17), plus
upstream's later one-line ``data/common.py`` fix (400a49c1), a test helper and the version label
"0.7.2". Its
pure-Python package runs everything our configs use on CPU and GPU; only its compiled ``_C``
extension (deformable convolution, rotated boxes, the C++ COCOeval) is unusable outside
Python 3.10, so it is left out. A user with their own Detectron2 (a source build with the CUDA
ops) keeps it: this script then does nothing.

It records what it installed in ``detectron2/m2t_build.json`` (:data:`BUILD`: the upstream
commit, the local differences, the sampler seeding that follows from them, and a digest of the
installed ``.py`` files); ``transfer/detectron2_build.py`` reads it, and every transfer run
writes it into its log and ``results.json``.

Usage: ``python tools/install_detectron2.py [--force] [--wheel PATH] [--record]``
(``--wheel``: a ``sal_detectron2`` wheel already on disk, for machines without the package
index; ``--record``: write the record for a Detectron2 installed earlier, after checking that
its files are the wheel's).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

WHEEL = "sal-detectron2==0.7.2"
#: Where the record goes, inside the installed package (``transfer.detectron2_build.RECORD``).
RECORD = "m2t_build.json"
#: What the wheel's code is, measured against upstream (303 of its 306 files equal a59f0563's).
BUILD = {
    "version": "0.7.2",
    "source": f"{WHEEL} wheel",
    "upstream_commit": "a59f0563",
    "upstream_date": "2024-04-17",
    "local_changes": [
        "data/common.py: upstream's later fix 400a49c1 (2025-04-13): a mapper may return None "
        "on Python >= 3.11",
        "a test helper",
        "the version label 0.7.2",
        "without the compiled _C extension (built for Python 3.10)",
    ],
    # before upstream b1c43ffb (2024-12-19): TrainingSampler's seed is drawn from the random
    # state default_setup seeds with SEED + rank, not SEED itself
    "sampler_seeding": "rng",
}


def tree_digest(folder: Path) -> str:
    """SHA-256 over the relative paths and contents of every ``.py`` file under ``folder``
    (the same as ``transfer.detectron2_build.tree_digest``)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def write_record(package: Path, wheel: Path) -> Path:
    """Write :data:`BUILD` with the wheel's name and SHA-256 and the installed files' digest."""
    record = dict(BUILD, wheel=wheel.name,
                  wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                  files_sha256=tree_digest(package))
    target = package / RECORD
    target.write_text(json.dumps(record, indent=2) + "\n")
    return target


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
        found = fetch_wheel(tmp, wheel)
        if found is None:
            return 1
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(found) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith("detectron2/") and not Path(m).name.startswith("_C.")]
            zf.extractall(staging, members)
        target = site / "detectron2"
        partial = site / "detectron2.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(staging / "detectron2", partial)
        write_record(partial, found)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)  # atomic on one filesystem: never a half-installed package
    print(f"installed the pure-Python detectron2 from {WHEEL} into {target} (without _C)")
    return 0


def fetch_wheel(tmp: str, wheel: str | None) -> Path | None:
    """The wheel file: ``wheel`` copied into ``tmp``, or downloaded there with pip."""
    if wheel is not None:
        if not Path(wheel).is_file():
            print(f"error: {wheel}: wheel not found", file=sys.stderr)
            return None
        shutil.copy2(wheel, tmp)
    elif subprocess.call([sys.executable, "-m", "pip", "download", "--quiet", WHEEL,
                          "--python-version", "3.10", "--only-binary=:all:", "--no-deps",
                          "-d", tmp]) != 0:
        print(f"error: could not download the {WHEEL} wheel with pip", file=sys.stderr)
        return None
    wheels = list(Path(tmp).glob("*.whl"))
    if len(wheels) != 1:
        print(f"error: expected one wheel in {tmp}, found {wheels}", file=sys.stderr)
        return None
    return wheels[0]


def record_existing(wheel: str | None = None) -> int:
    """Write the record for the importable Detectron2 if its files are the wheel's."""
    existing = detectron2_present()
    if existing is None:
        print("error: no importable detectron2 to record", file=sys.stderr)
        return 1
    package = Path(existing)
    with tempfile.TemporaryDirectory() as tmp:
        found = fetch_wheel(tmp, wheel)
        if found is None:
            return 1
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(found) as zf:
            zf.extractall(staging, [m for m in zf.namelist() if m.startswith("detectron2/")
                                    and m.endswith(".py")])
        if tree_digest(staging / "detectron2") != tree_digest(package):
            print(f"error: the detectron2 in {package} differs from the {WHEEL} wheel's; "
                  f"not recording it as that wheel (reinstall with --force)", file=sys.stderr)
            return 1
        target = write_record(package, found)
    print(f"recorded {package} as the {WHEEL} wheel's code in {target}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="replace an importable detectron2")
    parser.add_argument("--wheel", help="install from this sal_detectron2 wheel file (offline)")
    parser.add_argument("--record", action="store_true",
                        help="only write the build record of an installed detectron2 whose "
                             "files are the wheel's")
    args = parser.parse_args()
    sys.exit(record_existing(args.wheel) if args.record else install(args.force, args.wheel))
