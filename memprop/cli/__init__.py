"""The ``memprop`` command line: a thin entry point over the library.

Each subcommand lives in its own module as ``add_parser(subparsers)`` plus a
``*_command(args)`` that prints; the data it prints is gathered by library functions
that tests call directly.
"""

from __future__ import annotations

import argparse
import sys

from memprop._version import __version__
from memprop.errors import MemPropError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from memprop.cli import backprop_cmd, plan_cmd, profile_cmd, report_cmd, sweep_cmd

    parser = argparse.ArgumentParser(
        prog="memprop",
        description="Where training memory goes, and what activation checkpointing buys: "
                    "measured, not assumed.")
    parser.add_argument("--version", action="version", version=f"memprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (backprop_cmd, profile_cmd, plan_cmd, sweep_cmd, report_cmd):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # factories named package.module:factory resolve from the current folder too, as with
    # `python -m` (a console script's path does not include it); last, so it shadows nothing
    if "" not in sys.path and "." not in sys.path:
        sys.path.append("")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MemPropError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
