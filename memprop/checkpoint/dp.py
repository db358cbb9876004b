"""The planner's cost model of a chain, its exact dynamic program, and a brute force.

NOTE [ The chain cost model ]
  A chain of n blocks passes boundary tensors t[0..n] (t[k] is block k's input, t[k+1]
  its output). Block k may save its input (``saves_in``), its output (``saves_out``) and
  other tensors of ``inner[k]`` bytes; ``keep[k]`` says t[k] is kept whatever the plan
  (the batch, or a tensor saved outside the chain). A *placement* stores some blocks
  and groups the others into checkpointed segments [i..j]. Then, in bytes:
    retained   = const + Σ_{stored k} inner[k]
                 + Σ_k t[k]·[keep[k] or (k stored and saves_in[k]) or (k-1 stored and
                   saves_out[k-1]) or (a segment starts at k)]       (each storage once)
    recompute of segment [i..j] in backward holds what is retained before it (t[i]
    included) plus the segment's own tensors:
                 Σ_{k=i..j} inner[k] + Σ_{k=i+1..j+1} t[k]·[saves_in[k] or saves_out[k-1]]
    backward reaches block k (stored) or segment [i..j] when the parameter gradients of
    every later block exist: G(k) = Σ_{q>k} grad[q] + grad_post (the chain's tail, e.g.
    a head, gets its gradients first); each such moment adds G to what is held then
    peak       = max(retained + G(n), max over stored blocks k of (retained up to k)
                 + G(k+1), max over segments of that recompute term + G(j+1))
    cost       = Σ over checkpointed blocks of their forward FLOPs (each recomputed once)
  Sharing a boundary tensor between neighbours is what makes per-block checkpointing of
  a ReLU MLP store almost as much as no checkpointing: each block's checkpointed input
  is the tensor the previous block's ReLU already saves.
  The DP (``solve``) is exact for this model: states (block index, previous block stored
  or not) carry the Pareto front of (retained bytes, cost). ``brute_force`` enumerates
  every placement; tests check the two agree. Allocator-level effects (gradients in
  flight, parameter gradients) are not in the model: the planner calibrates them from a
  simulated step and checks each plan by simulation (memprop.checkpoint.planner).
"""

from __future__ import annotations

import dataclasses
import itertools

__all__ = ["ChainCosts", "model_peak", "solve", "min_peak", "brute_force", "segments_of"]


@dataclasses.dataclass(frozen=True)
class ChainCosts:
    """Per-block bytes and costs of a chain (see NOTE). ``t`` has n + 1 entries."""

    t: tuple[int, ...]
    inner: tuple[int, ...]
    saves_in: tuple[bool, ...]
    saves_out: tuple[bool, ...]
    keep: tuple[bool, ...]           # n + 1 entries
    flops: tuple[float, ...]
    const: int = 0
    grad: tuple[int, ...] = ()       # parameter-gradient bytes of each block (default 0)
    grad_post: int = 0               # of the parameters used after the chain

    def grads_after(self, k: int) -> int:
        """G(k-1): gradient bytes present when backward reaches block k - 1."""
        return sum(self.grad[k:]) + self.grad_post if self.grad else self.grad_post

    @property
    def n(self) -> int:
        return len(self.inner)


# A placement is a tuple of n labels: "S" (stored), "C" (starts a checkpointed segment),
# "c" (continues the segment of the block before it).

def segments_of(placement) -> list[tuple[int, int]]:
    segs = []
    for k, label in enumerate(placement):
        if label == "C":
            segs.append([k, k])
        elif label == "c":
            segs[-1][1] = k
    return [tuple(s) for s in segs]


def _kept_before(c: ChainCosts, k: int, prev_stored: bool) -> bool:
    """t[k] is retained whatever block k does: kept outside, or saved by block k-1."""
    return c.keep[k] or (prev_stored and c.saves_out[k - 1])


def _store(c: ChainCosts, k: int, prev_stored: bool) -> int:
    """Retained bytes added by storing block k."""
    kept = _kept_before(c, k, prev_stored) or c.saves_in[k]
    return (c.t[k] if kept else 0) + c.inner[k]


def _segment(c: ChainCosts, i: int, j: int) -> tuple[int, int]:
    """(retained bytes added, extra bytes held while recomputing) for segment [i..j]:
    its input t[i] and boundaries kept outside are retained; the recompute brings back
    the blocks' own tensors and the boundaries they save."""
    retained = c.t[i] + sum(c.t[k] for k in range(i + 1, j + 1) if c.keep[k])
    held = sum(c.inner[i:j + 1])
    for k in range(i + 1, j + 1):
        if (c.saves_in[k] or c.saves_out[k - 1]) and not c.keep[k]:
            held += c.t[k]
    if c.saves_out[j] or c.keep[j + 1]:
        held += c.t[j + 1]
    return retained, held


def _finish(c: ChainCosts, prev_stored: bool) -> int:
    return c.t[c.n] if _kept_before(c, c.n, prev_stored) else 0


def model_peak(c: ChainCosts, placement) -> tuple[int, float]:
    """(peak bytes, recompute cost) of a placement under the cost model."""
    m, peak, cost, prev_stored = c.const, 0, 0.0, False
    ends = dict(segments_of(placement))
    k = 0
    while k < c.n:
        if placement[k] == "S":
            m += _store(c, k, prev_stored)
            peak = max(peak, m + c.grads_after(k + 1))
            prev_stored, k = True, k + 1
        else:
            j = ends[k]
            retained, held = _segment(c, k, j)
            m += retained
            peak = max(peak, m + held + c.grads_after(j + 1))
            cost += sum(c.flops[k:j + 1])
            prev_stored, k = False, j + 1
    return max(peak, m + _finish(c, prev_stored) + c.grads_after(c.n)), cost


def brute_force(c: ChainCosts, budget: int):
    """(cost, placement) of the cheapest placement with peak <= budget, or None."""
    best = None
    for labels in itertools.product("SCc", repeat=c.n):
        if any(lab == "c" and (k == 0 or labels[k - 1] == "S") for k, lab in enumerate(labels)):
            continue
        peak, cost = model_peak(c, labels)
        if peak <= budget and (best is None or cost < best[0]):
            best = (cost, labels)
    return best


def _pareto(items):
    """Keep (m, cost, labels) entries no other entry beats on both m and cost."""
    items.sort(key=lambda e: (e[0], e[1]))
    front, best_cost = [], float("inf")
    for e in items:
        if e[1] < best_cost:
            front.append(e)
            best_cost = e[1]
    return front


def solve(c: ChainCosts, budget: int):
    """(cost, placement) of the cheapest placement with model peak <= budget, or None.

    Exact for the cost model; O(n² · front) with fronts of (retained, cost) pairs."""
    n = c.n
    after = [c.grads_after(k) for k in range(n + 1)]
    prefix = [0.0]
    for f in c.flops:
        prefix.append(prefix[-1] + f)
    # fronts[k][prev_stored]: list of (m, cost, labels) before deciding block k
    fronts = [[[], []] for _ in range(n + 1)]
    fronts[0][0] = [(c.const, 0.0, ())]
    for k in range(n):
        for prev_stored in (0, 1):
            front = _pareto(fronts[k][prev_stored])
            for m, cost, labels in front:
                m_s = m + _store(c, k, bool(prev_stored))          # store block k
                if m_s + after[k + 1] <= budget:
                    fronts[k + 1][1].append((m_s, cost, labels + ("S",)))
                # checkpoint k..j: _segment(c, k, j), summed incrementally; retained +
                # held without the last boundary only grows with j, so it bounds the loop
                retained, held = c.t[k], c.inner[k]
                for j in range(k, n):
                    if j > k:
                        retained += c.t[j] if c.keep[j] else 0
                        held += c.inner[j] + (c.t[j] if (c.saves_in[j] or c.saves_out[j - 1])
                                              and not c.keep[j] else 0)
                    if m + retained + held + after[n] > budget:
                        break
                    last = c.t[j + 1] if c.saves_out[j] or c.keep[j + 1] else 0
                    if m + retained + held + last + after[j + 1] <= budget:
                        fronts[j + 1][0].append((m + retained, cost + prefix[j + 1] - prefix[k],
                                                 labels + ("C",) + ("c",) * (j - k)))
    best = None
    for prev_stored in (0, 1):
        for m, cost, labels in fronts[n][prev_stored]:
            if m + _finish(c, bool(prev_stored)) + after[n] <= budget and (
                    best is None or cost < best[0]):
                best = (cost, labels)
    return best


def min_peak(c: ChainCosts) -> int:
    """The smallest model peak any placement reaches (binary search on ``solve``)."""
    low, high = 0, model_peak(c, ("S",) * c.n)[0]
    while low < high:
        mid = (low + high) // 2
        if solve(c, mid) is None:
            low = mid + 1
        else:
            high = mid
    return high
