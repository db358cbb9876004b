"""Pareto fronts: of the choices the planner weighs, those no other beats on both
what they keep (bytes) and what they cost (recompute FLOPs). One rule for every search:
sort by bytes, then cost (then ``tie``), and keep each entry cheaper than every entry
before it; among equals the first in that order stays.

    pareto([(need, cost, payload), ...])          # lists of entries
    front_arrays(m, cost, *columns)               # numpy columns, vectorised (the DPs)
    forward_front(calls)                          # the forward's keys, a 0/1 knapsack
"""

from __future__ import annotations

import itertools
import math
from operator import itemgetter
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from memprop.checkpoint.planning.profile import OpCall

__all__ = ["pareto", "front_arrays", "forward_front"]


def pareto(entries, *, need: Callable = itemgetter(0), cost: Callable = itemgetter(1),
           tie: Callable | None = None) -> list:
    """The entries no other beats on both ``need`` (bytes) and ``cost``, by need
    ascending (ties: ``tie``, then input order)."""
    order = sorted(entries, key=lambda e: (need(e), cost(e), tie(e) if tie else 0))
    front, best = [], math.inf
    for entry in order:
        if cost(entry) < best:
            front.append(entry)
            best = cost(entry)
    return front


def front_arrays(m, cost, *columns):
    """The entries no other entry beats on both retained bytes ``m`` and ``cost``
    (ties: the first in (m, cost) order), each array filtered alike."""
    order = np.lexsort((cost, m))
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(cost[order])[:-1]))
    keep = order[cost[order] < best_before]
    return (m[keep], cost[keep], *(col[keep] for col in columns))


def forward_front(calls: list[OpCall], *, early: float = 0.0) -> list[tuple]:
    """(kept bytes, recompute FLOPs, keys) of the cheapest ``Forward`` keys for each
    amount of kept bytes, the Pareto front over every subset of the forward's
    FLOP-carrying calls before its last ``early`` FLOPs (NOTE [ One checkpoint around
    the forward ], memprop.checkpoint.forms.whole): a 0/1 knapsack, exact. Kept
    bytes exclude what the forward stores with no keys (the batch, the loss's
    tensors)."""
    total = sum(c.flops for c in calls)
    starts = itertools.accumulate((c.flops for c in calls), initial=0)
    needed = [c for c, start in zip(calls, starts) if c.flops > 0 and start < total - early]
    m = np.zeros(1, dtype=np.int64)
    cost = np.array([float(sum(c.flops for c in needed))])
    chosen = np.empty(1, dtype=object)
    chosen[0] = ()                       # keys as a cons list: (key, rest)
    for call in needed:
        if call.mutated:                 # cannot be cached (OpCall): always recomputed
            continue
        taken = np.empty(len(chosen), dtype=object)
        taken[:] = [(call.key, rest) for rest in chosen]
        m, cost, chosen = front_arrays(np.concatenate([m, m + call.out_bytes]),
                                       np.concatenate([cost, cost - call.flops]),
                                       np.concatenate([chosen, taken]))
    out = []
    for bytes_, flops, cons in zip(m.tolist(), cost.tolist(), chosen):
        keys = []
        while cons:
            key, cons = cons
            keys.append(key)
        out.append((int(bytes_), float(flops), frozenset(keys)))
    return out
