"""The largest batch whose step the simulated allocator serves under a device's memory
or ``set_per_process_memory_fraction``: predicted on fake tensors, nothing allocated.

    fit = largest_batch(lambda b: estimate(model_config("mlp", depth=8), b),
                        AllocatorConfig(capacity_bytes=80 << 30, memory_fraction=0.5))
    fit.batch, fit.report.max_reserved_bytes, fit.failed.oom

Simulated, like the rest of memprop.allocator, and not yet confirmed by real trials.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from memprop.allocator.config import AllocatorConfig
from memprop.allocator.replay import AllocatorReport, replay_measurement
from memprop.errors import ConfigError

__all__ = ["BatchFit", "largest_batch"]


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """``batch``: the largest batch found to fit (0: not even ``low``); ``report``: its
    replay (None when none fits); ``failed``: the replay of the smallest batch found
    not to fit (None if ``high`` fits), with its ``oom``; ``tried``: every batch tried,
    in order, as (batch, fits, max_reserved_bytes)."""

    batch: int
    report: AllocatorReport | None
    failed: AllocatorReport | None
    tried: tuple[tuple[int, bool, int], ...]


def largest_batch(step: Callable[[int], object], config: AllocatorConfig, *, low: int = 1,
                  high: int = 1 << 16) -> BatchFit:
    """The largest batch in [``low``, ``high``] whose step (``step(batch)``: a
    ``Measurement``, e.g. ``memprop.estimate`` on fake tensors) the simulated allocator
    under ``config`` serves without running out of memory: batches double from ``low``
    until one fails, then bisection between the last that fit and the first that
    failed. It assumes that a batch fits whenever a larger one does: true of tensor
    bytes, and of reserved bytes up to the allocator's packing, which this search
    does not prove."""
    if config.capacity_bytes is None:
        raise ConfigError("memprop.allocator: largest_batch needs a limit; give "
                          "AllocatorConfig(capacity_bytes=...), and memory_fraction= for "
                          "set_per_process_memory_fraction")
    if not 1 <= low <= high:
        raise ConfigError(f"memprop.allocator: largest_batch(low={low}, high={high}) is "
                          "not allowed; give 1 <= low <= high")
    tried: list[tuple[int, bool, int]] = []

    def run(batch: int) -> AllocatorReport:
        report = replay_measurement(step(batch), config, record_history=False).report
        tried.append((batch, report.oom is None, report.max_reserved_bytes))
        return report

    good: tuple[int, AllocatorReport | None] = (0, None)
    bad: tuple[int, AllocatorReport | None] = (high + 1, None)
    batch = low
    while True:                                   # double until one fails
        report = run(batch)
        if report.oom is not None:
            bad = (batch, report)
            break
        good = (batch, report)
        if batch == high:
            break
        batch = min(2 * batch, high)
    while bad[0] - good[0] > 1 and good[0] >= low:  # bisect (nothing below low is tried)
        mid = (good[0] + bad[0]) // 2
        report = run(mid)
        if report.oom is None:
            good = (mid, report)
        else:
            bad = (mid, report)
    return BatchFit(batch=good[0], report=good[1], failed=bad[1], tried=tuple(tried))
