"""Small pieces the subcommands share: the parser's look, argument types that fail with
one clear line, checks of output paths and databases made before any work starts, and
table rendering.

This module is imported to build the parser, so it stays light: no torch, pandas or
matplotlib at import time (``memprop --help`` must be instant). Each ``*_command``
imports what it runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

from memprop.errors import ConfigError
from memprop.units import format_value, parse_size

# The names the parser offers; tests/test_cli.py checks them against the library's
# tables (memprop.models.MODELS, memprop.measure.OPTIMIZERS, memprop.dtypes.DTYPES),
# which import torch.
MODEL_NAMES = ("d2l_mlp", "mlp", "transformer", "convnet")
OPTIMIZER_NAMES = ("sgd", "momentum", "adam")
DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")

SQLITE_MAGIC = b"SQLite format 3\x00"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default shown, "(default: ...)", unless its help already says what
    happens without it or it is a flag (no value); descriptions kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "(default" in text or action.nargs == 0
                or any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            return text
        return f"{text} (default: %(default)s)".strip()


def describe(doc: str) -> str:
    """A module docstring as help text: reST literals (````x````) shown as plain ``x``."""
    return doc.replace("``", "")


def add_command(sub, name: str, *, help: str, doc: str):
    return sub.add_parser(name, help=help, description=describe(doc),
                          formatter_class=HelpFormatter)


def parse_dtype(name: str):
    """The torch dtype called ``name`` (memprop.dtypes, loaded only when a command runs:
    building the parser must not import torch)."""
    from memprop.dtypes import parse_dtype as parse

    return parse(name)


# -- argument types: argparse turns ArgumentTypeError into one line (see cli.Parser) --

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; use 1 or more")
    return value


def size(text: str) -> int:
    """A positive memory size such as 512MiB or 1.5GiB, in bytes (refused as the strategy
    ``budget:SIZE`` refuses it: memprop.units.parse_size with ``positive``)."""
    try:
        return parse_size(text, positive=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("memprop.units: ")) from None


# -- paths, checked before any measuring so that nothing is lost to a typo --

def _demo_hint(path) -> str:
    """Where ``make demo`` put the quickstart's store, when a user looks for it elsewhere."""
    demo = pathlib.Path("reports/demo/results.sqlite")
    return (f" (make demo wrote {demo})" if "quickstart" in str(path) and demo.is_file()
            else "")


def check_output_file(path, option: str, command: str) -> pathlib.Path:
    """``path`` can be written as a file: not a folder, its folder exists and is writable."""
    path = pathlib.Path(path)
    where = f"memprop {command}: {option} {path}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; give a file name, e.g. {path / 'out'}")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{where}: folder {folder} does not exist; create it "
                          "(mkdir -p) or choose another path")
    if not _writable(folder) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{where} cannot be written ({folder} is read-only); choose a "
                          "writable location")
    return path


def _writable(folder: pathlib.Path) -> bool:
    """Whether a file can be created in ``folder``: tried, not guessed from permission
    bits (which root ignores, and a read-only file system does not show)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_output_dir(path, option: str, command: str) -> pathlib.Path:
    """``path`` can hold output files: a writable folder, or creatable in one."""
    path = pathlib.Path(path)
    where = f"memprop {command}: {option} {path}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where} is an existing file, not a folder; choose a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not _writable(existing):
        raise ConfigError(f"{where} cannot be written ({existing} is read-only); choose a "
                          "writable folder with -o")
    return path


def check_database(path, option: str, command: str, *, must_exist: bool) -> pathlib.Path:
    """``path`` is a results database (SQLite), or, unless ``must_exist``, can become one.
    Never creates or writes anything."""
    path = pathlib.Path(path)
    where = f"memprop {command}: {option} {path}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder, not a results database; give a .sqlite "
                          "file, e.g. " + str(path / "results.sqlite"))
    if not path.exists():
        if must_exist:
            raise ConfigError(f"{where}: no results database there; run 'memprop sweep SPEC' "
                              "first, or give the .sqlite file it wrote" + _demo_hint(path))
        check_output_file(path, option, command)
        return path
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if not head and must_exist:
        raise ConfigError(f"{where} is an empty file, not a results database; run "
                          "'memprop sweep SPEC' to fill one")
    if head and head != SQLITE_MAGIC:
        raise ConfigError(f"{where} is not a SQLite results database; give the .sqlite file "
                          "that 'memprop sweep' wrote, or a spec (.toml)")
    if not must_exist:
        check_output_file(path, option, command)
    return path


def database_of(source: str, command: str) -> pathlib.Path:
    """The database a spec (.toml, its default store) or a .sqlite path names, checked."""
    path = pathlib.Path(source)
    if path.suffix == ".toml":
        from memprop.sweep.spec import load_spec
        from memprop.sweep.store import default_db_path
        path = default_db_path(load_spec(path).name)
    return check_database(path, "source", command, must_exist=True)


def render_table(frame, *, indent: str = "  ") -> str:
    """A DataFrame as aligned text for people: every cell formatted by its column's unit
    (memprop.units.format_value), "-" where nothing was measured."""
    shown = frame.copy().astype(object)
    for col in shown.columns:
        shown[col] = [format_value(str(col), v) for v in frame[col]]
    text = shown.to_string(index=False)
    return "\n".join(indent + line for line in text.splitlines())


def json_ready(value):
    """One value for json.dumps: NaN and infinities -> None, numpy scalars -> Python,
    tuples -> lists, anything else not JSON -> its text."""
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()                      # numpy scalar
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, (tuple, list)):
        return [json_ready(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def table_rows(frame) -> list[dict]:
    """A DataFrame as JSON-ready rows (raw units, ``null`` for never measured)."""
    return [{str(k): json_ready(v) for k, v in row.items()}
            for row in frame.to_dict(orient="records")]
