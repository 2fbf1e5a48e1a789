"""``jobs.atomic``: a reader sees the old file or the new, never half; every stage writes so."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from jobs.atomic import TEMPORARY, replace_file, replace_files, write_bytes, write_json, write_text

REPO = Path(__file__).resolve().parents[2]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")

    def half_then_fail(f) -> None:
        f.write(b'{"AP": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        replace_file(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_failed_first_write_leaves_no_file_at_all(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        replace_file(tmp_path / "report.md", lambda f: (f.write(b"# half"), _interrupt()))
    assert list(tmp_path.iterdir()) == []


def _interrupt() -> None:
    raise KeyboardInterrupt


def test_the_temporary_is_beside_the_file_and_named_so_no_reader_takes_it(
        tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(f) -> None:
        seen.append(Path(f.name))
        f.write(b"x")

    replace_file(tmp_path / "last.pth", write)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name == f".last.pth.tmp-{os.getpid()}"
    assert TEMPORARY.match(tmp.name) and not tmp.exists()
    assert (tmp_path / "last.pth").read_bytes() == b"x"


def test_text_bytes_and_json_are_written_as_path_methods_would(tmp_path: Path) -> None:
    write_text(tmp_path / "a.md", "| AP |\n")
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    results = {"bbox": {"AP": 1.5}, "method": "m2t"}
    write_json(tmp_path / "results.json", results)
    assert (tmp_path / "a.md").read_text() == "| AP |\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "results.json").read_text() == json.dumps(results, indent=2) + "\n"


def test_if_changed_leaves_a_file_that_holds_the_data_untouched(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    write_text(config, "a: 1\n")
    os.utime(config, ns=(1, 1))
    write_text(config, "a: 1\n", if_changed=True)
    assert config.stat().st_mtime_ns == 1
    write_text(config, "a: 2\n", if_changed=True)
    assert config.read_text() == "a: 2\n" and config.stat().st_mtime_ns != 1


def test_files_that_belong_together_change_together_or_not_at_all(tmp_path: Path) -> None:
    pkl, yaml = tmp_path / "out.pkl", tmp_path / "out.yaml"
    pkl.write_bytes(b"old pkl")
    yaml.write_text("old yaml")
    checked: list[str] = []

    def refuse(tmp: Path) -> None:
        checked.append(tmp.name)
        raise ValueError("verification failed")

    files = [(pkl, lambda f: f.write(b"new pkl")), (yaml, lambda f: f.write(b"new yaml"))]
    with pytest.raises(ValueError):
        replace_files(files, check=refuse, keep_suffix=True)
    assert (pkl.read_bytes(), yaml.read_text()) == (b"old pkl", "old yaml")
    assert re.fullmatch(rf"\.out\.{os.getpid()}\.tmp\.pkl", checked[0])  # read by its suffix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pkl", "out.yaml"]
    replace_files(files, check=lambda tmp: None, keep_suffix=True)
    assert (pkl.read_bytes(), yaml.read_text()) == (b"new pkl", "new yaml")


def test_a_full_disk_names_the_file_not_its_temporary(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as caught:
        write_text(target, "new")
    assert (caught.value.strerror, caught.value.filename) == ("No space left on device",
                                                             str(target))
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


def test_an_unwritable_folder_is_an_os_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "report.md"
    with pytest.raises(OSError) as caught:
        write_text(missing, "x")
    assert caught.value.filename == str(missing)


def test_the_stages_write_files_only_through_jobs_atomic() -> None:
    """No stage renames a file or writes one with ``Path.write_text``/``write_bytes`` itself."""
    direct = re.compile(r"\.write_text\(|\.write_bytes\(|os\.replace\(|os\.rename\(")
    found = [f"{path.relative_to(REPO)}:{n}"
             for package in ("pretrain", "convert", "transfer", "jobs")
             for path in sorted((REPO / package).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if direct.search(line) and path != REPO / "jobs" / "atomic.py"]
    assert not found, found
