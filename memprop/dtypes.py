"""The floating-point types a workload may use, by the names specs and the CLI give."""

from __future__ import annotations

import torch

from memprop.errors import ConfigError

__all__ = ["DTYPES", "parse_dtype"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                  "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``torch.float32`` for ``"float32"`` (a ``torch.dtype`` passes through)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"memprop: unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]
