"""Replay an allocation log through the simulated allocator and report what the device
would hold.

    run = replay_measurement(memprop.estimate(model, (x, y)), AllocatorConfig())
    run.report.max_reserved_bytes, run.report.fragmentation_bytes, run.report.oom

The events are ``Measurement.allocations`` (NOTE [ What the allocation log records ],
memprop.allocation_log), or any sequence of ``AllocEvent``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

import pandas as pd

from memprop.allocator.blocks import Block, Label
from memprop.allocator.config import AllocatorConfig
from memprop.allocator.simulator import AllocatorOOM, CachingAllocator
from memprop.allocator.snapshot import snapshot_segments
from memprop.errors import ConfigError

__all__ = ["AllocEvent", "AllocatorReport", "OOMEvent", "AllocatorRun", "replay",
           "replay_measurement", "events_of"]


@dataclasses.dataclass(frozen=True)
class AllocEvent:
    """One request: ``alloc`` of ``size_bytes`` (the bytes asked for) under
    ``storage_id``, or ``free`` of a live ``storage_id`` (its size is not needed).
    ``phase``/``module``/``op``/``category`` label the block in snapshots."""

    action: Literal["alloc", "free"]
    storage_id: int
    size_bytes: int = 0
    phase: str = ""
    module: str = ""
    op: str = ""
    category: str = ""


@dataclasses.dataclass(frozen=True)
class OOMEvent:
    """The request the simulated allocator could not serve: its index in the events, its
    storage id, label, bytes asked (``size_bytes``) and rounded (``rounded_bytes``),
    the bytes reserved and allocated when it failed, and the limit (bytes: the memory
    fraction's, else the capacity)."""

    event_index: int
    storage_id: int
    phase: str
    module: str
    op: str
    size_bytes: int
    rounded_bytes: int
    reserved_bytes: int
    allocated_bytes: int
    limit_bytes: int | None


@dataclasses.dataclass(frozen=True)
class AllocatorReport:
    """What the simulated caching allocator holds over the events (all bytes):

    * ``max_allocated_bytes``: ``torch.cuda.max_memory_allocated``: the peak of the
      allocated blocks' sizes (requests rounded to 512 B; large blocks handed out whole
      when the remainder would be 1 MiB or less).
    * ``max_reserved_bytes``: ``torch.cuda.max_memory_reserved``: the peak of the
      segments' sizes (or of mapped pages, with expandable segments).
    * ``max_requested_bytes``: the peak of the bytes asked for (no rounding): the
      tensor-level peak of the same events.
    * ``reserved_at_peak_bytes``: reserved bytes when allocated first reached its peak
      (the moment the step holds most); ``fragmentation_bytes``: reserved minus
      allocated at that moment: bytes cached in segments but not allocated.
    * ``max_segments``: the peak count of cudaMalloc'd segments (``segment.all.peak``);
      ``segments``: segments held after the last event, as ``_snapshot()`` lists them.
    * ``end_allocated_bytes``/``end_reserved_bytes``: held after the last event.
    * ``num_alloc_retries``: requests that released cached segments and retried.
    * ``oom``: the first request that failed under the capacity or the memory
      fraction (the replay stops there), or None.
    * ``events``: how many events were replayed (all unless ``oom``)."""

    max_allocated_bytes: int
    max_reserved_bytes: int
    max_requested_bytes: int
    reserved_at_peak_bytes: int
    fragmentation_bytes: int
    max_segments: int
    segments: int
    end_allocated_bytes: int
    end_reserved_bytes: int
    num_alloc_retries: int
    events: int
    oom: OOMEvent | None = None
    config: AllocatorConfig = AllocatorConfig()


@dataclasses.dataclass
class AllocatorRun:
    """A replay's ``report`` and the ``allocator`` in its final state (for a snapshot)."""

    report: AllocatorReport
    allocator: CachingAllocator


def replay(events: Iterable[AllocEvent], config: AllocatorConfig | None = None, *,
           record_history: bool = True) -> AllocatorRun:
    """Run ``events`` through a fresh ``CachingAllocator``. Allocations of 0 bytes take no
    block (CUDA's allocator serves none); a request that fails ends the replay, as the
    out-of-memory error ends a step."""
    config = config or AllocatorConfig()
    a = CachingAllocator(config, record_history=record_history)
    live: dict[int, Block | None] = {}
    at_peak, oom, n = 0, None, 0
    for n, e in enumerate(events, start=1):
        a.time = n - 1
        if e.action == "alloc":
            if e.storage_id in live:
                raise ConfigError(f"memprop.allocator: event {n - 1} allocates storage "
                                  f"{e.storage_id}, which is live already; free it first")
            if e.size_bytes == 0:
                live[e.storage_id] = None
                continue
            label = Label(e.storage_id, e.phase, e.module, e.op, e.category)
            before = a.max_allocated
            try:
                live[e.storage_id] = a.malloc(e.size_bytes, label)
            except AllocatorOOM as exc:
                oom = OOMEvent(event_index=n - 1, storage_id=e.storage_id, phase=e.phase,
                               module=e.module, op=e.op, size_bytes=exc.size_bytes,
                               rounded_bytes=exc.rounded_bytes,
                               reserved_bytes=exc.reserved_bytes,
                               allocated_bytes=exc.allocated_bytes,
                               limit_bytes=exc.limit_bytes)
                break
            if a.max_allocated > before:
                at_peak = a.reserved
        elif e.action == "free":
            if e.storage_id not in live:
                raise ConfigError(f"memprop.allocator: event {n - 1} frees storage "
                                  f"{e.storage_id}, which is not live; allocate it first")
            block = live.pop(e.storage_id)
            if block is not None:
                a.free(block)
        else:
            raise ConfigError(f"memprop.allocator: event {n - 1} has action {e.action!r}; "
                              "choose alloc or free")
    report = AllocatorReport(
        max_allocated_bytes=a.max_allocated, max_reserved_bytes=a.max_reserved,
        max_requested_bytes=a.max_requested, reserved_at_peak_bytes=at_peak,
        fragmentation_bytes=at_peak - a.max_allocated, max_segments=a.max_segments,
        segments=len(snapshot_segments(a)), end_allocated_bytes=a.allocated,
        end_reserved_bytes=a.reserved, num_alloc_retries=a.num_alloc_retries, events=n,
        oom=oom, config=config)
    return AllocatorRun(report=report, allocator=a)


def events_of(frame: pd.DataFrame) -> list[AllocEvent]:
    """``AllocEvent``s from an allocation log's rows (``Measurement.allocations``)."""
    return [AllocEvent(action=r.action, storage_id=int(r.storage_id),
                       size_bytes=int(r.size_bytes), phase=str(r.phase),
                       module=str(r.module), op=str(r.op), category=str(r.category))
            for r in frame.itertuples(index=False)]


def replay_measurement(measurement, config: AllocatorConfig | None = None, *,
                       record_history: bool = True) -> AllocatorRun:
    """Replay a ``Measurement``'s allocation log (measured or estimated: the first step
    and the measured step, in order) through the simulated allocator."""
    return replay(events_of(measurement.allocations), config, record_history=record_history)
