"""Byte sizes: parse "1.5GiB" / "512MB" into bytes, and format bytes for people.

memprop keeps raw bytes in every row and every dataclass (columns end in ``_bytes``);
these helpers are for input and display only.
"""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text``: an int, or a number with a unit (B, KB/MB/GB/TB in powers of
    10, KiB/MiB/GiB/TiB or K/M/G/T in powers of 2). Raises ``ValueError`` naming the
    accepted forms."""
    if isinstance(text, bool):
        raise ValueError(f"memprop.units: {text!r} is not a size; write e.g. 512MiB or 1.5GiB")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"memprop.units: size {text!r} is negative")
        return int(text)
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"memprop.units: cannot read {text!r} as a size; write a number and one of "
            "B, KiB, MiB, GiB, TiB (powers of 2) or KB, MB, GB, TB (powers of 10), e.g. 1.5GiB"
        )
    return int(round(float(match.group(1)) * _UNITS[unit]))


def format_bytes(n: float | int | None, *, precision: int = 1) -> str:
    """``n`` bytes in binary units for display, e.g. ``format_bytes(3 * 2**20) == '3.0 MiB'``."""
    if n is None or isinstance(n, (str, bool)) or n != n:   # missing, text or NaN
        return "-" if n is None or n != n else str(n)
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.{precision}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
