"""Small pieces the subcommands share: dtype names and table rendering."""

from __future__ import annotations

import pandas as pd
import torch

from memprop.errors import ConfigError
from memprop.units import format_bytes

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"memprop: unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def render_table(frame: pd.DataFrame, *, bytes_columns=None, indent: str = "  ") -> str:
    """A DataFrame as aligned text, ``*_bytes`` columns shown in human units."""
    shown = frame.copy()
    for col in bytes_columns if bytes_columns is not None else [
            c for c in shown.columns if c.endswith("_bytes")]:
        shown[col] = shown[col].map(format_bytes)
    text = shown.to_string(index=False)
    return "\n".join(indent + line for line in text.splitlines())
