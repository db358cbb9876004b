"""The caching allocator's size rules, as pure functions of sizes in bytes.

Each function is the one of the same name in PyTorch's
``c10/cuda/CUDACachingAllocator.cpp`` (``DeviceCachingAllocator``); NOTE [ The caching
allocator, as modelled ] (memprop.allocator) says which rules are modelled.
"""

from __future__ import annotations

__all__ = ["MIN_BLOCK", "SMALL_SIZE", "SMALL_BUFFER", "MIN_LARGE_ALLOC", "ROUND_LARGE",
           "LARGE_BUFFER", "round_size", "is_small", "allocation_size", "should_split",
           "reusable", "page_size"]

MiB = 1 << 20
MIN_BLOCK = 512              # kMinBlockSize: every size is rounded to a multiple of it
SMALL_SIZE = 1 * MiB         # kSmallSize: the largest request of the small pool
SMALL_BUFFER = 2 * MiB       # kSmallBuffer: small requests are packed in 2 MiB segments
MIN_LARGE_ALLOC = 10 * MiB   # kMinLargeAlloc: requests in (1, 10) MiB take a 20 MiB segment
ROUND_LARGE = 2 * MiB        # kRoundLarge: larger requests are rounded up to 2 MiB
LARGE_BUFFER = 20 * MiB      # kLargeBuffer


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: ``size`` rounded up to the next of ``divisions``
    equal steps between the powers of two around it (1200 B in 4 divisions: 1280 B)."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)      # floor / 2**floor(log2(divisions))
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def round_size(size: int, divisions: int = 0) -> int:
    """``round_size``: the block size (bytes) a request of ``size`` bytes occupies: at
    least 512 B, else a multiple of 512 B, or, with ``roundup_power2_divisions`` > 1 and
    ``size`` above 512 B x divisions, the next power-of-two division."""
    if size < MIN_BLOCK:
        return MIN_BLOCK
    if divisions > 1 and size > MIN_BLOCK * divisions:
        return _roundup_power2_next_division(size, divisions)
    return MIN_BLOCK * ((size + MIN_BLOCK - 1) // MIN_BLOCK)


def is_small(rounded: int) -> bool:
    """``get_pool``: a rounded size of at most 1 MiB is served by the small pool."""
    return rounded <= SMALL_SIZE


def allocation_size(rounded: int) -> int:
    """``get_allocation_size``: bytes of the segment cudaMalloc'd for a rounded request
    no cached block can serve: 2 MiB for the small pool, 20 MiB below 10 MiB, else the
    request rounded up to a multiple of 2 MiB."""
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return ROUND_LARGE * ((rounded + ROUND_LARGE - 1) // ROUND_LARGE)


def should_split(block_size: int, rounded: int, *, small: bool, expandable: bool,
                 max_split_size: int) -> bool:
    """``should_split``: whether serving ``rounded`` bytes from a free block of
    ``block_size`` bytes leaves the remainder as a free block of its own. Small pool or
    expandable segments: a remainder of at least 512 B. Large pool: a request below
    ``max_split_size`` and a remainder above 1 MiB (else the whole block is handed out,
    and counts as allocated)."""
    remaining = block_size - rounded
    if small or expandable:
        return remaining >= MIN_BLOCK
    return rounded < max_split_size and remaining > SMALL_SIZE


def reusable(block_size: int, rounded: int, *, max_split_size: int) -> bool:
    """The ``max_split_size`` rules of ``get_free_block`` for the best-fitting free block:
    a request below ``max_split_size`` never takes an oversize block (one of at least
    ``max_split_size``), and a request of at least ``max_split_size`` takes one only if
    it wastes less than 20 MiB (``block_size < rounded + kLargeBuffer``)."""
    if rounded < max_split_size and block_size >= max_split_size:
        return False
    return not (rounded >= max_split_size and block_size >= rounded + LARGE_BUFFER)


def page_size(small: bool) -> int:
    """The physical page an expandable segment maps at a time (``ExpandableSegment``'s
    ``segment_size``): 2 MiB in the small pool, 20 MiB in the large pool."""
    return SMALL_BUFFER if small else LARGE_BUFFER
