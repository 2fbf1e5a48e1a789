"""``m2t-transfer train --seeds N ... [--methods NAME=WEIGHTS ...]``: one fine-tuning per seed
(and per initialisation), then one report of them all.

Each run (a *cell*) goes into its own folder: ``OUTPUT_DIR/seed_N/`` with ``--seeds`` alone,
``OUTPUT_DIR/NAME/seed_N/`` with ``--methods``. Here the cells run one after the other; with
``--slurm`` they are one submitit job array. Then ``OUTPUT_DIR/report.md`` (+ ``report.png``,
``report.json``) is written by :func:`transfer.report.write_report`: per config and test set,
one row per method with mean ± std over its seeds, and each seed's values.

Running the same command again skips the cells that finished (their ``results.json`` is
there) and resumes the others from their last checkpoint. A cell that fails is reported and
the others still run; the exit status is then 1.

The sweep is given the command's :class:`~transfer.request.RunRequest` (its ``seeds`` and
``methods`` as given); each cell's run is that request with the cell's weights, method,
folder and seed put in by :func:`dataclasses.replace`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import TransferError
from .request import RunRequest

#: A method name: it names a folder.
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Cell:
    """One fine-tuning of the sweep: its seed, and the request that runs it."""

    seed: int
    request: RunRequest

    @property
    def method(self) -> str:
        return str(self.request.method)

    @property
    def output_dir(self) -> Path:
        return Path(str(self.request.output_dir))

    @property
    def label(self) -> str:
        return f"{self.method} seed {self.seed}"


def add_sweep_options(parser: Any) -> None:
    g = parser.add_argument_group("seed sweeps")
    g.add_argument("--seeds", nargs="+", metavar="N", default=None,
                   help="one fine-tuning per seed into OUTPUT_DIR/seed_N/, then report.md "
                        "with mean ± std over them at OUTPUT_DIR")
    g.add_argument("--methods", nargs="+", metavar="NAME=WEIGHTS", default=None,
                   help="several initialisations (converted .pkl files) instead of --weights, "
                        "each into OUTPUT_DIR/NAME/seed_N/; one report row per method")


def check_seeds(values: Sequence[str]) -> list[int]:
    if not values:
        raise TransferError("--seeds", "give at least one seed, e.g. --seeds 0 1 2")
    seeds: list[int] = []
    for value in values:
        if not re.fullmatch(r"[+-]?\d+", value):
            raise TransferError("--seeds", f"{value!r} is not a whole number")
        seed = int(value)
        if not 0 <= seed <= MAX_SEED:
            raise TransferError("--seeds", f"{seed} is out of range: seeds are between 0 and "
                                           f"{MAX_SEED}")
        if seed in seeds:
            raise TransferError("--seeds", f"{seed} is given twice")
        seeds.append(seed)
    return seeds


def check_methods(values: Sequence[str]) -> list[tuple[str, str]]:
    if not values:
        raise TransferError("--methods", "give at least one NAME=WEIGHTS")
    methods: list[tuple[str, str]] = []
    for value in values:
        name, sep, weights = value.partition("=")
        if not sep or not name or not weights:
            raise TransferError("--methods", f"{value!r} is not NAME=WEIGHTS (a name for the "
                                             f"report, = , a converted .pkl)")
        if not METHOD_NAME.match(name):
            raise TransferError("--methods", f"{name!r}: a method name is letters, digits and "
                                             f". _ + - (it names a folder)")
        if any(name == other for other, _ in methods):
            raise TransferError("--methods", f"{name!r} is given twice")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise TransferError(path, f"weights file not found (--methods {name}=...)")
        methods.append((name, str(path)))
    return methods


def plan(request: RunRequest) -> tuple[Path, list[Cell]]:
    """The sweep's folder and cells, every option checked first (TransferError, one line)."""
    from .config import config_label, load_config
    from .train import _method_of

    seeds = check_seeds(request.seeds) if request.seeds is not None else None
    opts = list(request.overrides)
    keys = opts[::2]
    if seeds is not None and "SEED" in keys:
        raise TransferError("SEED", "set by --seeds; leave it out of the overrides")
    if request.methods is not None:
        for flag, value in (("--weights", request.weights), ("--method", request.method)):
            if value is not None:
                raise TransferError(flag, "not with --methods, which names each method and "
                                          "its weights (NAME=WEIGHTS)")
        methods = check_methods(request.methods)
    else:
        if request.weights is None:
            raise TransferError("--weights", "required (or --methods NAME=WEIGHTS ...)")
        weights = Path(request.weights).expanduser()
        if not weights.is_file():
            raise TransferError(weights, "weights file not found")
        methods = [(request.method or _method_of(weights), str(weights))]
    if seeds is None:  # --methods alone: the SEED override, or 0
        index = keys.index("SEED") if "SEED" in keys else None
        seeds = check_seeds([opts[2 * index + 1]] if index is not None else ["0"])
        if index is not None:
            del opts[2 * index:2 * index + 2]
    load_config(request.config, [*opts, "SEED", str(seeds[0])])  # a bad config: one line, now
    label = config_label(request.config)
    if request.output_dir:
        root = Path(request.output_dir)
    else:
        root = Path("output", "transfer", label)
        if request.methods is None:
            root = root / methods[0][0]
    if root.exists() and not root.is_dir():
        raise TransferError(root, "--output-dir is a file, not a folder")
    # every cell resumes: running the sweep again continues its unfinished runs
    base = replace(request, seeds=None, methods=None, resume=True)
    cells = [Cell(seed, replace(
                 base, weights=weights, method=name, overrides=(*opts, "SEED", str(seed)),
                 output_dir=str(root / name / f"seed_{seed}" if request.methods is not None
                                else root / f"seed_{seed}")))
             for name, weights in methods for seed in seeds]
    return root, cells


def finished(cell: Cell) -> bool:
    """The cell's run wrote its final metrics (a readable ``results.json``)."""
    from .report import load_run

    path = cell.output_dir / "results.json"
    if not path.is_file():
        return False
    try:
        load_run(path)
    except TransferError:
        return False
    return True


@contextlib.contextmanager
def own_logging() -> Iterator[None]:
    """Remove the log handlers a run added (Detectron2's console and ``log.txt`` ones) when
    it ends: the next run in this process must not write into this one's log, nor twice."""
    def handlers() -> dict[str, list[logging.Handler]]:
        names = [None, *logging.root.manager.loggerDict]
        return {str(n): list(logging.getLogger(n).handlers) for n in names
                if n is None or isinstance(logging.getLogger(n), logging.Logger)}

    before = handlers()
    try:
        yield
    finally:
        for name, now in handlers().items():
            logger = logging.getLogger(None if name == "None" else name)
            for handler in now:
                if handler not in before.get(name, []):
                    logger.removeHandler(handler)
                    handler.close()


def _reason(err: BaseException) -> str:
    if isinstance(err, TransferError):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def run_here(cells: Sequence[Cell]) -> dict[Cell, str]:
    """Run the unfinished cells one after the other; ``{cell: why it failed}``."""
    from .train import run

    failed: dict[Cell, str] = {}
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {cell.label}"
        if finished(cell):
            print(f"{tag}: finished before, skipped ({cell.output_dir / 'results.json'})",
                  flush=True)
            continue
        print(f"{tag}: fine-tuning into {cell.output_dir}", flush=True)
        with own_logging():
            try:
                run(cell.request)
            except Exception as err:  # noqa: BLE001 - reported; the other cells still run
                failed[cell] = _reason(err)
                if not isinstance(err, TransferError):
                    traceback.print_exc()
                print(f"{tag}: failed: {failed[cell]}", file=sys.stderr, flush=True)
    return failed


def run_on_slurm(opts: Any, root: Path, cells: Sequence[Cell]) -> \
        tuple[dict[Cell, str], bool]:
    """Submit the unfinished cells as one job array; with ``--wait``, wait for them.

    Returns the failed cells and whether the report can be written now (all ended)."""
    from .slurm import announce, announce_array, job_device, results_of, submit_jobs
    from .train import prepare

    failed: dict[Cell, str] = {}
    todo = []
    # the same MODEL.DEVICE override (if any) in every cell
    device = job_device(cells[0].request.overrides, opts)
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {cell.label}"
        if finished(cell):
            print(f"{tag}: finished before, skipped ({cell.output_dir / 'results.json'})")
            continue
        try:
            todo.append((cell, prepare(cell.request.for_job(opts.nodes, opts.tasks_per_node,
                                                            device))))
        except TransferError as err:
            failed[cell] = str(err)
            print(f"{tag}: not submitted: {err}", file=sys.stderr, flush=True)
    if not todo:
        return failed, True
    folder = root.resolve() / "slurm"
    jobs = submit_jobs(opts, [job for _, job in todo], folder, f"m2t-transfer-{root.name}")
    labels = [f"{cell.label} -> {cell.output_dir}" for cell, _ in todo]
    if len(jobs) == 1:
        announce(jobs[0], opts, folder)
        print(f"  job {jobs[0].job_id}: {labels[0]}")
    else:
        announce_array(jobs, labels, opts, folder)
    if not opts.wait:
        print(f"when the jobs have ended, run the same command again: it skips the finished "
              f"runs and writes {root / 'report.md'}", flush=True)
        return failed, False
    print(f"waiting for {len(jobs)} job(s) and their requeues", flush=True)
    for (cell, _), outcome in zip(todo, results_of(dict(enumerate(jobs))).values(),
                                  strict=True):
        if isinstance(outcome, TransferError):
            failed[cell] = str(outcome)
            print(f"{cell.label}: failed: {outcome}", file=sys.stderr, flush=True)
    return failed, True


def run_sweep(request: RunRequest, opts: Any = None) -> int:
    """The ``train --seeds/--methods`` command; returns the exit status.

    ``opts``: the ``--slurm`` job options (:func:`transfer.slurm.check_job_options`), or
    None to run the cells here."""
    from .report import write_report

    root, cells = plan(request)
    if opts is not None:
        failed, ended = run_on_slurm(opts, root, cells)
    else:
        failed, ended = run_here(cells), True
    done = [cell for cell in cells if finished(cell)]
    if ended and done:
        md, png = write_report([cell.output_dir for cell in done], root)
        print(md.read_text(), end="")
        print(f"wrote {md}, {png} and {md.with_suffix('.json')}")
    if failed:
        print(f"error: {len(failed)} of {len(cells)} runs failed: "
              + "; ".join(f"{cell.label} ({reason})" for cell, reason in failed.items()),
              file=sys.stderr)
        return 1
    return 0
