"""A ``ShardedMeasurement`` as one flat result row (raw bytes): what a sweep stores for a
sharded trial (memprop.sweep.sharded_trial) and what its report draws.

    row = sharded_row(predict(cfg, 8, world_size=64))
    row["peak_bytes"], row["rank_peak_bytes"]            # the largest rank, every rank
    row["activation_bytes_at_peak"]                      # at the largest rank's peak
    row["gradient_max_bytes"]                            # at its own maximum (that rank)

NOTE [ A rank's categories at its peak ]
  A rank's ``<category>_bytes_at_peak`` are read from its timeline at the row of its
  peak (the first row whose total is the largest), so they add up to ``peak_bytes``
  exactly: a stacked bar of them is the peak, split by what holds it. (The tracker's
  ``peak_by_category`` is each category's own maximum, and those need not coincide.)
  Under FSDP2 ``parameter`` is the rank's shard, ``gradient`` its gradient shard,
  ``optimizer`` its optimizer-state shard, all divided by the shard degree; the
  all-gathered parameters are ``temporary``, or ``activation`` while autograd holds them
  for backward (NOTE [ Gathered parameters ], memprop.sharded.resizes), and are given
  apart as ``gathered_bytes_at_peak``.
"""

from __future__ import annotations

from typing import Any

from memprop.measure import bytes_at_peak
from memprop.sharded.result import ShardedMeasurement
from memprop.tracker import CATEGORIES, PHASES

__all__ = ["sharded_row", "bytes_at_peak"]


def sharded_row(s: ShardedMeasurement) -> dict[str, Any]:
    """Every rank's peak, stored bytes and categories at its peak (lists by rank), and
    the largest rank's figures as scalars (``peak_bytes`` is the run's)."""
    row = s.to_json()
    row["sharded_wall_s"] = row.pop("seconds")
    largest = s.rank(s.largest_rank)
    for phase in PHASES[:3]:
        row[f"{phase}_peak_bytes"] = row["peak_by_phase"].get(phase, 0)
    del row["peak_by_phase"]
    per_rank = {r: {c: bytes_at_peak(m).get(c, 0) for c in CATEGORIES}
                for r, m in s.ranks.items()}
    for c in CATEGORIES:
        row[f"{c}_bytes_at_peak"] = per_rank[s.same_as[s.largest_rank]][c]
        row[f"rank_{c}_bytes_at_peak"] = [per_rank[s.same_as[r]][c]
                                          for r in range(s.world_size)]
    for c in CATEGORIES:        # each category's own maximum over the step (largest rank)
        row[f"{c}_max_bytes"] = largest.peak_by_category.get(c, 0)
    row.update(saved_bytes=largest.saved_bytes, saved_count=largest.saved_count,
               start_bytes=largest.start_bytes,
               gathered_bytes_at_peak=largest.meta.get("gathered_bytes_at_peak"),
               gathered_peak_bytes=largest.meta.get("gathered_peak_bytes"))
    return row
