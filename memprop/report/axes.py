"""Byte axes for people: ticks at round numbers of one binary unit (0.4 MiB, not 409.6 KiB),
and powers of two on log scales. Data stay in raw bytes; only the labels convert."""

from __future__ import annotations

import matplotlib
from matplotlib.ticker import FuncFormatter, Locator, MaxNLocator

__all__ = ["BYTES", "BytesLocator", "bytes_axis", "log_bytes_axis"]


def _unit(value: float) -> float:
    unit = 1.0
    while value >= 1024 * unit and unit < 2**40:
        unit *= 1024
    return unit


class BytesLocator(Locator):
    """Ticks at round numbers of one binary unit (0, 256 KiB, 512 KiB ... or 1, 2, 3 MiB)."""

    def __call__(self):
        vmin, vmax = self.axis.get_view_interval()
        return self.tick_values(vmin, vmax)

    def tick_values(self, vmin, vmax):
        unit = _unit(max(abs(vmin), abs(vmax), 1))
        inner = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 4, 5, 8, 10])
        return [t * unit for t in inner.tick_values(vmin / unit, vmax / unit)]


_UNIT_NAMES = {1: "B", 1024: "KiB", 1024**2: "MiB", 1024**3: "GiB", 1024**4: "TiB"}


def _format_tick(value, _pos=None, unit=None) -> str:
    if value < 0:
        return ""
    unit = unit or (_unit(value) if value else 1)
    return f"{value / unit:g} {_UNIT_NAMES[unit]}"


BYTES = FuncFormatter(_format_tick)


def log_bytes_axis(axis) -> None:
    """Log-scale byte ticks at powers of two (16 MiB, 32 MiB, ... 1 GiB)."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=2, numticks=12))
    axis.set_major_formatter(BYTES)
    axis.set_minor_locator(matplotlib.ticker.NullLocator())


def bytes_axis(axis) -> None:
    """Byte ticks at round numbers of one unit, all labelled in that unit (0.4 MiB, not
    409.6 KiB)."""
    axis.set_major_locator(BytesLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, pos: _format_tick(
        v, pos, unit=_unit(max(abs(x) for x in axis.get_view_interval()) or 1))))
