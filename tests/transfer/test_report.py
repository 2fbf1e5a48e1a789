"""``report``: runs side by side, one row per pretraining method, mean ± std over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transfer.__main__ import main
from transfer.report import summarize, write_report, write_run_results


def _run(folder: Path, method: str, seed: int, ap_box: float, ap_mask: float,
         config: str = "mask_rcnn_R_50_FPN_1x") -> Path:
    metrics = {"bbox": {"AP": ap_box, "AP50": ap_box + 20, "AP75": ap_box + 2, "APs": 20.0,
                        "APm": 40.0, "APl": float("nan")},
               "segm": {"AP": ap_mask, "AP50": ap_mask + 20, "AP75": ap_mask + 2, "APs": 15.0,
                        "APm": 35.0, "APl": 50.0}}
    run = folder / f"{method}-s{seed}"
    write_run_results(run, metrics, {"method": method, "config": config, "seed": seed,
                                     "test_dataset": "coco_2017_val"})
    return run


def test_run_results_hold_every_metric_and_null_for_nan(tmp_path: Path) -> None:
    run = _run(tmp_path, "m2t", 0, 39.0, 35.0)
    results = json.loads((run / "results.json").read_text())
    assert list(results["bbox"]) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert results["bbox"]["APl"] is None and results["segm"]["APl"] == 50.0
    table = (run / "report.md").read_text()
    assert "| bbox | 39.0 | 59.0 | 41.0 | 20.0 | 40.0 | – |" in table


def test_report_puts_methods_in_rows_with_mean_and_std_over_seeds(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "m2t", s, ap, ap - 3) for s, ap in enumerate([39.0, 40.0, 41.0])]
    runs += [_run(tmp_path, "byol", s, ap, ap - 4) for s, ap in enumerate([37.0, 38.0])]
    md, png = write_report(runs, tmp_path / "report")
    text = md.read_text()
    assert "## mask_rcnn_R_50_FPN_1x on `coco_2017_val`" in text
    m2t_row = next(line for line in text.splitlines() if line.startswith("| m2t |"))
    assert m2t_row.startswith("| m2t | 3 | 40.0 ± 1.0 | 60.0 ± 1.0 |")
    byol_row = next(line for line in text.splitlines() if line.startswith("| byol |"))
    assert "| 37.5 ± 0.7 |" in byol_row and "| 33.5 ± 0.7 |" in byol_row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_finds_runs_below_a_folder_and_separates_configs(tmp_path: Path) -> None:
    _run(tmp_path / "all", "m2t", 0, 39.0, 35.0)
    _run(tmp_path / "all", "m2t", 1, 40.0, 36.0, config="fcos_R_50_FPN_1x")
    code = main(["report", str(tmp_path / "all"), "--output-dir", str(tmp_path / "out")])
    assert code == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.count("## ") == 2 and "| m2t | 1 | 39.0 |" in text


def test_summary_keeps_lvis_frequency_metrics() -> None:
    run = {"method": "m2t", "config": "lvis", "test_dataset": "lvis_v1_val",
           "bbox": {"AP": 20.0, "APr": 10.0, "APc": 18.0, "APf": 25.0}}
    summary = summarize([run, dict(run, bbox={**run["bbox"], "APr": 12.0})])
    row = summary[("lvis", "lvis_v1_val")]["rows"]["m2t"]
    assert row[("bbox", "APr")] == pytest.approx((11.0, 2 ** 0.5))
    assert row[("bbox", "APf")] == (25.0, 0.0)
