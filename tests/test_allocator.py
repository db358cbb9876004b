"""The simulated caching allocator against the rules of c10/cuda/CUDACachingAllocator.cpp:
each test a hand-computed request sequence for one rule (NOTE [ The caching allocator,
as modelled ], memprop.allocator). Sizes in MiB unless said otherwise."""

import pytest

from memprop.allocator import AllocatorConfig, AllocatorOOM, CachingAllocator, parse_alloc_conf
from memprop.allocator.rules import allocation_size, round_size
from memprop.errors import ConfigError

MiB = 1 << 20


def alloc(**config) -> CachingAllocator:
    return CachingAllocator(AllocatorConfig(**config))


def test_round_size_512_bytes():
    assert [round_size(n) for n in (1, 511, 512, 513, 1000, 1536)] == \
        [512, 512, 512, 1024, 1024, 1536]


def test_round_size_power2_divisions():
    # 300000 B lies in [256 KiB, 512 KiB); 4 divisions of 64 KiB: 262144 + 65536
    assert round_size(300_000, 4) == 327_680 and round_size(300_000) == 300_032
    assert round_size(5 * MiB + 1, 4) == 6 * MiB      # [4, 8) MiB in steps of 1 MiB
    assert round_size(8 * MiB, 4) == 8 * MiB          # a power of two stays
    assert round_size(1200, 4) == 1536                # not above 512 B x 4: plain rounding


def test_segment_sizes():
    assert allocation_size(512) == 2 * MiB                 # small pool
    assert allocation_size(1 * MiB) == 2 * MiB
    assert allocation_size(1 * MiB + 512) == 20 * MiB      # large, below 10 MiB
    assert allocation_size(10 * MiB) == 10 * MiB           # 10 MiB and up: rounded to 2 MiB
    assert allocation_size(11 * MiB + 512) == 12 * MiB


def test_small_pool_packs_a_2mib_segment():
    a = alloc()
    x = a.malloc(1000)
    y = a.malloc(1000)
    assert (a.allocated, a.reserved, a.requested) == (2048, 2 * MiB, 2000)
    assert y.ptr == x.ptr + 1024 and a.segment_count == 1      # remainder >= 512 B: split


def test_one_mib_is_small_one_mib_and_a_byte_is_large():
    a = alloc()
    a.malloc(1 * MiB)
    assert a.reserved == 2 * MiB
    a.malloc(1 * MiB + 1)                                      # rounded to 1 MiB + 512 B
    assert a.reserved == 22 * MiB and a.segment_count == 2


def test_mid_size_requests_share_a_20mib_segment():
    a = alloc()
    x, y = a.malloc(3 * MiB), a.malloc(3 * MiB)
    assert (a.allocated, a.reserved, a.segment_count) == (6 * MiB, 20 * MiB, 1)
    assert y.ptr == x.ptr + 3 * MiB


def test_large_remainder_of_1mib_or_less_is_not_split():
    a = alloc()
    a.malloc(11 * MiB + 1)               # rounded 11 MiB + 512 B in a 12 MiB segment
    assert (a.allocated, a.reserved) == (12 * MiB, 12 * MiB)   # the whole block counts
    b = alloc()
    x = b.malloc(15 * MiB)               # 16 MiB segment, 1 MiB left: not > 1 MiB
    assert b.allocated == 16 * MiB
    b.free(x)
    b.malloc(13 * MiB)                   # 3 MiB left: split
    assert (b.allocated, b.reserved) == (13 * MiB, 16 * MiB)


def test_best_fit_takes_the_smallest_block_that_holds():
    a = alloc()
    x, y = a.malloc(14 * MiB), a.malloc(12 * MiB)
    a.free(x)
    a.free(y)
    z = a.malloc(11 * MiB)
    assert z.ptr == y.ptr and a.reserved == 26 * MiB and a.allocated == 12 * MiB


def test_best_fit_lowest_address_among_equals():
    a = alloc()
    blocks = [a.malloc(12 * MiB) for _ in range(3)]
    for b in reversed(blocks):
        a.free(b)
    assert a.malloc(12 * MiB).ptr == blocks[0].ptr


def test_free_coalesces_so_empty_cache_releases_the_segment():
    a = alloc()
    x, y, z = (a.malloc(3 * MiB) for _ in range(3))
    a.free(x)
    a.free(z)
    assert len(a.large_pool) == 2                 # x's 3 MiB, z's 3 MiB + the 11 MiB rest
    a.empty_cache()
    assert a.reserved == 20 * MiB                 # y still splits the segment: kept
    a.free(y)
    assert len(a.large_pool) == 1 and a.large_pool.at(0).size == 20 * MiB
    a.empty_cache()
    assert (a.reserved, a.segment_count, a.max_reserved) == (0, 0, 20 * MiB)


def test_max_split_size_oversize_block_is_not_split():
    a = alloc(max_split_size_mb=40)
    a.free(a.malloc(50 * MiB))
    a.malloc(45 * MiB)                            # 50 < 45 + 20: reused whole
    assert (a.allocated, a.reserved) == (50 * MiB, 50 * MiB)


def test_max_split_size_limits_oversize_reuse_to_20mib_more():
    a = alloc(max_split_size_mb=40)
    a.free(a.malloc(100 * MiB))
    a.malloc(60 * MiB)                            # 100 >= 60 + 20: a new segment
    assert a.reserved == 160 * MiB


def test_max_split_size_small_request_never_takes_an_oversize_block():
    a = alloc(max_split_size_mb=40)
    a.free(a.malloc(50 * MiB))
    a.malloc(12 * MiB)
    assert a.reserved == 62 * MiB
    b = alloc()                                   # unset: the 50 MiB block is split
    b.free(b.malloc(50 * MiB))
    b.malloc(12 * MiB)
    assert (b.reserved, b.allocated) == (50 * MiB, 12 * MiB)


def test_oom_under_capacity_names_the_request():
    a = alloc(capacity_bytes=30 * MiB)
    a.malloc(25 * MiB)                            # a 26 MiB segment
    with pytest.raises(AllocatorOOM) as exc:
        a.malloc(5 * MiB)                         # needs 20 MiB more
    assert (exc.value.rounded_bytes, exc.value.reserved_bytes, exc.value.limit_bytes) == \
        (5 * MiB, 26 * MiB, 30 * MiB)
    assert a.trace[-1]["action"] == "oom" and a.trace[-1]["device_free"] == 4 * MiB


def test_would_be_oom_frees_cached_segments_and_retries():
    a = alloc(capacity_bytes=40 * MiB)
    x, _ = a.malloc(12 * MiB), a.malloc(14 * MiB)
    a.free(x)                                     # 12 MiB cached
    a.malloc(20 * MiB)                            # 26 + 20 > 40: release x's segment, retry
    assert (a.reserved, a.num_alloc_retries, a.segment_count) == (34 * MiB, 1, 2)
    assert [t["action"] for t in a.trace][-3:] == ["segment_free", "segment_alloc", "alloc"]


def test_memory_fraction_limits_reserved():
    a = alloc(capacity_bytes=100 * MiB, memory_fraction=0.25)     # 25 MiB allowed
    a.free(a.malloc(24 * MiB))
    with pytest.raises(AllocatorOOM) as exc:
        a.malloc(26 * MiB)
    # the cached 24 MiB segment was released before giving up
    assert (exc.value.limit_bytes, exc.value.reserved_bytes) == (25 * MiB, 0)


def test_max_split_size_releases_an_oversize_segment_first():
    a = alloc(max_split_size_mb=40, capacity_bytes=100 * MiB)
    a.free(a.malloc(70 * MiB))
    a.malloc(45 * MiB)        # 70 >= 45 + 20: not reused; 70 + 46 > 100: 70 released
    assert (a.reserved, a.num_alloc_retries) == (46 * MiB, 0)


def test_expandable_segments_grow_one_segment_in_20mib_pages():
    a = alloc(expandable_segments=True, capacity_bytes=1 << 30)
    a.malloc(3 * MiB)
    assert (a.reserved, a.allocated) == (20 * MiB, 3 * MiB)
    a.malloc(30 * MiB)        # the free 17 MiB grows by one 20 MiB page into 37 MiB
    assert (a.reserved, a.allocated, len(a.segments)) == (40 * MiB, 33 * MiB, 1)
    b = alloc(capacity_bytes=1 << 30)
    b.malloc(3 * MiB)
    b.malloc(30 * MiB)
    assert b.reserved == 50 * MiB                 # without: a second segment


def test_expandable_segments_small_pool_maps_2mib_and_splits_any_remainder():
    a = alloc(expandable_segments=True)
    a.malloc(1000)
    assert a.reserved == 2 * MiB
    x = alloc(expandable_segments=True, capacity_bytes=1 << 30).malloc(11 * MiB + 1)
    assert x.size == 11 * MiB + 512               # remainder >= 512 B split, also large


def test_expandable_empty_cache_unmaps_whole_free_pages():
    a = alloc(expandable_segments=True, capacity_bytes=1 << 30)
    a.malloc(3 * MiB)
    a.free(a.malloc(30 * MiB))                    # free: [3, 40) MiB
    a.empty_cache()
    assert a.reserved == 20 * MiB                 # [20, 40) unmapped; [3, 20) stays
    assert [t["action"] for t in a.trace].count("segment_unmap") == 1


def test_expandable_oom_maps_nothing_past_capacity():
    a = alloc(expandable_segments=True, capacity_bytes=50 * MiB)
    a.malloc(30 * MiB)                            # two 20 MiB pages
    with pytest.raises(AllocatorOOM):
        a.malloc(15 * MiB)                        # 10 MiB free, a page more would be 60
    assert a.reserved == 40 * MiB


def test_config_validation_and_alloc_conf():
    c = parse_alloc_conf("expandable_segments:True,max_split_size_mb:128",
                         capacity_bytes="80GiB")
    assert (c.expandable_segments, c.max_split_size, c.capacity_bytes) == \
        (True, 128 * MiB, 80 << 30)
    for bad in (dict(max_split_size_mb=20), dict(roundup_power2_divisions=3),
                dict(memory_fraction=0.5), dict(capacity_bytes=-1)):
        with pytest.raises(ConfigError, match="memprop.allocator"):
            AllocatorConfig(**bad)
    with pytest.raises(ConfigError, match="expandable_segments:VALUE"):
        parse_alloc_conf("garbage_collection_threshold:0.6")
