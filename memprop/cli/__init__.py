"""The ``memprop`` command line: a thin entry point over the library.

Each subcommand lives in its own module as ``add_parser(subparsers)`` plus a
``*_command(args)`` that prints; the data it prints is gathered by library functions
that tests call directly. Building the parser imports no torch, pandas or matplotlib
(``memprop --help`` is instant); a command imports what it runs.

A user's mistake ends in one line on stderr naming what is wrong and what to do, and
exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

from memprop._version import __version__
from memprop.cli import backprop_cmd, fit_cmd, plan_cmd, profile_cmd, report_cmd, sweep_cmd
from memprop.errors import MemPropError

__all__ = ["main", "build_parser"]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: what is wrong, and where help is.

    A value that starts with a minus and a digit (``--budget -5MiB``, ``--repeats -1``)
    is read as a value, so that its own check names it, rather than as an unknown option
    ("expected one argument"): no memprop option starts with a digit. argparse keeps
    this rule in ``_negative_number_matcher``, which by default matches only plain
    numbers such as -5 or -0.5."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="memprop",
        description="Where training memory goes, and what activation checkpointing buys: "
                    "measured, not assumed.")
    parser.add_argument("--version", action="version", version=f"memprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in (backprop_cmd, profile_cmd, plan_cmd, fit_cmd, sweep_cmd, report_cmd):
        module.add_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # factories named package.module:factory resolve from the current folder too, as with
    # `python -m` (a console script's path does not include it); last, so it shadows nothing
    if "" not in sys.path and "." not in sys.path:
        sys.path.append("")
    # library warnings reach a person as one line each; transformers' notices stay quiet
    warnings.showwarning = _one_line_warning
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:     # --help, --version, or a usage error already printed
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MemPropError as exc:
        message = _one_line(exc)
        print(message if message.startswith("error") else f"error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (e.g. `memprop results ... | head -1`): stop writing, say so
        # once, and keep the interpreter from failing again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"memprop {args.command}: output closed early by the reader (broken pipe); "
              "the rest was not printed: write to a file instead to keep it all",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
