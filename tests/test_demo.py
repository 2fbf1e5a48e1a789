"""The demo pipeline at reduced size, through the entry point `make demo` uses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_ends_with_a_table(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "transfer.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # every stage wrote its outputs
    assert (out / "data" / "shapes" / "annotations" / "instances_train.json").is_file()
    assert (out / "pretrain" / "last.pth").is_file()
    assert (out / "pretrain" / "metrics.jsonl").is_file()
    assert (out / "weights" / "m2t_r18.pkl").is_file() and (out / "weights" / "m2t_r18.yaml").is_file()
    for method in ("m2t", "random_init"):
        results = json.loads((out / "transfer" / method / "results.json").read_text())
        assert results["method"] == method
        assert set(results["bbox"]) >= {"AP", "AP50", "AP75"} and "segm" in results
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.png").is_file()
    # the commands are printed so that a user can copy them
    for command in ("$ m2t-pretrain train", "$ m2t-convert", "--verify", "$ m2t-transfer train",
                    "$ m2t-transfer report"):
        assert command in proc.stdout, command
    assert "verification passed" in proc.stdout
    # the final table has a numeric row per initialisation
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| m2t", "| random_init"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert all(re.fullmatch(r"\d+\.\d", c) for c in cells), row
    assert (out / "summary.md").read_text().count("|") > 10
