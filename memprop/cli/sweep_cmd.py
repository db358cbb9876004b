"""``memprop sweep``, ``memprop frontier`` and ``memprop results``: run an experiment spec
trial by trial in isolated processes, find its out-of-memory frontier, list what is
stored."""

from __future__ import annotations

import pathlib

from memprop.cli._common import render_table
from memprop.errors import ConfigError
from memprop.sweep.frontier import run_frontier
from memprop.sweep.ray_executor import EXECUTORS, make_executor
from memprop.sweep.runner import run_sweep
from memprop.sweep.spec import load_spec
from memprop.sweep.store import ResultsStore, default_db_path, resolve_source
from memprop.units import format_bytes

RESULT_COLUMNS = ["model", "batch", "strategy", "status", "phase", "saved_bytes", "peak_bytes",
                  "predicted_peak_bytes", "inference_peak_bytes", "step_ms", "duration_s"]


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run an experiment spec (and its frontier, if any)",
                       description=__doc__)
    p.add_argument("spec", help="a TOML spec, e.g. experiments/quickstart.toml")
    p.add_argument("--db", help="results database (default reports/<name>/results.sqlite)")
    p.add_argument("--workers", type=int, default=1,
                   help="trials at a time (default 1, which keeps timings clean)")
    p.add_argument("--force", action="store_true", help="redo trials already stored")
    p.add_argument("--no-frontier", action="store_true", help="skip the [frontier] table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--executor", choices=EXECUTORS, help="where trials run (default: the "
                   "spec's [run] executor, else local); ray: tasks on a Ray cluster")
    p.add_argument("--ray-address", help="the Ray cluster (default $RAY_ADDRESS, else a "
                   "local one for this run)")
    p.set_defaults(func=sweep_command)

    f = sub.add_parser("frontier", help="the largest batch that fits a budget, per depth "
                       "and strategy: predicted, then confirmed by real trials")
    f.add_argument("spec")
    f.add_argument("--db")
    f.add_argument("--executor", choices=EXECUTORS)
    f.add_argument("--ray-address")
    f.set_defaults(func=frontier_command)

    r = sub.add_parser("results", help="list the trials stored for a spec or database")
    r.add_argument("source", help="a spec (.toml) or a results database (.sqlite)")
    r.add_argument("--csv", metavar="FILE", help="export every column to a CSV file")
    r.add_argument("--all-columns", action="store_true", help="print every column")
    r.set_defaults(func=results_command)


def _print_point(point) -> None:
    print(f"  depth {point.depth:>4} {point.strategy:>12}: predicted batch "
          f"{point.predicted_batch}, confirmed {point.confirmed_batch} (next "
          f"{point.first_oom_batch} runs out of memory) in {point.real_trials} real trials; "
          f"a doubling search needs {point.probe_trials_doubling}", flush=True)


def _executor(args, spec, workers: int = 1):
    return make_executor(args.executor or spec.run.executor, workers=workers,
                         ray_address=args.ray_address)


def sweep_command(args) -> int:
    spec = load_spec(args.spec)           # validates everything before any trial starts
    if args.workers < 1:
        raise ConfigError(f"memprop sweep: --workers {args.workers} is not allowed; use >= 1")
    trials = spec.trials()
    db = pathlib.Path(args.db) if args.db else default_db_path(spec.name)
    print(f"{spec.name}: {len(trials)} trials -> {db}")
    summary = run_sweep(spec, db_path=db, workers=args.workers, force=args.force,
                        executor=_executor(args, spec, args.workers),
                        progress=not args.quiet)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items())) or "nothing new"
    print(f"ran {summary.ran} ({counts}); {summary.skipped} already stored")
    if summary.interrupted:
        print(f"interrupted: every finished trial is stored in {db}; rerun to resume")
        return 130
    if spec.frontier is not None and not args.no_frontier:
        print(f"frontier at a budget of {format_bytes(spec.frontier.budget_bytes)}:")
        run_frontier(spec, db_path=db, progress=_print_point, executor=_executor(args, spec))
    return 0


def frontier_command(args) -> int:
    spec = load_spec(args.spec)
    if spec.frontier is None:
        raise ConfigError(f"memprop frontier: {args.spec} has no [frontier] table; add one "
                          "with budget, depths and strategies (see experiments/oom_frontier.toml)")
    db = pathlib.Path(args.db) if args.db else default_db_path(spec.name)
    print(f"{spec.name}: frontier at a budget of {format_bytes(spec.frontier.budget_bytes)} -> {db}")
    run_frontier(spec, db_path=db, progress=_print_point, executor=_executor(args, spec))
    return 0


def results_command(args) -> int:
    db, _ = resolve_source(args.source)
    with ResultsStore(db) as store:
        frame = store.results()
        frontier = store.frontier()
    if args.csv:
        frame.to_csv(args.csv, index=False)
        print(f"{len(frame)} trials written to {args.csv}")
        return 0
    if frame.empty:
        print(f"{db}: no trials stored")
        return 0
    cfg = [c for c in frame.columns if c.startswith("cfg_")
           and frame[c].nunique(dropna=True) > 1]
    cols = frame.columns if args.all_columns else [
        c for c in ["model", *cfg, *RESULT_COLUMNS[1:]] if c in frame.columns]
    counts = frame.status.value_counts().to_dict()
    print(f"{db}: {len(frame)} trials (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")")
    shown = frame[cols].copy()
    for c in ("step_ms", "duration_s"):
        if c in shown:
            shown[c] = shown[c].map(lambda v: "" if v != v or v is None else f"{v:.2f}")
    print(render_table(shown.fillna("")))
    if not frontier.empty:
        print("\nfrontier:")
        print(render_table(frontier.drop(columns=["spec", "point_key"])))
    return 0
