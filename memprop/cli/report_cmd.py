"""``memprop report``: turn a results store into report.md, a self-contained report.html,
figures (PNG and SVG) and CSV tables, with a verdict on each of the notes' claims
computed from the data. The report only reads the store: it measures nothing.

Without -o it writes to reports/<spec name>-report/ (ignored by git, replaced on every
run); a folder given with -o that already holds a report is replaced only with --force
(or when it is the database's own folder, as `make demo` writes reports/demo/)."""

from __future__ import annotations

import pathlib
import shutil
import textwrap

from memprop.cli._common import add_command, check_output_dir, database_of, positive_int
from memprop.cli._progress import Spinner
from memprop.errors import ConfigError

# what a report folder holds: the files build_report writes
REPORT_FILES = ("report.md", "report.html", "trials.csv", "frontier.csv", "claims.csv",
                "figures")


def add_parser(sub) -> None:
    p = add_command(sub, "report", help="write the report of a sweep's results", doc=__doc__)
    p.add_argument("source", help="a spec (.toml) or a results database (.sqlite)")
    p.add_argument("-o", "--out", help="output folder (default: reports/<spec name>-report)")
    p.add_argument("--force", "--overwrite", action="store_true", dest="force",
                   help="replace the report a folder given with -o already holds")
    p.add_argument("--dpi", type=positive_int, default=90, help="PNG resolution")
    p.set_defaults(func=report_command)


def default_out(db: pathlib.Path, spec_name: str | None) -> pathlib.Path:
    """``reports/<spec name>-report``: beside the spec's default store
    (``reports/<spec name>/results.sqlite``), never the committed example's folder."""
    name = spec_name or (db.parent.name if db.stem == "results" else db.stem)
    return pathlib.Path("reports") / f"{name}-report"


def check_not_a_report(out: pathlib.Path, db: pathlib.Path, *, force: bool) -> None:
    """Refuse to replace a report ``out`` already holds, unless ``force`` or ``out`` is the
    database's own folder (its report, regenerated)."""
    held = [name + ("/" if name == "figures" else "") for name in REPORT_FILES
            if (out / name).exists()]
    if held and not force and out.resolve() != db.resolve().parent:
        raise ConfigError(f"memprop report: -o {out} already holds a report "
                          f"({', '.join(held)}); add --force to replace it, or choose another "
                          "folder")


def claims_table(claims, *, width: int | None = None) -> str:
    """The claims for people: one row each, its verdict word and the verdict's text
    wrapped under it (not CSV)."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    words = {True: "supported", False: "NOT supported", None: "no data"}
    lines = [f"  {'claim':<5}  {'verdict':<16}  evidence"]
    indent = " " * (2 + 5 + 2 + 16 + 2)
    for c in claims:
        word = words[c.supported]
        if c.supported and c.verdict.startswith("partly supported"):
            word = "partly supported"
        text = c.verdict
        for prefix in (f"{word}: ", "supported: ", "NOT supported: ", "no data: "):
            text = text.removeprefix(prefix)
        wrapped = textwrap.wrap(text, width=max(40, width - len(indent))) or [""]
        lines.append(f"  {c.id:<5}  {word:<16}  {wrapped[0]}")
        lines += [indent + line for line in wrapped[1:]]
    return "\n".join(lines)


def report_command(args) -> int:
    from memprop.report.render import build_report
    from memprop.sweep.store import ResultsStore

    db = database_of(args.source, "report")
    with ResultsStore(db) as store:
        if not store.keys():
            raise ConfigError(f"memprop report: {db} holds no trials, so there is nothing to "
                              f"report; run 'memprop sweep SPEC' first (nothing was written)")
        spec_name = store.environment().get("spec_name")
    if args.out:
        out = check_output_dir(args.out, "-o", "report")
        check_not_a_report(out, db, force=args.force)
    else:
        out = check_output_dir(default_out(db, spec_name), "output folder", "report")
    with Spinner("drawing figures and writing the report"):
        files = build_report(args.source, out, dpi=args.dpi)
    figures = sum(1 for k in files if k.endswith(".png"))
    print(f"report written to {out}: report.md, report.html, {figures} figures "
          "(PNG + SVG), trials.csv, frontier.csv, claims.csv")
    print(claims_table(files.claims))
    return 0
