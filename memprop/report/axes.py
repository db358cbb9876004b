"""Byte axes for people: ticks at round numbers of one binary unit (0.4 MiB, not 409.6 KiB).
Data stay in raw bytes; only the labels convert. And the colour of each memory category,
the same in every figure."""

from __future__ import annotations

import math

import matplotlib
from matplotlib.ticker import FuncFormatter, Locator, MaxNLocator

__all__ = ["BYTES", "BytesLocator", "bytes_axis", "flops_axis", "power_of_two_ticks",
           "CATEGORY_COLORS"]

# one colour per live-memory category (memprop.tracker.CATEGORIES)
CATEGORY_COLORS = {"parameter": "#4C72B0", "buffer": "#8172B3", "input": "#937860",
                   "gradient": "#DD8452", "optimizer": "#C44E52", "activation": "#55A868",
                   "temporary": "#BBBBBB"}


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


def bytes_axis(axis) -> None:
    """Byte ticks at round numbers of one unit, all labelled in that unit (0.4 MiB, not
    409.6 KiB)."""
    axis.set_major_locator(BytesLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, pos: _format_tick(
        v, pos, unit=_unit(max(abs(x) for x in axis.get_view_interval()) or 1))))


_SI = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))


def flops_axis(axis, label: str) -> None:
    """FLOPs in one SI unit picked from the axis range, named in the label
    (``FLOPs per step, in MFLOP``), ticks at round numbers of it: 5.8, 6.0, 6.2 (no offsets)."""
    vmax = max(abs(v) for v in axis.get_view_interval()) or 1
    scale, prefix = next((s, p) for s, p in _SI if vmax >= s or s == 1)
    axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:g}"))
    axis.set_label_text(f"{label}, in {prefix}FLOP")


def power_of_two_ticks(axis, values) -> None:
    """Log-2 axis ticks at the powers of two spanning ``values``, labelled plainly
    (16, 32, 64, not 2^4 or 1.6x10^1)."""
    lo, hi = min(values), max(values)
    low = 2 ** math.floor(math.log2(lo))
    ticks = [low * 2**k for k in range(64) if low * 2**k <= hi * 1.0001 or k == 0]
    if ticks[-1] < hi:
        ticks.append(ticks[-1] * 2)
    axis.set_ticks(ticks)
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(matplotlib.ticker.NullLocator())
