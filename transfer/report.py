"""Results of transfer runs: ``results.json`` + ``report.md`` per run, and runs side by side.

A run directory holds Detectron2's ``log.txt``, ``metrics.json`` and ``config.yaml`` plus our
``results.json``::

    {"method": "m2t_200ep", "config": "mask_rcnn_R_50_FPN_1x", "seed": 1, "test_dataset": ...,
     "bbox": {"AP": 39.1, "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ...},
     "segm": {...}, ...}

(LVIS adds APr, APc, APf; a metric that could not be computed is ``null``.)
:func:`write_report` reads several run directories and writes ``report.md`` (one table per
config and test set, one row per pretraining method, mean ± std over the runs, i.e. seeds)
and ``report.png`` (the same as a bar chart with std error bars).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import TransferError

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = COCO_METRICS + ("APr", "APc", "APf")
TASKS = ("bbox", "segm")
#: The columns of the side-by-side table (each run's own report.md has all metrics).
SUMMARY_COCO = ("AP", "AP50", "AP75")
SUMMARY_LVIS = ("AP", "APr", "APc", "APf")
TASK_LABEL = {"bbox": "box", "segm": "mask"}


def clean_metrics(task_results: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline metrics of one task (per-category APs dropped; NaN or < 0 -> None)."""
    out: dict[str, float | None] = {}
    for name in LVIS_METRICS:
        if name in task_results:
            value = float(task_results[name])
            out[name] = None if math.isnan(value) or value < 0 else round(value, 4)
    return out


def metric_names(results: Mapping[str, Any]) -> tuple[str, ...]:
    """COCO's six metrics, or LVIS's nine when the results have APr/APc/APf."""
    lvis = any("APr" in results.get(t, {}) for t in TASKS)
    return LVIS_METRICS if lvis else COCO_METRICS


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def run_table(results: Mapping[str, Any]) -> str:
    """A Markdown table of one run: one row per task, one column per metric."""
    names = metric_names(results)
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task in TASKS:
        if task in results:
            row = [_fmt(results[task].get(n)) for n in names]
            lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_run_results(output_dir: str | Path, metrics: Mapping[str, Mapping[str, Any]],
                      info: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``results.json`` and ``report.md`` for one run; return the results dict.

    Args:
        output_dir: the run directory.
        metrics: ``{"bbox": {...}, "segm": {...}}`` as Detectron2's evaluators return them.
        info: what identifies the run (method, config, seed, datasets, weights, ...).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(info)
    for task in TASKS:
        if task in metrics:
            results[task] = clean_metrics(metrics[task])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    title = " — ".join(str(info[k]) for k in ("method", "config") if info.get(k))
    lines = [f"# {title or 'Evaluation'}", ""]
    if info.get("test_dataset"):
        lines += [f"Test set: `{info['test_dataset']}`", ""]
    lines += [run_table(results), ""]
    details = [f"- {k}: `{info[k]}`" for k in ("weights", "iterations", "total_batch", "base_lr",
                                               "seed", "predictions") if k in info]
    if details:
        lines += details + [""]
    (out / "report.md").write_text("\n".join(lines))
    return results


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The ``results.json`` files of the given run directories (or folders holding runs)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.name == "results.json":
            found.append(path)
        elif (path / "results.json").is_file():
            found.append(path / "results.json")
        elif path.is_dir():
            nested = sorted(path.rglob("results.json"))
            if not nested:
                raise TransferError(path, "no results.json in this folder or below; pass run "
                                          "directories written by m2t-transfer train/eval")
            found.extend(nested)
        else:
            raise TransferError(path, "run directory not found")
    return found


def load_run(path: Path) -> dict[str, Any]:
    """One ``results.json``, with its run directory recorded under ``run_dir``."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TransferError(path, f"not valid JSON ({err})") from None
    if not isinstance(data, dict) or not any(t in data for t in TASKS):
        raise TransferError(path, "not a results.json of m2t-transfer (no bbox/segm metrics)")
    data.setdefault("method", path.parent.name)
    data["run_dir"] = str(path.parent)
    return data


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value).

    >>> mean_std([39.0, 40.0, 41.0])
    (40.0, 1.0)
    """
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Group runs by (config, test set), then by method; mean ± std of the headline metrics.

    Headline metrics: AP, AP50, AP75 per task (COCO), AP, APr, APc, APf per task (LVIS).

    Returns ``{(config, test set): {"metrics": [(task, name), ...], "rows": {method:
    {"n": runs, "seeds": [...], (task, name): (mean, std) or None}}}}``.
    """
    groups: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for run in runs:
        key = (str(run.get("config", "?")), str(run.get("test_dataset", "?")))
        groups[key][str(run["method"])].append(run)
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for key, methods in groups.items():
        all_runs = [r for rs in methods.values() for r in rs]
        lvis = "APr" in metric_names({t: {m: 0 for r in all_runs for m in r.get(t, {})}
                                      for t in TASKS})
        names = SUMMARY_LVIS if lvis else SUMMARY_COCO
        metrics = [(t, n) for t in TASKS if any(t in r for r in all_runs) for n in names]
        rows: dict[str, dict[Any, Any]] = {}
        for method, method_runs in methods.items():
            row: dict[Any, Any] = {"n": len(method_runs),
                                   "seeds": [r.get("seed") for r in method_runs]}
            for task, name in metrics:
                values = [r[task][name] for r in method_runs
                          if r.get(task, {}).get(name) is not None]
                row[(task, name)] = mean_std(values) if values else None
            rows[method] = row
        summary[key] = {"metrics": metrics, "rows": rows}
    return summary


def _fmt_mean_std(cell: tuple[float, float | None] | None) -> str:
    if cell is None:
        return "–"
    mean, std = cell
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def summary_markdown(summary: Mapping[tuple[str, str], Mapping[str, Any]]) -> str:
    """The Markdown of :func:`summarize`: one section per (config, test set)."""
    lines = ["# Transfer results", ""]
    for (config, dataset), group in summary.items():
        metrics = group["metrics"]
        lines += [f"## {config} on `{dataset}`", ""]
        header = ["method", "runs"] + [f"{n}<sup>{TASK_LABEL[t]}</sup>" for t, n in metrics]
        lines += ["| " + " | ".join(header) + " |",
                  "|---|---:|" + "---:|" * len(metrics)]
        for method, row in group["rows"].items():
            cells = [method, str(row["n"])] + [_fmt_mean_std(row[m]) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Mean ± sample standard deviation over the runs (seeds) of each method.")
    return "\n".join(lines) + "\n"


def plot_summary(summary: Mapping[tuple[str, str], Mapping[str, Any]], path: Path) -> None:
    """A bar chart of AP (box and mask) per method, with std error bars, one panel a group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary.items())
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.0, 4.5 * len(groups)), 4.0),
                             squeeze=False)
    for index, ((config, dataset), group) in enumerate(groups):
        ax = axes[0][index]
        shown = list(group["metrics"])
        methods = list(group["rows"])
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            cells = [group["rows"][method][m] for m in shown]
            means = [c[0] if c else 0.0 for c in cells]
            stds = [(c[1] or 0.0) if c else 0.0 for c in cells]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(shown))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=method)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([f"{n}\n{TASK_LABEL[t]}" for t, n in shown])
        ax.set_ylabel("AP (%)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{config}\n{Path(dataset).name}", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=min(3, len(methods)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Put the runs in ``run_dirs`` side by side: ``<out>/report.md`` and ``<out>/report.png``."""
    runs = [load_run(p) for p in find_runs(run_dirs)]
    summary = summarize(runs)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "report.md", out_dir / "report.png"
    md.write_text(summary_markdown(summary))
    plot_summary(summary, png)
    return md, png
