"""Blocks, segments and the pools of free blocks of the simulated caching allocator
(``Block``, ``BlockPool`` in ``c10/cuda/CUDACachingAllocator.cpp``)."""

from __future__ import annotations

import bisect
import dataclasses

__all__ = ["Block", "Segment", "Pool", "Label"]


@dataclasses.dataclass(frozen=True)
class Label:
    """Who asked for a block: the storage id of the allocation log, its phase, module,
    op and category (memprop.allocation_log)."""

    storage_id: int = -1
    phase: str = ""
    module: str = ""
    op: str = ""
    category: str = ""


@dataclasses.dataclass(eq=False)
class Segment:
    """One cudaMalloc'd range (``address``, ``size`` in bytes), or one expandable
    segment's whole virtual range. ``small``: owned by the small pool."""

    address: int
    size: int
    small: bool
    expandable: bool = False
    label: Label = Label()            # the request that created it


@dataclasses.dataclass(eq=False)
class Block:
    """A range of a segment: allocated (handed to a tensor), free (cached in its pool)
    or, in an expandable segment, unmapped (address space with no memory behind it).
    ``size``: bytes of the block; ``requested``: bytes the tensor asked for;
    ``prev``/``next``: neighbours in the segment, by address."""

    ptr: int
    size: int
    segment: Segment
    allocated: bool = False
    mapped: bool = True
    requested: int = 0
    prev: Block | None = None
    next: Block | None = None
    label: Label = Label()

    @property
    def small(self) -> bool:
        return self.segment.small

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class Pool:
    """Free blocks ordered by (size, address), as ``BlockComparatorSize`` orders them;
    in expandable segments also the unmapped blocks, by address. One stream."""

    def __init__(self, small: bool):
        self.small = small
        self._keys: list[tuple[int, int]] = []       # (size, ptr), sorted
        self._blocks: dict[int, Block] = {}          # ptr -> free block
        self.unmapped: dict[int, Block] = {}         # ptr -> unmapped block

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter([self._blocks[ptr] for _, ptr in self._keys])   # a copy: safe to remove

    def insert(self, block: Block) -> None:
        assert block.ptr not in self._blocks and not block.allocated and block.mapped
        bisect.insort(self._keys, (block.size, block.ptr))
        self._blocks[block.ptr] = block

    def remove(self, block: Block) -> None:
        i = bisect.bisect_left(self._keys, (block.size, block.ptr))
        assert self._keys[i] == (block.size, block.ptr), "block not in its pool"
        del self._keys[i]
        del self._blocks[block.ptr]

    def lower_bound(self, size: int) -> int:
        """Index of the smallest free block of at least ``size`` bytes (lowest address
        among equals); ``len(self)`` if none."""
        return bisect.bisect_left(self._keys, (size, -1))

    def at(self, i: int) -> Block:
        return self._blocks[self._keys[i][1]]
