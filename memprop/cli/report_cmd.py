"""``memprop report``: turn a results store into report.md, a self-contained report.html,
figures (PNG and SVG) and CSV tables, with a verdict on each of the notes' claims
computed from the data."""

from __future__ import annotations

from memprop.report.render import build_report


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write the report of a sweep's results",
                       description=__doc__)
    p.add_argument("source", help="a spec (.toml) or a results database (.sqlite)")
    p.add_argument("-o", "--out", help="output folder (default: the results' folder)")
    p.add_argument("--dpi", type=int, default=90, help="PNG resolution (default 90)")
    p.set_defaults(func=report_command)


def report_command(args) -> int:
    files = build_report(args.source, args.out, dpi=args.dpi)
    folder = files["report.md"].parent
    figures = sum(1 for k in files if k.endswith(".png"))
    print(f"report written to {folder}: report.md, report.html, {figures} figures "
          "(PNG + SVG), trials.csv, frontier.csv, claims.csv")
    claims = (folder / "claims.csv").read_text().splitlines()[1:]
    for line in claims:
        print("  " + line)
    return 0
