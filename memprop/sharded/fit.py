"""Fit a cluster: per world size and TP degree, the largest micro-batch per rank that fits
a device's memory with no checkpointing, with ``full`` and with the per-rank plan.

    table = fit_cluster(cfg, "80GiB", world_sizes=(8, 64), tps=(1, 8), optimizer="adam",
                        dtype=torch.bfloat16)
    table[["world_size", "tp", "strategy", "batch_size", "peak_bytes", "recompute_flops"]]

Every memprop figure is a prediction on a fake process group under fake tensors
(memprop.sharded.predict); the closed forms beside it (memprop.sharded.closed_forms) are
predictions by formula. The budget is on the tensor-level peak of the largest rank
(level 1 of DESIGN.md's three levels: no allocator rounding, no fragmentation).

NOTE [ Searching the micro-batch with few predictions ]
  A rank's live bytes at each op of the step are, for one strategy, an affine function
  of the micro-batch (activations and the batch scale with it; parameters, gradients and
  optimizer state do not), so its peak, the largest of them, is a maximum of affine
  functions: piecewise affine and convex in the micro-batch (the peak can move from the
  optimizer step to the start of backward as the batch grows: a 4-block transformer,
  d_model 128, at 4 ranks under Adam grows 1.7 MiB from batch 1 to 2, then 2.3 MiB a
  step). So ``largest_batch`` predicts at batch 1 and guesses where the peak reaches
  the budget from what grows with the batch at that peak (activations, temporaries,
  the batch); while every prediction fits, the next guess extrapolates the line through
  the two largest. By convexity a line through two points lies below the peak beyond
  them, so an extrapolated guess can be too large, never too small for that line; once
  a guess does not fit, the bracket (largest batch that fits, smallest that does not)
  is narrowed at the chord's crossing (by convexity the chord lies above the peak inside
  the bracket, so its crossing fits), then the batch above it, or halved when the chord
  would not narrow it, until the two are adjacent. The answer is therefore always
  confirmed by two predictions, at it and one above: where the peak is affine, three
  or four predictions in all, whatever the answer (the 7B-shaped Llama of the README,
  8, 64 and 512 ranks by TP 1 and 8, none and full: 39 predictions for 12 searches).
  Each is made once (memprop.sharded.predictions).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import pandas as pd
import torch

from memprop.errors import ConfigError
from memprop.sharded.closed_forms import closed_forms
from memprop.sharded.config import FSDPConfig
from memprop.sharded.plan import plan_rank, rank_peak_parts
from memprop.sharded.predictions import RankPredictions, RecomputeFlops
from memprop.units import parse_size

__all__ = ["largest_batch", "fit_cluster", "BATCH_LIMIT"]

BATCH_LIMIT = 4096      # micro-batches per rank searched at most
PLAN_ROUNDS = 2         # single-device plans per plan_rank in a fit (a 7B one: ~30 s each)


def largest_batch(peak_of: Callable[[int], int], budget: int, *,
                  limit: int = BATCH_LIMIT,
                  per_example: Callable[[], int] | None = None) -> int:
    """The largest micro-batch ``b`` in [1, ``limit``] with ``peak_of(b) <= budget``,
    0 if 1 does not fit (NOTE [ Searching the micro-batch with few predictions ]);
    ``peak_of`` is assumed non-decreasing. Unless the answer is 0 or ``limit``,
    ``peak_of`` has been called at it and at one above. ``per_example``: bytes the peak
    grows per example, read off the first prediction, for the first guess (else the
    second prediction is at 2)."""
    points = {1: peak_of(1)}
    if points[1] > budget:
        return 0
    lo, hi = 1, None                  # fits / does not fit
    while hi is None or hi - lo > 1:
        if hi is None:
            below = max(b for b in points if b < lo) if len(points) > 1 else None
            if below is not None:
                guess = _cross(below, points[below], lo, points[lo], budget)
            elif per_example is not None:
                guess = 1 + (budget - points[1]) // max(per_example(), 1)
            else:
                guess = 2
            guess = min(max(guess, lo + 1), limit)
        else:
            guess = _cross(lo, points[lo], hi, points[hi], budget)
            if guess <= lo:           # the chord says lo: confirm with the one above
                guess = lo + 1
            elif guess >= hi:
                guess = (lo + hi) // 2
        if guess == lo:               # lo == limit
            return lo
        points[guess] = peak_of(guess)
        if points[guess] <= budget:
            lo = guess
        else:
            hi = guess
    return lo


def _cross(a: int, pa: int, b: int, pb: int, budget: int) -> int:
    """Where the line through (a, pa) and (b, pb) reaches ``budget``, rounded down (a
    large step when the line does not rise)."""
    if pb <= pa:
        return 2 * max(a, b)
    return a + (budget - pa) * (b - a) // (pb - pa)


def fit_cluster(config, device_memory, *, world_sizes: Sequence[int] = (8, 64, 512),
                tps: Sequence[int] = (1,), optimizer: str = "adam",
                dtype: torch.dtype = torch.bfloat16, plan: bool = True,
                limit: int = BATCH_LIMIT, progress: Callable[[str], None] | None = None,
                layers: str = "all") -> pd.DataFrame:
    """One row per (world size, TP degree, strategy in none / full / plan): the largest
    micro-batch per rank whose predicted per-rank peak fits ``device_memory`` (bytes or
    a size string; 0: not even one), the peak there and at one more
    (``above_peak_bytes``), the recompute FLOPs per rank there, the plan's spec, and the
    closed forms at that batch (ZeRO-3 model states, Megatron's activations, their sum
    as ``closed_form_peak_bytes``, and the largest batch that sum allows,
    ``closed_form_batch_size``). ``plan`` False leaves the plan rows out (each costs
    single-device plans). ``cell_s``: the wall time of the cell (its predictions and
    plans), seconds; ``predictions``: how many it made, ``extrapolated`` of them from
    the model at 3, 4 and 5 layers (``layers``: ``memprop.sharded.predict``'s)."""
    budget = parse_size(device_memory)
    cells = []
    for w in world_sizes:
        for t in tps:
            if w % t:
                raise ConfigError(f"memprop fit: world size {w} is not divisible by TP "
                                  f"degree {t}; each world size must be a multiple of "
                                  "every --tp")
            cells.append(FSDPConfig(world_size=w, tp=t))
    recompute = RecomputeFlops(config, optimizer=optimizer, dtype=dtype)
    rows = []
    for fsdp in cells:
        if progress:
            progress(f"world size {fsdp.world_size}, tp {fsdp.tp}")
        start = time.perf_counter()
        runs = RankPredictions(config, fsdp, optimizer=optimizer, dtype=dtype, layers=layers)
        found: dict[str, dict] = {}
        for spec in ("none", "full"):
            b = largest_batch(functools.partial(_peak, runs, spec), budget, limit=limit,
                              per_example=functools.partial(_per_example, runs, spec))
            found[spec] = dict(strategy=spec, spec=spec, batch_size=b,
                               peak_bytes=runs.peak(b, spec) if b else None,
                               above_peak_bytes=runs.peak(b + 1, spec) if b < limit else None,
                               recompute_flops=recompute.flops(b, spec, tp=fsdp.tp) if b
                               else None, fits=b > 0)
        if plan:
            found["plan"] = _plan_row(config, fsdp, budget, found["full"]["batch_size"],
                                      runs, optimizer=optimizer, dtype=dtype, limit=limit)
        seconds = time.perf_counter() - start
        for row in found.values():
            rows.append(dict(world_size=fsdp.world_size, tp=fsdp.tp, shard=fsdp.shard,
                             **row, **_closed(config, fsdp, row, budget, optimizer, dtype),
                             predictions=runs.made, extrapolated=runs.extrapolated,
                             cell_s=seconds))
    return pd.DataFrame(rows)


def _peak(runs: RankPredictions, spec: str, batch_size: int) -> int:
    return runs.peak(batch_size, spec)


def _per_example(runs: RankPredictions, spec: str) -> int:
    """What grows with the micro-batch at the largest rank's peak at batch 1: its
    activations, temporaries (less the gathered parameters) and batch (memprop.sharded.
    plan.rank_peak_parts); only the search's first guess (NOTE [ Searching the
    micro-batch with few predictions ])."""
    one = runs.get(1, spec)
    parts = rank_peak_parts(one.rank(one.largest_rank))
    return parts["activations"] + parts["other temporaries"] + parts["batch and buffers"]


def _plan_row(config, fsdp: FSDPConfig, budget: int, full_batch: int,
              runs: RankPredictions, *, optimizer: str, dtype, limit: int) -> dict:
    """The per-rank plan's row: from ``full``'s largest batch (``full`` is among the
    planner's candidates, so a plan usually fits there) upward while ``plan_rank``
    fits, one batch at a time; the plan at the largest that fits, and the one above it
    (not fitting)."""
    best, b, above = None, max(full_batch, 1), None
    while b <= limit:
        p = plan_rank(config, b, fsdp, budget, optimizer=optimizer, dtype=dtype,
                      predictions=runs, rounds=PLAN_ROUNDS)
        if not p.fits:
            above = p
            break
        best, b = p, b + 1
    if best is None:
        return dict(strategy="plan", spec=None, batch_size=0, peak_bytes=None,
                    above_peak_bytes=above.predicted_peak_bytes if above else None,
                    recompute_flops=None, fits=False)
    return dict(strategy="plan", spec=best.spec, batch_size=best.batch_size,
                peak_bytes=best.predicted_peak_bytes,
                above_peak_bytes=above.predicted_peak_bytes if above else None,
                recompute_flops=best.recompute_flops, fits=True)


def _closed(config, fsdp: FSDPConfig, row: dict, budget: int, optimizer: str,
            dtype) -> dict:
    """The closed forms at the row's batch (or 1 when nothing fits), and the largest batch
    for which ZeRO-3 plus Megatron's activations (none or full recompute; the plan's
    row: full) stay within the budget."""
    recompute = "none" if row["strategy"] == "none" else "full"
    cf = closed_forms(config, max(row["batch_size"], 1), fsdp, optimizer=optimizer,
                      dtype=dtype)
    one = closed_forms(config, 1, fsdp, optimizer=optimizer, dtype=dtype)
    act_one = one.megatron_none_bytes if recompute == "none" else one.megatron_full_bytes
    batch = (None if not act_one else max(0, (budget - one.zero3_bytes) // act_one))
    return dict(zero3_bytes=cf.zero3_bytes, zero3_paper_bytes=cf.zero3_paper_bytes,
                megatron_bytes=(cf.megatron_none_bytes if recompute == "none"
                                else cf.megatron_full_bytes),
                closed_form_peak_bytes=cf.peak(recompute), closed_form_batch_size=batch)
