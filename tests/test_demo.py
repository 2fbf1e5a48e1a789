"""The demo pipeline at reduced size, through the entry point `make demo` uses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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
    check_what_each_stage_showed(proc.stdout, out)


def check_what_each_stage_showed(stdout: str, out: Path) -> None:
    """The closing lines state each stage's evidence with the numbers of the files it wrote,
    read here independently of the demo's own parsing."""
    assert "What each stage showed" in stdout, stdout[-3000:]
    ending = stdout[stdout.index("What each stage showed"):]
    assert ending in (out / "summary.md").read_text()

    # pretraining: schedule from the run's config and header, loss from metrics.jsonl
    config = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())
    records = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert last["step"] == config["train"]["steps"]
    header = next(x for x in (out / "logs" / "2_pretrain.log").read_text().splitlines()
                  if x.startswith("momentum2 pretrain: "))
    lr = re.search(r", lr (\S+), device", header).group(1)
    pretrain = ending[ending.index("  pretrain"):ending.index("  convert")]
    assert (f"{config['train']['steps']} steps of batch {config['data']['batch_size']}×1 at "
            f"{config['data']['image_size']} px") in pretrain
    assert f"LR {lr}:" in pretrain and f"warmup_epochs={config['optim']['warmup_epochs']}" in pretrain
    assert (f"loss {first['loss']:.4f} at step {first['step']} → {last['loss']:.4f} at step "
            f"{last['step']}") in pretrain
    assert f"lr {first['lr']:.4g} at step {first['step']}, {last['lr']:.4g} at step" in pretrain

    # conversion: Detectron2's feature difference, as m2t-convert --verify printed it
    verify = [x for x in (out / "logs" / "3_convert.log").read_text().splitlines()
              if x.startswith("verify:")]
    diff = re.search(r"res2\.\.5\| = (\S+) \(tolerance", "\n".join(verify)).group(1)
    assert float(diff) == 0.0
    convert = ending[ending.index("  convert"):ending.index("  transfer")]
    assert f"Detectron2 res2..5| = {diff} (tolerance" in convert
    assert "verification passed" in convert and "loaded 120/120 backbone tensors" in convert

    # fine-tuning: each run's AP and the evaluator that scored it, from its results.json
    for method in ("m2t", "random_init"):
        r = json.loads((out / "transfer" / method / "results.json").read_text())
        line = next(x for x in ending.splitlines() if x.startswith(f"  transfer  {method}:"))
        assert f"box AP {r['bbox']['AP']:.1f}, mask AP {r['segm']['AP']:.1f}" in line
        assert f"after {r['iterations']} iterations of {r['total_batch']} images" in line
        assert f"scored by the {r['evaluator']} evaluator" in line
    # and the two initialisations are presented as a smoke run, not a ranking
    assert "smoke run of the pipeline, not a ranking of methods" in ending
