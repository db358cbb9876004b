"""Small pieces the subcommands share: dtype names and table rendering."""

from __future__ import annotations

import pandas as pd

from memprop.dtypes import DTYPES, parse_dtype  # noqa: F401 - re-exported for subcommands
from memprop.units import format_bytes


def render_table(frame: pd.DataFrame, *, bytes_columns=None, indent: str = "  ") -> str:
    """A DataFrame as aligned text, ``*_bytes`` columns shown in human units."""
    shown = frame.copy()
    for col in bytes_columns if bytes_columns is not None else [
            c for c in shown.columns if c.endswith("_bytes")]:
        shown[col] = shown[col].map(format_bytes)
    text = shown.to_string(index=False)
    return "\n".join(indent + line for line in text.splitlines())
