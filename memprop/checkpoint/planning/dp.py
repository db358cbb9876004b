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
    cost       = Σ over checkpointed blocks of their forward FLOPs (each recomputed once),
                 less ``stops[j]`` for a segment ending with block j: what its recompute
                 skips (early stop, a held output:
                 memprop.checkpoint.planning.searches.segment_stops)
  Op-level blocks (``options[k]``: (keys, kept bytes, recompute FLOPs) each, NOTE
  [ Op-level options of a block ] in memprop.checkpoint.planning.profile) are one-block segments
  that also retain the outputs of the kept ops: retained t[k] + kept; their recompute
  brings back the rest of the block's tensors, modelled as inner[k] - kept (the
  simulation checks it); cost: the FLOPs of the ops not kept.
  Every checkpointed segment and op-level block also costs ``TIE`` (one FLOP): among
  placements of equal FLOPs the DP prefers fewer checkpoints (a recompute of pointwise
  ops, or one that skips everything, still costs time and bookkeeping). Real FLOP
  counts differ by whole ops (thousands of FLOPs at least), and one FLOP stays above
  float64's resolution up to 2^53 ≈ 9e15 FLOPs of recompute per step.
  Sharing a boundary tensor between neighbours is what makes per-block checkpointing of
  a ReLU MLP store almost as much as no checkpointing: each block's checkpointed input
  is the tensor the previous block's ReLU already saves.
  The DP (``solve``) is exact for this model: states (block index, previous block stored
  or not) carry the Pareto front of (retained bytes, cost). ``brute_force`` enumerates
  every placement; tests check the two agree. Allocator-level effects (gradients in
  flight, parameter gradients) are not in the model: the planner calibrates them from a
  simulated step and checks each plan by simulation (memprop.checkpoint.planning.planner).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from memprop.checkpoint.planning.fronts import front_arrays

__all__ = ["ChainCosts", "model_peak", "solve", "min_peak", "brute_force", "segments_of",
           "TIE"]

TIE = 1.0      # see NOTE: it only breaks ties between placements of equal FLOPs


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
# "c" (continues the segment of the block before it), ("O", keys) (block checkpointed
# with an op-level policy keeping the outputs of ``keys``).

def segments_of(placement) -> list[tuple]:
    """Checkpointed segments ``(i, j)``, and ``(k, k, keys)`` for op-level blocks."""
    segs = []
    for k, label in enumerate(placement):
        if label == "C":
            segs.append([k, k])
        elif label == "c":
            segs[-1][1] = k
        elif label != "S":
            segs.append([k, k, label[1]])
    return [tuple(s) for s in segs]


def _op_block(c: ChainCosts, k: int, kept: int) -> tuple[int, int]:
    """(retained bytes added, extra bytes held while recomputing) for block k
    checkpointed keeping ``kept`` bytes of op outputs (see NOTE)."""
    last = c.t[k + 1] if c.saves_out[k] or c.keep[k + 1] else 0
    return c.t[k] + kept, max(c.inner[k] - kept, 0) + last


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


def model_peak(c: ChainCosts, placement, options=None, stops=None) -> tuple[int, float]:
    """(peak bytes, recompute cost) of a placement under the cost model; ``stops[j]``:
    the FLOPs a segment ending with block j does not recompute (see NOTE)."""
    m, peak, cost, prev_stored = c.const, 0, 0.0, False
    ends = {seg[0]: seg[1] for seg in segments_of(placement)}
    k = 0
    while k < c.n:
        if placement[k] not in ("S", "C"):
            kept, flops = next((b, f) for keys, b, f in options[k] if keys == placement[k][1])
            retained, held = _op_block(c, k, kept)
            m += retained
            peak = max(peak, m + held + c.grads_after(k + 1))
            cost += flops + TIE
            prev_stored, k = False, k + 1
        elif placement[k] == "S":
            m += _store(c, k, prev_stored)
            peak = max(peak, m + c.grads_after(k + 1))
            prev_stored, k = True, k + 1
        else:
            j = ends[k]
            retained, held = _segment(c, k, j)
            m += retained
            peak = max(peak, m + held + c.grads_after(j + 1))
            cost += sum(c.flops[k:j + 1]) - (stops[j] if stops else 0.0) + TIE
            prev_stored, k = False, j + 1
    return max(peak, m + _finish(c, prev_stored) + c.grads_after(c.n)), cost


def brute_force(c: ChainCosts, budget: int, options=None, stops=None):
    """(cost, placement) of the cheapest placement with peak <= budget, or None."""
    best = None
    choices = [["S", "C", "c", *(("O", keys) for keys, _, _ in (options[k] if options
                                                               else ()))]
               for k in range(c.n)]
    for labels in itertools.product(*choices):
        if any(lab == "c" and (k == 0 or labels[k - 1] not in ("C", "c"))
               for k, lab in enumerate(labels)):
            continue
        peak, cost = model_peak(c, labels, options, stops)
        if peak <= budget and (best is None or cost < best[0]):
            best = (cost, labels)
    return best


def solve(c: ChainCosts, budget: int, options=None, stops=None):
    """(cost, placement) of the cheapest placement with model peak <= budget, or None;
    ``options[k]``: op-level alternatives of block k; ``stops[j]``: FLOPs a segment
    ending with block j does not recompute (see NOTE).

    Exact for the cost model: states (block index, previous block stored or not) carry
    the Pareto front of (retained bytes, cost), as numpy arrays with a back-pointer per
    entry; O(n² · front) vector operations of O(front) each."""
    n = c.n
    after = [c.grads_after(k) for k in range(n + 1)]
    prefix = [0.0]
    for f in c.flops:
        prefix.append(prefix[-1] + f)
    options = options or [()] * n
    # candidates[(k, prev_stored)]: lists of arrays m, cost, source state, source index,
    # decision (0 store, 1 segment from the source block, 2 + o: option o of it)
    candidates: dict = {}
    fronts: dict = {}

    def add(state, m, cost, src, idx, decision):
        if len(m):
            lists = candidates.setdefault(state, ([], [], [], [], []))
            for out, value in zip(lists, (m, cost, np.full(len(m), src), idx,
                                          np.full(len(m), decision))):
                out.append(value)

    add((0, 0), np.array([c.const], dtype=np.int64), np.array([0.0]), -1, np.array([0]), 0)
    for k in range(n + 1):
        for prev_stored in (0, 1):
            lists = candidates.pop((k, prev_stored), None)
            if lists is None:
                continue
            front = front_arrays(*(np.concatenate(col) for col in lists))
            fronts[(k, prev_stored)] = front
            if k == n:
                continue
            m, cost = front[0], front[1]
            idx = np.arange(len(m))
            src = 2 * k + prev_stored
            m_s = m + _store(c, k, bool(prev_stored))                   # store block k
            ok = m_s + after[k + 1] <= budget
            add((k + 1, 1), m_s[ok], cost[ok], src, idx[ok], 0)
            for o, (_, kept, flops) in enumerate(options[k]):        # op-level block k
                retained, held = _op_block(c, k, kept)
                ok = m + retained + held + after[k + 1] <= budget
                add((k + 1, 0), m[ok] + retained, cost[ok] + flops + TIE, src,
                    idx[ok], 2 + o)
            # checkpoint k..j: _segment(c, k, j), summed incrementally; retained + held
            # without the last boundary only grows with j, so it bounds the loop
            retained, held = c.t[k], c.inner[k]
            for j in range(k, n):
                if j > k:
                    retained += c.t[j] if c.keep[j] else 0
                    held += c.inner[j] + (c.t[j] if (c.saves_in[j] or c.saves_out[j - 1])
                                          and not c.keep[j] else 0)
                if m[0] + retained + held + after[n] > budget:    # m[0]: the least m
                    break
                last = c.t[j + 1] if c.saves_out[j] or c.keep[j + 1] else 0
                ok = m + retained + held + last + after[j + 1] <= budget
                add((j + 1, 0), m[ok] + retained,
                    cost[ok] + prefix[j + 1] - prefix[k] - (stops[j] if stops else 0.0) + TIE,
                    src,
                    idx[ok], 1)
    best = None
    for prev_stored in (0, 1):
        if (n, prev_stored) not in fronts:
            continue
        m, cost = fronts[(n, prev_stored)][:2]
        ok = np.nonzero(m + _finish(c, bool(prev_stored)) + after[n] <= budget)[0]
        if len(ok):
            i = ok[np.argmin(cost[ok])]          # the first (least m) of the cheapest
            if best is None or cost[i] < best[0]:
                best = (float(cost[i]), (n, prev_stored), int(i))
    if best is None:
        return None
    labels: list = []
    state, i = best[1], best[2]
    while state[0] > 0:
        _, _, src, idx, decision = fronts[state]
        k0 = int(src[i]) // 2
        if decision[i] == 0:
            labels.append(("S",))
        elif decision[i] == 1:
            labels.append(("C",) + ("c",) * (state[0] - 1 - k0))
        else:
            labels.append((("O", options[k0][int(decision[i]) - 2][0]),))
        state, i = (k0, int(src[i]) % 2), int(idx[i])
    return best[0], tuple(label for part in reversed(labels) for label in part)


def min_peak(c: ChainCosts, options=None, stops=None) -> int:
    """The smallest model peak any placement reaches (binary search on ``solve``)."""
    low, high = 0, model_peak(c, ("S",) * c.n)[0]
    while low < high:
        mid = (low + high) // 2
        if solve(c, mid, options, stops) is None:
            low = mid + 1
        else:
            high = mid
    return high
