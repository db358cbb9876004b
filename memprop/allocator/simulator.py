"""A simulation of PyTorch's CUDA caching allocator on one device and one stream.

    a = CachingAllocator(AllocatorConfig(capacity_bytes=80 << 30))
    b = a.malloc(3 << 20)            # a 20 MiB segment, split: 3 MiB allocated
    a.free(b); a.empty_cache()
    a.max_allocated, a.max_reserved  # torch.cuda.max_memory_allocated / _reserved

``malloc``, ``free`` and ``empty_cache`` follow ``DeviceCachingAllocator`` in
``c10/cuda/CUDACachingAllocator.cpp`` step by step (NOTE [ The caching allocator, as
modelled ], memprop.allocator); the size rules are in memprop.allocator.rules.
"""

from __future__ import annotations

from memprop.allocator.blocks import Block, Label, Pool, Segment
from memprop.allocator.config import AllocatorConfig
from memprop.allocator.expandable import ExpandableSegments
from memprop.allocator.rules import (
    LARGE_BUFFER,
    allocation_size,
    is_small,
    reusable,
    round_size,
    should_split,
)
from memprop.errors import MemPropError

__all__ = ["CachingAllocator", "AllocatorOOM"]

_BASE_ADDRESS = 0x7F00_0000_0000      # simulated device addresses start here
_ALIGN = 2 << 20                      # each new range starts on a 2 MiB boundary
NO_LABEL = Label()


class AllocatorOOM(MemPropError):
    """The simulated allocator could not serve a request, after releasing what the real
    one releases: ``size_bytes`` asked (``rounded_bytes`` after rounding), with
    ``reserved_bytes`` and ``allocated_bytes`` held at that moment and ``limit_bytes`` the
    capacity or the memory fraction's limit that stopped it."""

    def __init__(self, *, size_bytes: int, rounded_bytes: int, reserved_bytes: int,
                 allocated_bytes: int, limit_bytes: int | None, label: Label):
        self.size_bytes, self.rounded_bytes = size_bytes, rounded_bytes
        self.reserved_bytes, self.allocated_bytes = reserved_bytes, allocated_bytes
        self.limit_bytes, self.label = limit_bytes, label
        super().__init__(
            f"memprop.allocator: simulated CUDA out of memory: tried to allocate "
            f"{rounded_bytes} bytes (storage {label.storage_id}, {label.phase} "
            f"{label.module} {label.op}) with {reserved_bytes} bytes reserved and "
            f"{allocated_bytes} allocated, limit {limit_bytes} bytes")


class CachingAllocator(ExpandableSegments):
    """The allocator's state: free blocks in a small and a large pool, allocated blocks,
    segments, and the counters ``torch.cuda.memory_stats`` reports (bytes):
    ``allocated`` (sum of allocated block sizes, rounding and unsplit remainders
    included), ``reserved`` (sum of segment sizes, or of mapped pages), ``requested``
    (sum of the sizes asked for), each with its ``max_``; ``max_segments`` (peak count
    of cudaMalloc'd segments, torch's ``segment.all.peak``; expandable segments map
    pages instead and are not counted, as in torch). ``trace``: the allocator's history
    as ``torch.cuda.memory._snapshot()['device_traces'][0]`` lists it."""

    def __init__(self, config: AllocatorConfig | None = None, *, record_history: bool = True):
        self.config = config or AllocatorConfig()
        self.capacity_bytes = self.config.capacity_bytes
        self.small_pool, self.large_pool = Pool(small=True), Pool(small=False)
        self.active: dict[int, Block] = {}            # ptr -> allocated block
        self.segments: dict[int, Segment] = {}        # address -> live segment
        self.allocated = self.reserved = self.requested = 0
        self.max_allocated = self.max_reserved = self.max_requested = 0
        self.segment_count = self.max_segments = 0
        self.num_alloc_retries = self.num_device_alloc = self.num_device_free = 0
        self.record_history = record_history
        self.trace: list[dict] = []
        self.time = 0                                 # stamped on trace entries
        self._next_address = _BASE_ADDRESS

    # -- the public calls -------------------------------------------------------------
    def malloc(self, size: int, label: Label = NO_LABEL) -> Block:
        """``DeviceCachingAllocator::malloc``: a block for ``size`` bytes (> 0), or
        ``AllocatorOOM``."""
        assert size > 0, "CUDA's allocator serves no block for 0 bytes"
        cfg = self.config
        rounded = round_size(size, cfg.roundup_power2_divisions)
        pool = self.small_pool if is_small(rounded) else self.large_pool
        alloc_size = allocation_size(rounded)
        block = self._get_free_block(pool, rounded)
        if block is None:
            block = (self._alloc_block(pool, rounded, alloc_size, label)
                     or (self._release_available_cached_blocks(pool, rounded, label)
                         and self._alloc_block(pool, rounded, alloc_size, label))
                     or (self._release_cached_blocks(label)
                         and self._alloc_block(pool, rounded, alloc_size, label, retry=True))
                     or None)
        if block is None:
            limit = cfg.allowed_bytes if cfg.allowed_bytes is not None else self.capacity_bytes
            free = 0 if self.capacity_bytes is None else self.capacity_bytes - self.reserved
            self._trace("oom", free, rounded, label, device_free=free)
            raise AllocatorOOM(size_bytes=size, rounded_bytes=rounded,
                               reserved_bytes=self.reserved, allocated_bytes=self.allocated,
                               limit_bytes=limit, label=label)
        split = should_split(block.size, rounded, small=pool.small,
                             expandable=cfg.expandable_segments,
                             max_split_size=cfg.max_split_size)
        return self._alloc_found_block(block, pool, rounded, size, label, split)

    def free(self, block: Block) -> None:
        """``DeviceCachingAllocator::free``: the block goes back to its pool, merged with
        free neighbours (coalescing); nothing is returned to the device."""
        assert block.allocated and self.active.get(block.ptr) is block, "not allocated"
        block.allocated = False
        del self.active[block.ptr]
        self.allocated -= block.size
        self.requested -= block.requested
        self._trace("free_requested", block.ptr, block.requested, block.label)
        self._trace("free_completed", block.ptr, block.requested, block.label)
        pool = self.small_pool if block.small else self.large_pool
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        pool.insert(block)

    def empty_cache(self, label: Label = NO_LABEL) -> None:
        """``torch.cuda.empty_cache``: release every free segment (unsplit free blocks)
        and every free page of expandable segments."""
        self._release_cached_blocks(label)

    # -- malloc's steps ----------------------------------------------------------------
    def _get_free_block(self, pool: Pool, rounded: int) -> Block | None:
        """``get_free_block``: the best fit (smallest free block of at least ``rounded``
        bytes, lowest address among equals), unless the max_split_size rules refuse it."""
        i = pool.lower_bound(rounded)
        if i == len(pool):
            return None
        b = pool.at(i)
        if b.segment.expandable:
            if self.config.expandable_segments:
                # a block followed by unmapped space fits as what it can grow to
                def grows_to(x: Block) -> int:
                    return x.size + (x.next.size if x.next is not None and not x.next.mapped
                                     else 0)
                while b.segment.expandable and i + 1 < len(pool) \
                        and grows_to(pool.at(i + 1)) < grows_to(b):
                    i += 1
                    b = pool.at(i)
            else:
                while i < len(pool) and pool.at(i).segment.expandable:
                    i += 1
                if i == len(pool):
                    return None
                b = pool.at(i)
        if not reusable(b.size, rounded, max_split_size=self.config.max_split_size):
            return None
        pool.remove(b)
        return b

    def _alloc_block(self, pool: Pool, rounded: int, alloc_size: int, label: Label, *,
                     retry: bool = False) -> Block | None:
        """``alloc_block``: a new segment of ``alloc_size`` bytes (or, expandable, pages
        mapped), or None when the memory fraction's limit or the device's capacity
        would be crossed. The fraction is checked against ``alloc_size`` even when
        expandable segments map less, as torch does."""
        if retry:
            self.num_alloc_retries += 1
        allowed = self.config.allowed_bytes
        if allowed is not None and self.reserved + alloc_size > allowed:
            return None
        if self.config.expandable_segments:
            return self._try_allocate_expandable_block(pool, rounded, label)
        if self.capacity_bytes is not None and self.reserved + alloc_size > self.capacity_bytes:
            return None                                   # cudaMalloc fails
        seg = Segment(address=self._new_address(alloc_size), size=alloc_size,
                      small=pool.small, label=label)
        self.segments[seg.address] = seg
        self.segment_count += 1
        self.max_segments = max(self.max_segments, self.segment_count)
        self._add_reserved(alloc_size)
        self._trace("segment_alloc", seg.address, alloc_size, label)
        return Block(ptr=seg.address, size=alloc_size, segment=seg)

    def _alloc_found_block(self, block: Block, pool: Pool, rounded: int, size: int,
                           label: Label, split: bool) -> Block:
        """``alloc_found_block``: hand out the first ``rounded`` bytes of ``block`` and
        return the rest to the pool (``split``), or hand out the whole block."""
        if split:
            rest = block
            block = Block(ptr=rest.ptr, size=rounded, segment=rest.segment, prev=rest.prev,
                          next=rest)
            if block.prev is not None:
                block.prev.next = block
            rest.prev = block
            rest.ptr += rounded
            rest.size -= rounded
            pool.insert(rest)
        block.allocated, block.requested, block.label = True, size, label
        self.active[block.ptr] = block
        self.allocated += block.size
        self.requested += size
        self.max_allocated = max(self.max_allocated, self.allocated)
        self.max_requested = max(self.max_requested, self.requested)
        self._trace("alloc", block.ptr, size, label)
        return block

    def _release_available_cached_blocks(self, pool: Pool, rounded: int,
                                         label: Label) -> bool:
        """``release_available_cached_blocks`` (only with max_split_size set): release
        the smallest oversize free segment that covers the request, else the largest
        ones until their total does."""
        max_split = self.config.max_split_size
        if self.config.max_split_size_mb is None:
            return False
        key = max(rounded, max_split)
        i = pool.lower_bound(key)
        if i < len(pool):
            return self._release_block(pool.at(i), pool, label)
        released = 0
        i -= 1
        while i >= 0 and released < key and pool.at(i).size >= max_split:
            b = pool.at(i)
            released += b.size
            if not self._release_block(b, pool, label):
                break
            i -= 1
        return released >= key

    def _release_cached_blocks(self, label: Label) -> bool:
        """``release_cached_blocks``: release every unsplit free segment of both pools,
        and unmap every whole free page of expandable segments."""
        for pool in (self.large_pool, self.small_pool):
            to_unmap = []
            for b in pool:
                if b.segment.expandable:
                    to_unmap.append(b)
                elif not b.is_split():
                    self._release_block(b, pool, label)
            for b in to_unmap:
                self._unmap_block(b, pool, label)
        return True

    def _release_block(self, block: Block, pool: Pool, label: Label) -> bool:
        """``release_block``: cudaFree an unsplit free segment. (A split or expandable
        block is never released this way; False.)"""
        if block.is_split() or block.segment.expandable:
            return False
        pool.remove(block)
        del self.segments[block.segment.address]
        self.segment_count -= 1
        self._add_reserved(-block.size)
        self._trace("segment_free", block.ptr, block.size, label)
        return True

    # -- shared helpers ----------------------------------------------------------------
    def _try_merge(self, dst: Block, src: Block | None, pool: Pool) -> int:
        """``try_merge_blocks``: absorb the free neighbour ``src`` into ``dst`` (both
        mapped or both unmapped); the bytes absorbed, 0 if none."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return 0
        if src.mapped:
            pool.remove(src)
        else:
            del pool.unmapped[src.ptr]
        if dst.prev is src:                               # [src dst]
            dst.ptr, dst.prev = src.ptr, src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:                                             # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        return src.size

    def _add_reserved(self, nbytes: int) -> None:
        self.reserved += nbytes
        if nbytes > 0:
            self.num_device_alloc += 1
            self.max_reserved = max(self.max_reserved, self.reserved)
        else:
            self.num_device_free += 1

    def _new_address(self, size: int) -> int:
        address = self._next_address
        self._next_address += _ALIGN * -(-max(size, LARGE_BUFFER) // _ALIGN)
        return address

    def _trace(self, action: str, addr: int, size: int, label: Label, **extra) -> None:
        if self.record_history:
            self.trace.append({"action": action, "addr": addr, "size": size, "stream": 0,
                               "time_us": self.time, "frames": frames_of(label), **extra})


def frames_of(label: Label) -> list[dict]:
    """A stack-free frame naming memprop's module and phase for ``memory_viz``: file
    ``<module>`` (the fully qualified module, or ``<step>``), function
    ``<op> [<phase>, <category>]``, line = the storage id."""
    if label.storage_id < 0 and not label.op:
        return []
    what = ", ".join(x for x in (label.phase, label.category) if x)
    return [{"filename": label.module or "<step>", "line": max(label.storage_id, 0),
             "name": f"{label.op or 'free'} [{what}]"}]
