"""``expandable_segments:True``: one segment per pool, a reserved virtual range of about
the device's memory, backed by physical pages mapped as needed (2 MiB pages in the
small pool, 20 MiB in the large pool) and unmapped when released. The functions of the
same names in ``c10/cuda/CUDACachingAllocator.cpp`` (Note [Expandable Segments])."""

from __future__ import annotations

from memprop.allocator.blocks import Block, Label, Pool, Segment
from memprop.allocator.rules import page_size

__all__ = ["ExpandableSegments"]

_NO_CAPACITY_VSPACE = 1 << 40    # virtual range when the device's capacity is not given


def _allocatable(b: Block | None) -> bool:
    return b is not None and not b.allocated


class ExpandableSegments:
    """The expandable-segment half of ``CachingAllocator`` (a mixin: it reads and writes
    the allocator's pools, counters and trace)."""

    # provided by CachingAllocator (memprop.allocator.simulator)
    capacity_bytes: int | None
    reserved: int
    segments: dict[int, Segment]

    def _new_address(self, size: int) -> int:
        raise NotImplementedError

    def _try_merge(self, dst: Block, src: Block | None, pool: Pool) -> int:
        raise NotImplementedError

    def _add_reserved(self, nbytes: int) -> None:
        raise NotImplementedError

    def _trace(self, action: str, addr: int, size: int, label: Label) -> None:
        raise NotImplementedError

    def _find_expandable_block(self, pool: Pool, size: int, label: Label) -> Block:
        """``find_expandable_block``: the lowest-addressed run of free and unmapped blocks
        with ``size`` bytes of room, else a new segment's whole unmapped range."""
        for ptr in sorted(pool.unmapped):
            c: Block = pool.unmapped[ptr]
            b: Block | None
            if c.prev is not None and _allocatable(c.prev):
                c = c.prev                 # a free block right before it counts too
            room, b = 0, c
            while room < size and b is not None and _allocatable(b):
                room += b.size
                b = b.next
            if room >= size:
                return c
        page = page_size(pool.small)
        vspace = (_NO_CAPACITY_VSPACE if self.capacity_bytes is None
                  else self.capacity_bytes + self.capacity_bytes // 8)   # 1 1/8 of memory
        vsize = page * -(-vspace // page)
        seg = Segment(address=self._new_address(vsize), size=vsize, small=pool.small,
                      expandable=True, label=label)
        self.segments[seg.address] = seg
        c = Block(ptr=seg.address, size=vsize, segment=seg, mapped=False)
        pool.unmapped[c.ptr] = c
        return c

    def _map_block(self, to_map: Block, size: int, pool: Pool, label: Label) -> bool:
        """``map_block``: back the first ``size`` bytes of an unmapped block with whole
        pages; False (nothing mapped) when the device cannot hold them."""
        page = page_size(pool.small)
        mapped = page * -(-size // page)
        if self.capacity_bytes is not None and self.reserved + mapped > self.capacity_bytes:
            return False
        del pool.unmapped[to_map.ptr]
        to_map.mapped = True
        if mapped < to_map.size:
            rest = Block(ptr=to_map.ptr + mapped, size=to_map.size - mapped,
                         segment=to_map.segment, mapped=False, prev=to_map, next=to_map.next)
            if to_map.next is not None:
                to_map.next.prev = rest
            to_map.next = rest
            pool.unmapped[rest.ptr] = rest
            to_map.size = mapped
        self._try_merge(to_map, to_map.prev, pool)
        self._try_merge(to_map, to_map.next, pool)
        pool.insert(to_map)
        self._add_reserved(mapped)
        self._trace("segment_map", to_map.ptr, mapped, label)
        return True

    def _try_allocate_expandable_block(self, pool: Pool, size: int,
                                       label: Label) -> Block | None:
        """``try_allocate_expandable_block``: map pages until a free block of ``size``
        bytes exists at the lowest address that can hold it; None when a map fails."""
        c = self._find_expandable_block(pool, size, label)
        if not c.mapped and not self._map_block(c, min(c.size, size), pool, label):
            return None
        while c.size < size:
            nxt = c.next
            assert nxt is not None and not nxt.mapped, "room was counted to the segment's end"
            if not self._map_block(nxt, min(size - c.size, nxt.size), pool, label):
                return None
            c = nxt                        # it absorbed c
        pool.remove(c)
        return c

    def _unmap_block(self, block: Block, pool: Pool, label: Label) -> None:
        """``unmap_block``: return the whole pages inside a free block; what is left on
        either side stays mapped, as free blocks."""
        page, seg = page_size(pool.small), block.segment
        begin = seg.address + page * -(-(block.ptr - seg.address) // page)
        end = seg.address + page * ((block.ptr + block.size - seg.address) // page)
        if begin >= end:
            return
        pool.remove(block)
        if begin > block.ptr:
            before = Block(ptr=block.ptr, size=begin - block.ptr, segment=seg,
                           prev=block.prev, next=block)
            if block.prev is not None:
                block.prev.next = before
            block.prev = before
            pool.insert(before)
        if block.ptr + block.size > end:
            after = Block(ptr=end, size=block.ptr + block.size - end, segment=seg,
                          prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = after
            block.next = after
            pool.insert(after)
        block.ptr, block.size, block.mapped = begin, end - begin, False
        self._try_merge(block, block.prev, pool)
        self._try_merge(block, block.next, pool)
        pool.unmapped[block.ptr] = block
        self._add_reserved(-(end - begin))
        self._trace("segment_unmap", begin, end - begin, label)
        if block.prev is None and block.next is None:      # nothing mapped is left
            del pool.unmapped[block.ptr]
            del self.segments[seg.address]
