"""``memprop report``: turn a results store into report.md, a self-contained report.html,
figures (PNG and SVG) and CSV tables, with a verdict on each of the notes' claims
computed from the data. The report only reads the store: it measures nothing."""

from __future__ import annotations

from memprop.cli._common import add_command, check_output_dir, database_of, positive_int
from memprop.cli._progress import Spinner
from memprop.errors import ConfigError


def add_parser(sub) -> None:
    p = add_command(sub, "report", help="write the report of a sweep's results", doc=__doc__)
    p.add_argument("source", help="a spec (.toml) or a results database (.sqlite)")
    p.add_argument("-o", "--out", help="output folder (default: the database's folder)")
    p.add_argument("--dpi", type=positive_int, default=90, help="PNG resolution")
    p.set_defaults(func=report_command)


def report_command(args) -> int:
    from memprop.report.render import build_report
    from memprop.sweep.store import ResultsStore

    db = database_of(args.source, "report")
    out = check_output_dir(args.out or db.parent, "-o" if args.out else "output folder",
                           "report")
    with ResultsStore(db) as store:
        if not store.keys():
            raise ConfigError(f"memprop report: {db} holds no trials, so there is nothing to "
                              f"report; run 'memprop sweep SPEC' first (nothing was written)")
    with Spinner("drawing figures and writing the report"):
        files = build_report(args.source, out, dpi=args.dpi)
    figures = sum(1 for k in files if k.endswith(".png"))
    print(f"report written to {out}: report.md, report.html, {figures} figures "
          "(PNG + SVG), trials.csv, frontier.csv, claims.csv")
    claims = (out / "claims.csv").read_text().splitlines()[1:]
    for line in claims:
        print("  " + line)
    return 0
