"""Units for people: parse "1.5GiB" / "512MB" into bytes; format bytes, FLOPs, times,
counts and ratios for display, with one rounding rule each and "-" for a value never
measured.

memprop keeps raw units in every row and every dataclass (columns end in ``_bytes``,
``_flops``, ``_ms``); these helpers are for input and display only.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_size", "format_bytes", "format_flops", "format_ms", "format_seconds",
           "format_ratio", "format_number", "format_value", "MISSING"]

MISSING = "-"   # shown for a value that was never measured

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float, *, positive: bool = False) -> int:
    """Bytes in ``text``: an int, or a number with a unit (B, KB/MB/GB/TB in powers of
    10, KiB/MiB/GiB/TiB or K/M/G/T in powers of 2). Raises ``ValueError`` naming the
    accepted forms; with ``positive`` also for a size of 0 bytes (a budget: the CLI's
    ``--budget`` and the strategy ``budget:SIZE`` refuse the same sizes)."""
    value = _parse_size(text)
    if positive and value <= 0:
        raise ValueError(f"memprop.units: size {text!r} is not positive ({value} bytes); "
                         "write a positive size, e.g. 512MiB or 1.5GiB")
    return value


def _parse_size(text: str | int | float) -> int:
    if isinstance(text, bool):
        raise ValueError(f"memprop.units: {text!r} is not a size; write e.g. 512MiB or 1.5GiB")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"memprop.units: size {text!r} is negative; write a positive "
                             "size, e.g. 512MiB or 1.5GiB")
        return int(text)
    if str(text).strip().startswith("-"):
        raise ValueError(f"memprop.units: size {text!r} is negative; write a positive size, "
                         "e.g. 512MiB or 1.5GiB")
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"memprop.units: cannot read {text!r} as a size; write a number and one of "
            "B, KiB, MiB, GiB, TiB (powers of 2) or KB, MB, GB, TB (powers of 10), e.g. 1.5GiB"
        )
    return int(round(float(match.group(1)) * _UNITS[unit]))


def _missing(value) -> bool:
    """None or NaN (pandas' missing value): never measured."""
    return value is None or (isinstance(value, float) and value != value) or (
        not isinstance(value, (str, bool, int, float)) and value != value)


def format_bytes(n: float | int | None, *, precision: int = 1) -> str:
    """``n`` bytes in binary units for display, e.g. ``format_bytes(3 * 2**20) == '3.0 MiB'``."""
    if n is None or _missing(n):
        return MISSING
    if isinstance(n, (str, bool)):
        return str(n)
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.{precision}f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _significant(x: float, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, without exponent: 12.3, 0.0123, 1230."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    text = f"{round(x, decimals):.{decimals}f}"
    return text


_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))


def format_flops(n: float | int | None) -> str:
    """FLOPs with an SI prefix and 4 significant digits: ``158.4 TFLOP``, ``2.048 MFLOP``;
    ``-`` when never counted (None or NaN)."""
    if n is None or _missing(n):
        return MISSING
    n = float(n)
    if n == 0:
        return "0 FLOP"
    for scale, prefix in _SI:
        if abs(n) >= scale:
            return f"{_significant(n / scale, 4)} {prefix}FLOP"
    return f"{_significant(n, 4)} FLOP"


def format_ms(ms: float | None) -> str:
    """A time in milliseconds to 3 significant digits: ``12.3 ms``, ``1.23 s`` past 1000 ms."""
    if ms is None or _missing(ms):
        return MISSING
    ms = float(ms)
    return f"{_significant(ms / 1000)} s" if abs(ms) >= 1000 else f"{_significant(ms)} ms"


def format_seconds(s: float | None) -> str:
    """A duration in seconds to 3 significant digits (``-`` if missing)."""
    return MISSING if s is None or _missing(s) else format_ms(float(s) * 1000)


def format_ratio(x: float | None) -> str:
    """A ratio to 3 significant digits: ``0.874``, ``1.91``, ``12.3`` (``-`` if missing)."""
    return MISSING if x is None or _missing(x) else _significant(float(x))


def format_number(x) -> str:
    """An integer as an integer (``1024``, also when stored as ``1024.0``), any other number
    to 3 significant digits, text as is, ``-`` if missing."""
    if _missing(x):
        return MISSING
    if isinstance(x, bool) or isinstance(x, str):
        return str(x)
    if isinstance(x, int) or (hasattr(x, "is_integer") and float(x).is_integer()):
        return str(int(x))
    try:
        return _significant(float(x))
    except (TypeError, ValueError):
        return str(x)


def format_value(column: str, value) -> str:
    """One cell of a table for people, by the unit its column name ends in
    (``*_bytes``, ``*_flops``, ``*_ms``, ``*_s``, ``*_vs_*`` ratios), else a number or text."""
    if column.endswith("_bytes"):
        return format_bytes(value)
    if column.endswith("_flops"):
        return format_flops(value)
    if column.endswith("_ms"):
        return format_ms(value)
    if column.endswith("_s"):
        return format_seconds(value)
    if "_vs_" in column or column.endswith("_ratio"):
        return format_ratio(value)
    return format_number(value)
