"""The simulated allocator's state and history in the format of
``torch.cuda.memory._snapshot()``, which pytorch.org/memory_viz and
``torch.cuda._memory_viz`` render.

    snap = snapshot(run.allocator)                 # a dict: segments, device_traces
    write_snapshot(run.allocator, "step.pickle")   # drag it onto pytorch.org/memory_viz

``segments`` is the state after the last event (as ``_snapshot()`` taken after a step);
``device_traces[0]`` the whole history (as ``_record_memory_history()`` records it):
``alloc``, ``free_requested``, ``free_completed``, ``segment_alloc``, ``segment_free``
(``segment_map``/``segment_unmap`` with expandable segments) and ``oom``. Frames are
stack-free: one frame per block naming memprop's module (file), op and phase (function)
and the allocation log's storage id (line). Every figure is simulated, not observed.
"""

from __future__ import annotations

import pathlib
import pickle

from memprop.allocator.blocks import Block, Segment
from memprop.allocator.simulator import CachingAllocator, frames_of

__all__ = ["snapshot", "snapshot_segments", "write_snapshot"]


def _mapped_blocks(a: CachingAllocator) -> dict[int, list[Block]]:
    """Every mapped block (allocated or free), by segment address, in address order."""
    by_segment: dict[int, list[Block]] = {}
    for b in [*a.active.values(), *a.small_pool, *a.large_pool]:
        by_segment.setdefault(b.segment.address, []).append(b)
    for blocks in by_segment.values():
        blocks.sort(key=lambda b: b.ptr)
    return by_segment


def _segment_dict(seg: Segment, blocks: list[Block]) -> dict:
    rows = [{"address": b.ptr, "size": b.size,
             "requested_size": b.requested if b.allocated else 0,
             "state": "active_allocated" if b.allocated else "inactive",
             "frames": frames_of(b.label) if b.allocated else []} for b in blocks]
    allocated = sum(b.size for b in blocks if b.allocated)
    return {"device": 0, "address": blocks[0].ptr, "stream": 0,
            "total_size": sum(b.size for b in blocks),
            "segment_type": "small" if seg.small else "large", "segment_pool_id": (0, 0),
            "is_expandable": seg.expandable, "allocated_size": allocated,
            "active_size": allocated,
            "requested_size": sum(b.requested for b in blocks if b.allocated),
            "frames": frames_of(seg.label), "blocks": rows}


def snapshot_segments(a: CachingAllocator) -> list[dict]:
    """``_snapshot()['segments']`` of the allocator now: one per cudaMalloc'd segment,
    and, as torch reports expandable segments, one per contiguous mapped range; sorted
    by address. Sizes in bytes."""
    out = []
    for address, blocks in _mapped_blocks(a).items():
        seg = a.segments[address]
        if not seg.expandable:
            out.append(_segment_dict(seg, blocks))
            continue
        run = [blocks[0]]
        for b in blocks[1:]:
            if b.ptr != run[-1].ptr + run[-1].size:
                out.append(_segment_dict(seg, run))
                run = []
            run.append(b)
        out.append(_segment_dict(seg, run))
    return sorted(out, key=lambda s: s["address"])


def snapshot(a: CachingAllocator, *, meta: dict | None = None) -> dict:
    """The ``_snapshot()`` dict: ``segments`` now, ``device_traces`` (one device: the
    allocator's history), ``allocator_settings`` (the simulated configuration) and
    ``memprop`` (``meta``: what was simulated, and that it is a simulation)."""
    cfg = a.config
    return {
        "segments": snapshot_segments(a),
        "device_traces": [list(a.trace)],
        "allocator_settings": {
            "PYTORCH_CUDA_ALLOC_CONF": ",".join(
                [f"expandable_segments:{cfg.expandable_segments}"]
                + ([f"max_split_size_mb:{cfg.max_split_size_mb}"]
                   if cfg.max_split_size_mb is not None else [])
                + ([f"roundup_power2_divisions:{cfg.roundup_power2_divisions}"]
                   if cfg.roundup_power2_divisions > 1 else [])),
            "capacity_bytes": cfg.capacity_bytes, "memory_fraction": cfg.memory_fraction},
        "memprop": {"simulated": True, **(meta or {})},
    }


def write_snapshot(a: CachingAllocator, path, *, meta: dict | None = None) -> pathlib.Path:
    """Pickle ``snapshot(a)`` to ``path`` (as ``torch.cuda.memory._dump_snapshot``)."""
    path = pathlib.Path(path)
    with path.open("wb") as f:
        pickle.dump(snapshot(a, meta=meta), f)
    return path
