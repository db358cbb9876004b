"""A simulation of PyTorch's CUDA caching allocator: what a step's allocations would
make it reserve, predicted on any machine (issue 23, items 3 and 5).

    e = memprop.estimate(model, (x, y))                    # fake tensors, nothing allocated
    run = replay_measurement(e, AllocatorConfig(capacity_bytes=80 << 30))
    run.report.max_allocated_bytes, run.report.max_reserved_bytes, run.report.oom
    write_snapshot(run.allocator, "step.pickle")           # for pytorch.org/memory_viz

Layout: ``rules`` (sizes: rounding, pools, segment sizes, splitting), ``blocks`` (blocks,
segments, pools), ``simulator`` (``CachingAllocator``: malloc, free, empty_cache),
``expandable`` (expandable segments), ``replay`` (an allocation log in, an
``AllocatorReport`` out), ``snapshot`` (``_snapshot()``'s format), ``frontier`` (the
largest batch that fits), ``config``.

NOTE [ The caching allocator, as modelled ]
  Read from ``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``). NOT YET
  VALIDATED against real CUDA traces: no GPU trace fixture exists yet (issue 23, item 4);
  the tests check the rules below on hand-computed sequences, not agreement with a GPU.
  Modelled, one device, one stream:
  * rounding (``round_size``): at least 512 B, a multiple of 512 B; optionally
    ``roundup_power2_divisions`` (one value for every size);
  * pools (``get_pool``): rounded sizes <= 1 MiB in the small pool, larger in the large;
  * segment sizes (``get_allocation_size``): 2 MiB small; 20 MiB for (1, 10) MiB; else
    the request rounded up to 2 MiB;
  * best fit (``get_free_block``): the smallest free block of the pool that holds the
    request, lowest address among equals;
  * splitting (``should_split``): small pool: a remainder of >= 512 B becomes a free
    block; large pool: only a remainder > 1 MiB, and only for a request below
    ``max_split_size`` - else the whole block is allocated (and counted so);
  * ``max_split_size_mb``: a request below it never reuses an oversize block (>= it);
    one at or above it reuses an oversize block only if less than 20 MiB larger; on a
    failed cudaMalloc, oversize free segments are released first
    (``release_available_cached_blocks``);
  * coalescing on free (``free_block``, ``try_merge_blocks``) with both neighbours;
  * out of memory: a cudaMalloc beyond ``capacity_bytes`` or beyond
    ``set_per_process_memory_fraction``'s limit (checked first, against the segment
    size, also with expandable segments) fails; then the allocator releases oversize
    segments and retries, then releases every unsplit free segment (and unmaps free
    expandable pages) and retries once more; then it raises (the replay stops and
    reports which request, and what was reserved);
  * ``empty_cache`` (``release_cached_blocks``);
  * ``expandable_segments``: one segment per pool, a virtual range of 1 1/8 of the
    capacity, mapped in pages of 2 MiB (small pool) or 20 MiB (large pool), at the
    lowest address with room, free neighbours merged; best fit counts a block followed
    by unmapped space at the size it can grow to; any remainder >= 512 B is split off;
    released pages are unmapped whole.
  Not modelled: streams and cross-stream frees (``record_stream``, events), CUDA graph
  private pools, ``garbage_collection_threshold``, free-memory callbacks, IPC, several
  devices, memory allocated outside the caching allocator (CUDA context, NCCL, cuBLAS
  workspaces that do not go through it), and the driver's addresses (ties in best fit
  go to the lowest simulated address; new ranges get ever higher addresses).
  The input has what the allocation log has (NOTE [ What the allocation log records ],
  memprop.allocation_log): tensor storages only, no library workspaces.
"""

from memprop.allocator.config import AllocatorConfig, parse_alloc_conf
from memprop.allocator.frontier import BatchFit, largest_batch
from memprop.allocator.replay import (
    AllocatorReport,
    AllocatorRun,
    AllocEvent,
    OOMEvent,
    events_of,
    replay,
    replay_measurement,
)
from memprop.allocator.simulator import AllocatorOOM, CachingAllocator
from memprop.allocator.snapshot import snapshot, write_snapshot

__all__ = ["AllocatorConfig", "parse_alloc_conf", "AllocEvent", "AllocatorReport",
           "AllocatorRun", "OOMEvent", "replay", "replay_measurement", "events_of",
           "CachingAllocator", "AllocatorOOM", "snapshot", "write_snapshot", "largest_batch",
           "BatchFit"]
