"""Invariants of the simulated allocator on random request sequences (seeded), and the
allocation log of a measured and an estimated step replayed through it."""

import random

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memprop
from memprop.allocation_log import ALLOCATION_COLUMNS
from memprop.allocator import (
    AllocatorConfig,
    AllocatorOOM,
    AllocEvent,
    CachingAllocator,
    largest_batch,
    replay,
    replay_measurement,
)
from memprop.allocator.rules import round_size
from memprop.allocator.snapshot import snapshot_segments
from memprop.errors import ConfigError

MiB = 1 << 20
CONFIGS = {
    "default": AllocatorConfig(),
    "max_split": AllocatorConfig(max_split_size_mb=32),
    "divisions": AllocatorConfig(roundup_power2_divisions=4),
    "expandable": AllocatorConfig(expandable_segments=True, capacity_bytes=4 << 30),
    "capacity": AllocatorConfig(capacity_bytes=160 * MiB),
    "fraction": AllocatorConfig(capacity_bytes=400 * MiB, memory_fraction=0.4,
                                max_split_size_mb=24),
    "expandable_capacity": AllocatorConfig(expandable_segments=True,
                                           capacity_bytes=160 * MiB),
}


def check(a: CachingAllocator, live: dict) -> None:
    """Every invariant the allocator keeps, checked from its blocks."""
    cfg = a.config
    assert a.reserved >= a.allocated >= a.requested >= 0
    assert a.allocated == sum(b.size for b in a.active.values())
    assert a.requested == sum(b.requested for b in live.values())
    rounded = sum(round_size(b.requested, cfg.roundup_power2_divisions) for b in live.values())
    if cfg.expandable_segments:
        assert a.allocated == rounded         # every remainder (>= 512 B) is split off
    else:
        assert a.allocated >= rounded         # large remainders of <= 1 MiB are not
    segments = snapshot_segments(a)
    assert sum(s["total_size"] for s in segments) == a.reserved
    for s in segments:
        addr = s["address"]
        for prev, b in zip([None, *s["blocks"]], s["blocks"]):
            assert b["address"] == addr                           # blocks tile the segment
            addr += b["size"]
            assert not (prev and prev["state"] == b["state"] == "inactive")   # coalesced
    if cfg.capacity_bytes is not None:
        assert a.reserved <= cfg.capacity_bytes
    if cfg.allowed_bytes is not None:
        assert a.reserved <= cfg.allowed_bytes


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", range(6))
def test_invariants_on_random_sequences(name, seed):
    rng = random.Random(seed)
    a = CachingAllocator(CONFIGS[name])
    live: dict = {}
    for step in range(400):
        if live and (rng.random() < 0.45 or len(live) > 60):
            a.free(live.pop(rng.choice(list(live))))
        else:
            size = int(2 ** rng.uniform(0, 26))               # 1 B to 64 MiB, log-uniform
            try:
                live[step] = a.malloc(size)
            except AllocatorOOM as exc:
                assert exc.reserved_bytes == a.reserved
        check(a, live)
        if rng.random() < 0.02:
            a.empty_cache()
            check(a, live)
    for b in list(live.values()):
        a.free(b)
    a.empty_cache()
    assert (a.allocated, a.reserved) == (0, 0)                # nothing leaks


def test_replay_reports_peaks_fragmentation_and_oom():
    events = [AllocEvent("alloc", 0, 3 * MiB), AllocEvent("alloc", 1, 0),
              AllocEvent("alloc", 2, 18 * MiB), AllocEvent("free", 0),
              AllocEvent("free", 1), AllocEvent("alloc", 3, 5 * MiB, phase="backward")]
    r = replay(events).report
    # 3 MiB in a 20 MiB segment, 18 MiB in its own; 5 MiB then reuses the 20 MiB one
    assert (r.max_allocated_bytes, r.max_reserved_bytes, r.max_requested_bytes) == \
        (23 * MiB, 38 * MiB, 23 * MiB)
    assert (r.reserved_at_peak_bytes, r.fragmentation_bytes) == (38 * MiB, 15 * MiB)
    assert (r.max_segments, r.segments, r.events, r.oom) == (2, 2, 6, None)
    small = replay(events, AllocatorConfig(capacity_bytes=30 * MiB)).report
    assert small.oom is not None and small.events == 3
    assert (small.oom.event_index, small.oom.storage_id, small.oom.reserved_bytes) == \
        (2, 2, 20 * MiB)


def test_replay_refuses_an_inconsistent_log():
    with pytest.raises(ConfigError, match="not live"):
        replay([AllocEvent("free", 7)])
    with pytest.raises(ConfigError, match="live already"):
        replay([AllocEvent("alloc", 1, 10), AllocEvent("alloc", 1, 10)])


def _mlp_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return model, (torch.randn(64, 512), torch.randint(0, 10, (64,)))


def test_measured_and_estimated_logs_are_the_same_and_match_the_tracker():
    model, batch = _mlp_step()
    m = memprop.measure_step(model, batch, loss_fn=F.cross_entropy, timing=False,
                             flops=False, inference=False)
    e = memprop.estimate(model, batch, loss_fn=F.cross_entropy, flops=False,
                         inference=False)
    assert m.allocations.equals(e.allocations)
    log = m.allocations
    # first rows: what is live before the first step, weights and batch
    first = log[log.module == ""].head(6)
    assert list(first.size_bytes) == [1024 * 512 * 4, 1024 * 4, 10 * 1024 * 4, 10 * 4,
                                      64 * 512 * 4, 64 * 8]
    run = replay_measurement(m)
    # the tensor-level peak of the events is the tracker's peak (first step's here: the
    # SGD step creates no state, the two steps are alike)
    assert run.report.max_requested_bytes == max(m.peak_bytes, m.first_step_peak_bytes)
    # sizes are multiples of 512 B here but the 4-byte loss: allocated = requested + rounding
    assert run.report.max_allocated_bytes >= run.report.max_requested_bytes
    assert replay_measurement(e).report == run.report


def test_each_rank_of_a_sharded_prediction_replays():
    """FSDP2's all-gather buffers are resized in place: the log has them as allocations
    and frees, and each rank's requested peak is that rank's tracker peak."""
    from memprop.models import model_config
    from memprop.sharded import FSDPConfig, RankJob, predict_job

    job = RankJob(config=model_config("mlp", depth=2, width=64), batch_size=4,
                  fsdp=FSDPConfig(world_size=2))
    for m in predict_job(job).ranks.values():
        assert (m.allocations.op == "resize_").any()
        report = replay_measurement(m).report
        assert report.max_requested_bytes == m.peak_bytes
        assert report.max_reserved_bytes >= report.max_allocated_bytes >= m.peak_bytes


class _Step:
    """A step of ``batch``: a 12 MiB weight, then ``batch`` MiB of activation, freed."""

    def __init__(self, batch: int):
        rows = [("alloc", 0, 12 * MiB), ("alloc", 1, batch * MiB), ("free", 1, 0)]
        self.allocations = pd.DataFrame(
            [(i, a, s, n, "forward", "m", "op", "temporary") for i, (a, s, n) in enumerate(rows)],
            columns=list(ALLOCATION_COLUMNS))


def test_largest_batch_under_a_memory_fraction():
    # 12 MiB segment + the activation's: 2 MiB (batch 1), 20 MiB (2..9), else the batch
    # rounded up to 2 MiB: under 40 MiB (half of 80) the largest is 28 (12 + 28 = 40)
    fit = largest_batch(_Step, AllocatorConfig(capacity_bytes=80 * MiB, memory_fraction=0.5))
    assert (fit.batch, fit.report.max_reserved_bytes) == (28, 40 * MiB)
    assert fit.failed.oom.size_bytes == 29 * MiB
    assert [b for b, _, _ in fit.tried] == [1, 2, 4, 8, 16, 32, 24, 28, 30, 29]
    # under 30 MiB a 2 MiB activation takes a 20 MiB segment (32 MiB) though 10 MiB fits
    # in its own (22 MiB): fitting is not monotone in the batch, and the search says 1
    fit = largest_batch(_Step, AllocatorConfig(capacity_bytes=30 * MiB))
    assert fit.batch == 1 and fit.failed.oom.size_bytes == 2 * MiB
    assert replay_measurement(_Step(10), AllocatorConfig(capacity_bytes=30 * MiB)).report.oom \
        is None
    with pytest.raises(ConfigError, match="needs a limit"):
        largest_batch(_Step, AllocatorConfig())
