"""``memprop sweep``, ``memprop frontier`` and ``memprop results``: run an experiment spec
trial by trial in isolated processes, find its out-of-memory frontier, list what is
stored."""

from __future__ import annotations

import json
import pathlib

from memprop.cli._common import (
    add_command,
    check_database,
    check_output_dir,
    check_output_file,
    database_of,
    positive_int,
    render_table,
    table_rows,
)
from memprop.cli._progress import Spinner, SweepBar
from memprop.errors import ConfigError
from memprop.units import format_bytes

RESULT_COLUMNS = ["model", "batch", "strategy", "status", "phase", "saved_bytes", "peak_bytes",
                  "predicted_peak_bytes", "inference_peak_bytes", "step_ms", "duration_s"]

# a sharded trial's ranks (a spec's [parallel]; memprop.sweep.parallel), when any is
# stored; FSDP2's knobs too where the trials vary them
SHARDED_COLUMNS = ["world_size", "tp", "replicate", "predicted"]
SHARDED_KNOBS = ["reshard_after_forward", "mixed_precision", "offload"]

FRONTIER_DOC = """``memprop frontier``: for each depth and strategy of a spec's [frontier] table,
the largest batch that fits its memory budget. Predicted on fake tensors first, then
confirmed by real trials under the real budget: the batch fits, and one step more runs
out of memory. Every trial is stored in the spec's results database."""

RESULTS_DOC = """``memprop results``: list the trials stored for a spec (its default database)
or a results database (.sqlite), one row per trial, and its out-of-memory frontier if
any. Sizes in binary units, times to 3 significant digits, "-" where nothing was
measured; --csv exports every column in raw units, --json prints them."""


def add_parser(sub) -> None:
    p = add_command(sub, "sweep", help="run an experiment spec (and its frontier, if any)",
                    doc=__doc__)
    p.add_argument("spec", help="a TOML spec, e.g. experiments/quickstart.toml")
    p.add_argument("--db", help="results database (default: reports/<spec name>/results.sqlite)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="trials at a time (1 keeps timings clean)")
    p.add_argument("--force", action="store_true", help="redo trials already stored")
    p.add_argument("--no-frontier", action="store_true", help="skip the [frontier] table")
    p.add_argument("--quiet", action="store_true", help="no progress bar, even on a terminal")
    p.add_argument("--executor", choices=("local", "ray"), help="where trials run (default: "
                   "the spec's [run] executor, else local); ray: tasks on a Ray cluster")
    p.add_argument("--ray-address", help="the Ray cluster (default: $RAY_ADDRESS, else a "
                   "local one started for this run)")
    p.set_defaults(func=sweep_command)

    f = add_command(sub, "frontier", help="the largest batch that fits a budget, per depth "
                    "and strategy: predicted, then confirmed by real trials", doc=FRONTIER_DOC)
    f.add_argument("spec", help="a TOML spec with a [frontier] table")
    f.add_argument("--db", help="results database (default: reports/<spec name>/results.sqlite)")
    f.add_argument("--json", action="store_true", help="print the frontier points as JSON")
    f.add_argument("--executor", choices=("local", "ray"), help="where trials run (default: "
                   "the spec's [run] executor, else local); ray: tasks on a Ray cluster")
    f.add_argument("--ray-address", help="the Ray cluster (default: $RAY_ADDRESS, else a "
                   "local one started for this run)")
    f.set_defaults(func=frontier_command)

    r = add_command(sub, "results", help="list the trials stored for a spec or database",
                    doc=RESULTS_DOC)
    r.add_argument("source", help="a spec (.toml) or a results database (.sqlite)")
    r.add_argument("--csv", metavar="FILE", help="export every column to a CSV file "
                   "(default: print a table)")
    r.add_argument("--all-columns", action="store_true", help="print every column")
    r.add_argument("--json", action="store_true", help="print every trial (and the frontier) "
                   "as JSON, raw units")
    r.set_defaults(func=results_command)


def _spec_and_db(args, command: str):
    """The validated spec and its database path, both checked before any trial runs."""
    from memprop.sweep.spec import load_spec
    from memprop.sweep.store import default_db_path

    spec = load_spec(args.spec)           # validates everything before any trial starts
    if command == "frontier" and spec.frontier is None:
        raise ConfigError(f"memprop frontier: {args.spec} has no [frontier] table; add one "
                          "with budget, depths and strategies (see experiments/oom_frontier.toml)")
    db = pathlib.Path(args.db) if args.db else default_db_path(spec.name)
    if not db.parent.exists():       # a new store's folder is made, where it can be
        check_output_dir(db.parent, "--db", command)
        db.parent.mkdir(parents=True)
    return spec, check_database(db, "--db", command, must_exist=False)


def _executor(args, spec, workers: int = 1):
    """The executor the options or the spec name (local processes, or Ray tasks)."""
    from memprop.sweep.ray_executor import make_executor

    return make_executor(args.executor or spec.run.executor, workers=workers,
                         ray_address=args.ray_address)


def _run_frontier(spec, db, *, quiet: bool, echo: bool, executor=None) -> list:
    """Run the frontier under a spinner (on a terminal), printing each point as the
    library finds it unless ``echo`` is off."""
    from memprop.sweep.frontier import run_frontier

    field = spec.frontier.field
    with Spinner("frontier: predicting, then confirming with real trials",
                 enabled=False if quiet else None) as spinner:
        def show(point) -> None:
            spinner.clear()
            print(_frontier_line(field, point), flush=True)
        return run_frontier(spec, db_path=db, progress=show if echo else None,
                            executor=executor)


def _frontier_line(field: str, point) -> str:
    oom = ("no batch up to the spec's max_batch ran out of memory"
           if point.first_oom_batch is None else f"{point.first_oom_batch} ran out of memory")
    return (f"  {field} {point.depth:>4} {point.strategy:>12}: predicted batch "
            f"{point.predicted_batch}, confirmed {point.confirmed_batch} ({oom}) in "
            f"{point.real_trials} real trials; a doubling search needs "
            f"{point.probe_trials_doubling}")


def sweep_command(args) -> int:
    from memprop.sweep.runner import run_sweep
    from memprop.sweep.store import ResultsStore

    spec, db = _spec_and_db(args, "sweep")
    trials = spec.trials()
    print(f"{spec.name}: {len(trials)} trials -> {db}")
    with ResultsStore(db) as store:
        stored = set() if args.force else store.keys()
    bar = SweepBar(sum(t.key() not in stored for t in trials),
                   enabled=False if args.quiet else None)
    noisy: list[str] = []      # why each trial's times are unusable, if they are

    def on_result(trial, result: dict) -> None:
        bar.update(trial, result)
        if result.get("timing_noisy"):
            noisy.append(result.get("timing_noisy_reason") or "")
    try:
        summary = run_sweep(spec, db_path=db, workers=args.workers, force=args.force,
                            executor=_executor(args, spec, args.workers), on_result=on_result)
    finally:
        bar.close()
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items())) or "nothing new"
    print(f"ran {summary.ran} ({counts}); {summary.skipped} already stored")
    if noisy:
        print(noisy_line(noisy, summary.ran))
    if summary.interrupted:
        print(f"interrupted: every finished trial is stored in {db}; rerun to resume")
        return 130
    if spec.frontier is not None and not args.no_frontier:
        print(f"frontier at a budget of {format_bytes(spec.frontier.budget_bytes)}:")
        _run_frontier(spec, db, quiet=args.quiet, echo=True, executor=_executor(args, spec))
    return 0


def noisy_line(reasons: list[str], ran: int) -> str:
    """One line on the trials whose times are unusable (NOTE [ When a step's times are
    unusable ], memprop.sweep.worker), counted by reason."""
    counts = {what: sum(f"{kind}:" in r for r in reasons)
              for kind, what in (("load", "under load"), ("spread", "with a wide spread"))}
    why = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
    return (f"times unusable in {len(reasons)} of {ran} trials ({why}; column "
            "timing_noisy_reason): rerun them on a quiet machine with --force")


def frontier_command(args) -> int:
    import dataclasses

    spec, db = _spec_and_db(args, "frontier")
    if not args.json:
        print(f"{spec.name}: frontier at a budget of "
              f"{format_bytes(spec.frontier.budget_bytes)} -> {db}")
    points = _run_frontier(spec, db, quiet=False, echo=not args.json,
                           executor=_executor(args, spec))
    if args.json:
        print(json.dumps({"spec": spec.name, "db": str(db), "field": spec.frontier.field,
                          "points": [dataclasses.asdict(p) for p in points]}, indent=2))
    return 0


def results_command(args) -> int:
    from memprop.report.data import mark_unmeasured
    from memprop.sweep.store import ResultsStore

    db = database_of(args.source, "results")
    csv = args.csv and check_output_file(args.csv, "--csv", "results")
    with ResultsStore(db) as store:
        frame = mark_unmeasured(store.results())
        frontier = store.frontier()
    if csv:
        frame.to_csv(csv, index=False)
        print(f"{len(frame)} trials written to {csv}")
        return 0
    if args.json:
        print(json.dumps({"db": str(db), "trials": table_rows(frame),
                          "frontier": table_rows(frontier)}, indent=2))
        return 0
    if frame.empty:
        print(f"{db}: no trials stored; run 'memprop sweep SPEC' to fill it")
        return 0
    cfg = [c for c in frame.columns if c.startswith("cfg_")
           and frame[c].nunique(dropna=True) > 1]
    sharded = [c for c in SHARDED_COLUMNS if "world_size" in frame and c in frame] + [
        c for c in SHARDED_KNOBS if c in frame and frame[c].nunique(dropna=False) > 1]
    cols = list(frame.columns) if args.all_columns else [
        c for c in ["model", *cfg, *sharded, *RESULT_COLUMNS[1:]] if c in frame.columns]
    counts = frame.status.value_counts().to_dict()
    print(f"{db}: {len(frame)} trials (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")")
    print(render_table(frame[cols]))
    if not frontier.empty:
        print("\nfrontier:")
        print(render_table(frontier.drop(columns=["spec", "point_key"])))
    return 0
