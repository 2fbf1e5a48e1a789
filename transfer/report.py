"""Results of transfer runs: ``results.json`` + ``report.md`` per run, and runs side by side.

A run directory holds Detectron2's ``log.txt``, ``metrics.json`` and ``config.yaml`` plus our
``results.json``::

    {"method": "m2t_200ep", "config": "mask_rcnn_R_50_FPN_1x", "seed": 1, "test_dataset": ...,
     "bbox": {"AP": 39.1, "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ...},
     "segm": {...}, ...}

(LVIS adds APr, APc, APf; a metric that could not be computed is ``null``.) Runs scored by
this version also hold ``per_category`` (AP of every category, with LVIS's frequency group)
and ``pr_curves`` (precision at recall 0, 0.01, ..., 1, averaged over categories: all areas at
IoU 0.50 and 0.75, and small / medium / large over IoU 0.50:0.95), per task.
:func:`write_report` reads several run directories and writes ``report.md`` (one table per
config and test set, one row per pretraining method, mean ± std over the runs, i.e. seeds,
and when a method has several, each run's values; then the per-category AP of each method,
LVIS's by frequency group), ``report.json`` (the same numbers at full precision) and
``report.png`` (the headline numbers as bars with std error bars, and the precision–recall
curves of each method).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jobs.atomic import replace_file, write_json, write_text

from .errors import TransferError
from .scoring import CURVES, RECALL

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = COCO_METRICS + ("APr", "APc", "APf")
TASKS = ("bbox", "segm")
#: The columns of the side-by-side table (each run's own report.md has all metrics).
SUMMARY_COCO = ("AP", "AP50", "AP75")
#: Pascal VOC (Detectron2's PascalVOCDetectionEvaluator), in the order the papers print them.
VOC_METRICS = ("AP50", "AP", "AP75")
SUMMARY_LVIS = ("AP", "APr", "APc", "APf")
TASK_LABEL = {"bbox": "box", "segm": "mask"}
FREQUENCY_LABEL = {"r": "rare", "c": "common", "f": "frequent"}
#: Titles of the precision–recall panels, one per curve of :data:`transfer.scoring.CURVES`.
#: The legend gives each curve's mean, which is the metric named in the title.
CURVE_TITLE = {"IoU=0.50": "IoU 0.50, all areas (AP50)", "IoU=0.75": "IoU 0.75, all areas (AP75)",
               "small": "small, IoU 0.50:0.95 (APs)", "medium": "medium, IoU 0.50:0.95 (APm)",
               "large": "large, IoU 0.50:0.95 (APl)"}


def clean_metrics(task_results: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline metrics of one task (per-category APs dropped; None, NaN or < 0 -> None:
    results.json itself holds None for a metric with nothing to measure)."""
    out: dict[str, float | None] = {}
    for name in LVIS_METRICS:
        if name in task_results:
            value = task_results[name]
            value = math.nan if value is None else float(value)
            out[name] = None if math.isnan(value) or value < 0 else round(value, 4)
    return out


def metric_names(results: Mapping[str, Any]) -> tuple[str, ...]:
    """COCO's six metrics, LVIS's nine when the results have APr/APc/APf, or Pascal VOC's
    three (AP50, AP, AP75: no area ranges) when they have AP50 but no APs."""
    lvis = any("APr" in results.get(t, {}) for t in TASKS)
    if lvis:
        return LVIS_METRICS
    present = [results[t] for t in TASKS if isinstance(results.get(t), Mapping)]
    if present and all("AP50" in m and "APs" not in m for m in present):
        return VOC_METRICS
    return COCO_METRICS


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


def category_tables(categories: Sequence[Mapping[str, Any]],
                    columns: Sequence[tuple[str, Mapping[int, float | None]]]) -> list[str]:
    """Markdown lines of a per-category AP table (LVIS: one per frequency group), folded.

    Args:
        categories: ``{"id", "name"[, "frequency"]}`` in table order.
        columns: (header, AP by category id) pairs; a category with no AP in any column
            (no ground truth in the test set) is left out and counted below the tables.
    """
    rows = [c for c in categories if any(col.get(c["id"]) is not None for _, col in columns)]
    if not rows:
        return []
    lvis = any("frequency" in c for c in rows)
    sections = ([(f"{FREQUENCY_LABEL[f]} categories", [c for c in rows if c.get("frequency") == f])
                 for f in FREQUENCY_LABEL] if lvis else [("all categories", rows)])
    lines = []
    for label, cats in sections:
        if not cats:
            continue
        lines += ["<details>", f"<summary>AP per category: {label} ({len(cats)})</summary>", "",
                  "| category | " + " | ".join(h for h, _ in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        lines += [f"| {c['name']} | " + " | ".join(_fmt(col.get(c["id"])) for _, col in columns)
                  + " |" for c in cats]
        lines += ["", "</details>", ""]
    left_out = len(categories) - len(rows)
    if left_out:
        lines += [f"{left_out} categories without ground truth in the test set are not listed.",
                  ""]
    return lines


def _category_ap(results: Mapping[str, Any], task: str) -> dict[int, float | None]:
    return {c["id"]: c.get("AP") for c in results.get("per_category", {}).get(task, [])}


def _categories(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The categories of the first run that lists them (every run of a group has one test set)."""
    for run in runs:
        for cats in run.get("per_category", {}).values():
            return [{k: v for k, v in c.items() if k != "AP"} for c in cats]
    return []


def write_run_results(output_dir: str | Path, metrics: Mapping[str, Mapping[str, Any]],
                      info: Mapping[str, Any],
                      details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``results.json`` and ``report.md`` for one run; return the results dict.

    Args:
        output_dir: the run directory.
        metrics: ``{"bbox": {...}, "segm": {...}}`` as Detectron2's evaluators return them.
        info: what identifies the run (method, config, seed, datasets, weights, ...).
        details: ``per_category`` and ``pr_curves`` per task, as
            :func:`transfer.scoring.details` gives them; kept for the tasks in ``metrics``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(info)
    for task in TASKS:
        if task in metrics:
            results[task] = clean_metrics(metrics[task])
    for key in ("per_category", "pr_curves"):
        part = {t: v for t, v in (details or {}).get(key, {}).items() if t in results}
        if part:
            results[key] = part
    title = " — ".join(str(info[k]) for k in ("method", "config") if info.get(k))
    lines = [f"# {title or 'Evaluation'}", ""]
    if info.get("test_dataset"):
        lines += [f"Test set: `{info['test_dataset']}`", ""]
    lines += [run_table(results), ""]
    facts = [f"- {k}: `{info[k]}`" for k in ("weights", "iterations", "total_batch", "base_lr",
                                             "seed", "predictions", "evaluator") if k in info]
    if facts:
        lines += facts + [""]
    tables = category_tables(_categories([results]),
                             [(f"AP<sup>{TASK_LABEL[t]}</sup>", _category_ap(results, t))
                              for t in TASKS if t in results.get("per_category", {})])
    if tables:
        lines += ["## Per-category AP", ""] + tables
    write_text(out / "report.md", "\n".join(lines))
    write_json(out / "results.json", results)  # last: a sweep takes it for "this run finished"
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TransferError(path, f"not valid JSON ({err})") from None
    except RecursionError:
        raise TransferError(path, "not valid JSON (nested too deeply)") from None
    except OSError as err:
        raise TransferError(path, f"cannot read it ({err.strerror or err})") from None
    if not isinstance(data, dict) or not any(t in data for t in TASKS):
        raise TransferError(path, "not a results.json of m2t-transfer (no bbox/segm metrics)")
    for task in TASKS:
        if task not in data:
            continue
        if not isinstance(data[task], dict):
            raise TransferError(path, f"field {task} is not an object of metrics")
        for name, value in data[task].items():
            # null is what we write for a metric that could not be computed
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool)
                                          and math.isfinite(value)):
                raise TransferError(path, f"field {task}.{str(name)[:40]} is not a number or "
                                          f"null")
    for key in ("method", "config", "test_dataset"):
        if key in data and not isinstance(data[key], (str, int, float)):
            raise TransferError(path, f"field {key} is not a name")
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

    Headline metrics: AP, AP50, AP75 per task (COCO), AP, APr, APc, APf per task (LVIS), AP50,
    AP, AP75 (Pascal VOC).

    Returns ``{(config, test set): {"metrics": [(task, name), ...], "categories": [...],
    "rows": {method: {"n": runs, "seeds": [...], (task, name): (mean, std) or None,
    "per_run": [{"seed", "run_dir", "values": {(task, name): value or None}}, ...],
    "per_category": {task: {category id: mean AP}}, "curves": {task: {curve: [mean
    precision at each recall]}}}}}}`` (the last two from the runs that have them).
    """
    groups: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list))
    for run in runs:
        key = (str(run.get("config", "?")), str(run.get("test_dataset", "?")))
        groups[key][str(run["method"])].append(run)
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    for key, methods in groups.items():
        all_runs = [r for rs in methods.values() for r in rs]
        kind = metric_names({t: {m: 0 for r in all_runs for m in r.get(t, {})}
                             for t in TASKS if any(t in r for r in all_runs)})
        names = (SUMMARY_LVIS if kind == LVIS_METRICS else VOC_METRICS if kind == VOC_METRICS
                 else SUMMARY_COCO)
        metrics = [(t, n) for t in TASKS if any(t in r for r in all_runs) for n in names]
        rows: dict[str, dict[Any, Any]] = {}
        for method, method_runs in methods.items():
            row: dict[Any, Any] = {"n": len(method_runs),
                                   "seeds": [r.get("seed") for r in method_runs]}
            for task, name in metrics:
                values = [r[task][name] for r in method_runs
                          if r.get(task, {}).get(name) is not None]
                row[(task, name)] = mean_std(values) if values else None
            row["per_run"] = [{"seed": r.get("seed"), "run_dir": r.get("run_dir"),
                               "values": {m: r.get(m[0], {}).get(m[1]) for m in metrics}}
                              for r in method_runs]
            row["per_category"] = {t: _mean_by_key([_category_ap(r, t) for r in method_runs])
                                   for t in TASKS if any(t in r.get("per_category", {})
                                                         for r in method_runs)}
            row["curves"] = {t: {c: _mean_curve([r["pr_curves"][t].get(c) for r in method_runs
                                                 if t in r.get("pr_curves", {})])
                                 for c in CURVES}
                             for t in TASKS if any(t in r.get("pr_curves", {})
                                                   for r in method_runs)}
            rows[method] = row
        summary[key] = {"metrics": metrics, "rows": rows, "categories": _categories(all_runs)}
    return summary


def _mean_by_key(maps: Sequence[Mapping[int, float | None]]) -> dict[int, float | None]:
    """Per key, the mean of the values that are not None (None if there are none)."""
    out: dict[int, float | None] = {}
    for key in dict.fromkeys(k for m in maps for k in m):
        values = [m[key] for m in maps if m.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    return out


def _mean_curve(curves: Sequence[Sequence[float | None] | None]) -> list[float] | None:
    """Pointwise mean of the runs' curves (NaN where a run has no value); None if none."""
    curves = [c for c in curves if c and any(v is not None for v in c)]
    if not curves:
        return None
    return [statistics.fmean(v if v is not None else math.nan for v in point)
            for point in zip(*curves, strict=True)]


def _fmt_mean_std(cell: tuple[float, float | None] | None) -> str:
    if cell is None:
        return "–"
    mean, std = cell
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def per_run_table(group: Mapping[str, Any]) -> list[str]:
    """Markdown lines of the values behind a group's means: one row per run (seed)."""
    metrics = group["metrics"]
    lines = ["Per seed:", "",
             "| method | seed | " + " | ".join(f"{n}<sup>{TASK_LABEL[t]}</sup>"
                                              for t, n in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for method, row in group["rows"].items():
        for run in row["per_run"]:
            seed = "–" if run["seed"] is None else str(run["seed"])
            lines.append(f"| {method} | {seed} | "
                         + " | ".join(_fmt(run["values"][m]) for m in metrics) + " |")
    return lines + [""]


def summary_json(summary: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """:func:`summarize` as JSON data: one entry per (config, test set), one per method
    inside, each metric as ``{"mean", "std", "values": [one per run]}`` (full precision)."""
    out = []
    for (config, dataset), group in summary.items():
        methods = {}
        for method, row in group["rows"].items():
            metrics: dict[str, dict[str, Any]] = {}
            for task, name in group["metrics"]:
                cell = row[(task, name)]
                metrics.setdefault(task, {})[name] = {
                    "mean": cell[0] if cell else None, "std": cell[1] if cell else None,
                    "values": [run["values"][(task, name)] for run in row["per_run"]]}
            methods[method] = {"runs": row["n"], "seeds": row["seeds"],
                               "run_dirs": [run["run_dir"] for run in row["per_run"]],
                               "metrics": metrics}
        out.append({"config": config, "test_dataset": dataset, "methods": methods})
    return out


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
        if any(row["n"] > 1 for row in group["rows"].values()):
            lines += per_run_table(group)
        columns = [(f"{method} AP<sup>{TASK_LABEL[t]}</sup>", row["per_category"][t])
                   for t in TASKS for method, row in group["rows"].items()
                   if t in row.get("per_category", {})]
        tables = category_tables(group.get("categories", []), columns)
        if tables:
            lines += ["### Per-category AP (mean over each method's runs)", ""] + tables
    lines.append("Mean ± sample standard deviation over the runs (seeds) of each method.")
    return "\n".join(lines) + "\n"


def plot_summary(summary: Mapping[tuple[str, str], Mapping[str, Any]], path: Path) -> None:
    """The report's figure: AP (box and mask) per method with std error bars, one panel a
    group; below, for each group and task whose runs have curves, the precision–recall
    curves of each method (IoU 0.50 and 0.75 over all areas, then small / medium / large)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary.items())
    curve_rows = [(key, group, task) for key, group in groups for task in TASKS
                  if any(task in row.get("curves", {}) for row in group["rows"].values())]
    width = max(5.0, 4.5 * len(groups), 17.0 if curve_rows else 0.0)
    heights = [4.2] + [3.3] * len(curve_rows)
    fig = plt.figure(figsize=(width, sum(heights)), layout="constrained")
    subfigs = fig.subfigures(len(heights), 1, squeeze=False, height_ratios=heights)[:, 0]
    axes = subfigs[0].subplots(1, len(groups), squeeze=False)
    for index, ((config, dataset), group) in enumerate(groups):
        ax = axes[0][index]
        shown = list(group["metrics"])
        methods = list(group["rows"])
        width_bar = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            cells = [group["rows"][method][m] for m in shown]
            means = [c[0] if c else 0.0 for c in cells]
            stds = [(c[1] or 0.0) if c else 0.0 for c in cells]
            xs = [j + (i - (len(methods) - 1) / 2) * width_bar for j in range(len(shown))]
            ax.bar(xs, means, width_bar, yerr=stds, capsize=3, label=method)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([f"{n}\n{TASK_LABEL[t]}" for t, n in shown])
        ax.set_ylabel("AP (%)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{config}\n{Path(dataset).name}", fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=min(3, len(methods)), frameon=False)
    for sub, ((config, dataset), group, task) in zip(subfigs[1:], curve_rows, strict=True):
        sub.suptitle(f"{config} on {Path(dataset).name}: {TASK_LABEL[task]} precision–recall "
                     f"(mean over categories, mean over runs)", fontsize=9)
        panels = sub.subplots(1, len(CURVES), sharey=True, squeeze=False)[0]
        for ax, curve in zip(panels, CURVES, strict=True):
            for method, row in group["rows"].items():
                values = row.get("curves", {}).get(task, {}).get(curve)
                if values is not None and not all(map(math.isnan, values)):
                    ax.plot(RECALL, values, linewidth=1.2,
                            label=f"{method} {statistics.fmean(values) * 100:.1f}")
            ax.set_title(CURVE_TITLE[curve], fontsize=8)
            if ax.get_lines():
                ax.legend(fontsize=7, loc="upper right")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("recall", fontsize=8)
            ax.grid(alpha=0.3)
        panels[0].set_ylabel("precision", fontsize=8)
    replace_file(path, lambda f: fig.savefig(f, dpi=110, format=Path(path).suffix[1:] or "png"))
    plt.close(fig)


def write_report(run_dirs: Sequence[str | Path], out: str | Path) -> tuple[Path, Path]:
    """Put the runs in ``run_dirs`` side by side: ``<out>/report.md`` and ``<out>/report.png``
    (and ``<out>/report.json``: the same numbers at full precision, :func:`summary_json`)."""
    found = find_runs(run_dirs)
    out_dir = Path(out)
    for results in found:
        if out_dir.exists() and out_dir.is_dir() and out_dir.samefile(results.parent):
            raise TransferError(out_dir, "--output-dir is one of the run directories: its own "
                                         "report.md would be replaced; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise TransferError(out_dir, "--output-dir is a file, not a folder")
    runs = [load_run(p) for p in found]
    summary = summarize(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "report.md", out_dir / "report.png"
    for path, text in ((md, summary_markdown(summary)),
                       (md.with_suffix(".json"), json.dumps(summary_json(summary), indent=2))):
        write_text(path, text)  # never half a report
    plot_summary(summary, png)
    return md, png
