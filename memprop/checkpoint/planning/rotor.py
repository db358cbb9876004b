"""Multi-level recompute schedules for a chain: a rotor-style exact DP, a brute force,
and Revolve's closed form.

NOTE [ Multi-level schedules ]
  A single-level plan (memprop.checkpoint.planning.dp) recomputes each checkpointed segment once,
  storing every block of it while its backward runs. A *multi-level* schedule may
  checkpoint again inside a recomputed segment: segment [i..j] stores only t[i] in the
  forward; when backward reaches it, it is recomputed, and that recompute itself stores
  some blocks and checkpoints others (which are recomputed again, later). This is the
  schedule family of Revolve (Griewank & Walther 2000, ACM TOMS Algorithm 799) and rotor
  (Beaumont et al. 2019, "Optimal checkpointing for heterogeneous chains", arXiv:
  1911.13214). torch's nested non-reentrant checkpoints run exactly these schedules
  (NOTE [ Nestable Checkpoint ] in torch/utils/checkpoint.py: inner checkpoints met
  during a recompute are respected), which is how memprop applies them
  (memprop.checkpoint.forms.multilevel).

  A schedule is a sequence of items over blocks s..e-1: ``k`` (block k stored: its saved
  tensors held until its backward) or ``(i, j, inner)`` (blocks i..j checkpointed; inner
  is the schedule of their recompute, over i..j). In the bytes of the chain cost model
  (NOTE [ The chain cost model ] in memprop.checkpoint.planning.dp) with K = Σ kept boundaries
  and G(k) = ``grads_after(k)``:
    storing block k retains inner[k] + t[k]·[saves_in, t[k] not yet held]
                            + t[k+1]·[saves_out]
    checkpointing i..j retains t[i] unless it is held already (then t[i+1] is not)
    need(sequence) = max over the moments of its run of what it holds above its start:
       end of its forward:           all it retains + K + G(e)
       backward reaching block k:    what it retains up to k + K + G(k+1)
       recompute of item (i, j, in): what it retains up to t[i] + need(in)
    cost = every forward the schedule runs (the first sweep included), in FLOPs; the
    recompute of a plan is cost - Σ flops. t[n], kept by the chain's tail (a head
    saving its input), counts at the end of the top-level forward only: it is freed
    before backward reaches the chain.
  The DP (``solve_schedule``) fills, for each sub-problem (s, e, t[s] held or not, top
  level or inside a recompute) and each memory size m, the least cost within m,
  bottom-up: O(n³·slots), as rotor does. ``brute_force`` enumerates every schedule and
  evaluates it by running it event by event (``run_schedule``); tests check the two
  agree and that uniform chains reproduce Revolve's binomial optimum.

NOTE [ Early stop ]
  torch's non-reentrant checkpoint stops a recompute as soon as every tensor its frame
  saved is back (Rule 5 of NOTE [ Nestable Checkpoint ]). So a recompute ending with a
  stored block k skips the ops after block k's last saved tensor (``early[k]`` FLOPs,
  e.g. a transformer block's last matmul, whose output nothing saves), and one ending
  with a checkpointed item never runs that item's advance at all (the frame's last
  saved tensor is the inner checkpoint's input). The cost model counts both, so FLOPs
  predicted for a schedule equal the ones counted in the step.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from memprop.checkpoint.planning.dp import TIE, ChainCosts
from memprop.checkpoint.planning.fronts import pareto

__all__ = ["Schedule", "solve_schedule", "cost_curve", "min_need", "covering_budget",
           "run_schedule", "brute_force", "revolve_forwards",
           "schedule_segments", "tree_schedule", "stored_fronts"]

# An item is an int (block stored) or (i, j, inner_items); a schedule a tuple of items.
Schedule = tuple


# -- evaluating a schedule: the reference semantics, event by event ------------------

def _store_bytes(c: ChainCosts, k: int, held: bool) -> int:
    """Bytes storing block k retains; t[n] (kept by the chain's tail until backward
    reaches the chain) counts with the last block that saves it."""
    h = held or c.keep[k]
    return c.inner[k] + (c.t[k] if c.saves_in[k] and not h else 0) + (
        c.t[k + 1] if c.saves_out[k] and (k + 1 == c.n or not c.keep[k + 1]) else 0)


def _kept(c: ChainCosts) -> int:
    """Boundaries kept outside the chain the whole step (t[n] apart: see _tail)."""
    return sum(c.t[k] for k in range(c.n) if c.keep[k])


def _tail(c: ChainCosts, held: bool) -> int:
    """t[n] at the end of the forward, if the tail keeps it and no block holds it."""
    return c.t[c.n] if c.keep[c.n] and not held else 0


def _early(c: ChainCosts, early) -> tuple:
    return tuple(early) if early else (0,) * c.n


def run_schedule(c: ChainCosts, schedule, *, early=None) -> tuple[int, float]:
    """(need, total forward cost) of a top-level schedule over 0..n-1, by running it:
    forward item by item, then backward in reverse, recomputing checkpointed items.
    ``early[k]``: the FLOPs a recompute ending with block k skips (NOTE [ Early stop ])."""
    early = _early(c, early)
    kept = _kept(c)
    after = [c.grads_after(k) for k in range(c.n + 1)]
    peak = [0]

    def run(items, s, e, base, held_start, top=False) -> float:
        """Forward then backward of ``items`` over s..e-1 above ``base`` bytes."""
        mem, cost, held, marks = base, 0.0, held_start, []
        k = s
        for pos, item in enumerate(items):
            last = pos == len(items) - 1 and not top      # where a recompute stops
            if isinstance(item, int):
                assert item == k
                mem += _store_bytes(c, k, held)
                cost += c.flops[k] - (early[k] if last else 0)
                marks.append(("S", k, mem))
                held, k = c.saves_out[k], k + 1
            else:
                i, j, inner = item
                assert i == k and j >= i
                h = held or c.keep[i]
                mem += 0 if h else c.t[i]
                cost += 0 if last else sum(c.flops[i:j + 1])
                marks.append(("C", item, mem))
                held, k = False, j + 1
        assert k == e
        peak[0] = max(peak[0], mem + kept + after[e] + (_tail(c, held) if top else 0))
        for kind, item, m in reversed(marks):
            if kind == "S":
                peak[0] = max(peak[0], m + kept + after[item + 1])
            else:
                i, j, inner = item
                cost += run(inner, i, j + 1, m, True)
        return cost

    cost = run(tuple(schedule), 0, c.n, 0, False, top=True)
    return peak[0], cost


def _all_schedules(s: int, e: int, held: bool, top: bool):
    """Every schedule over s..e-1 (a checkpoint of the whole range inside its own
    recompute is excluded: it repeats the same problem)."""
    if s == e:
        yield ()
        return
    for rest in _all_schedules(s + 1, e, False, top):
        yield (s,) + rest
    for j in range(s, e):
        if j == e - 1 and held and not top:
            continue
        for inner in _all_schedules(s, j + 1, True, False):
            if len(inner) == 1 and not isinstance(inner[0], int):
                continue
            for rest in _all_schedules(j + 1, e, False, top):
                yield ((s, j, inner),) + rest


def brute_force(c: ChainCosts, budget: int, *, early=None):
    """(cost, schedule) of the cheapest schedule with need <= budget, or None."""
    best = None
    for sched in _all_schedules(0, c.n, False, True):
        need, cost = run_schedule(c, sched, early=early)
        if need <= budget and (best is None or cost < best[0]):
            best = (cost, sched)
    return best


# -- the DP ---------------------------------------------------------------------------

class _Table:
    """The DP's tables in memory slots of ``quantum`` bytes: ``cost[(s, e, held)][m]`` is
    the least total forward cost of blocks s..e-1 within m slots (inf: none fits),
    ``choice[...][m]`` how (0: store block s; 1 + d: checkpoint s..s+d). Every byte term
    is rounded up to whole slots, so a schedule read back fits its slots exactly with
    ``quantum=1`` and conservatively otherwise."""

    top: np.ndarray    # the whole chain's least cost per slot count, set by _solve_table

    def __init__(self, c: ChainCosts, slots: int, quantum: int):
        self.c, self.slots, self.q = c, slots, quantum
        self.cost: dict = {}
        self.choice: dict = {}


def _solve_table(c: ChainCosts, budget: float, quantum: int, early=None) -> _Table:
    """Fill the DP bottom-up over segment length (NOTE [ Multi-level schedules ]): each
    state is one numpy minimum over its n + 1 choices, O(n³·slots) in all."""
    n, t, q = c.n, c.t, quantum
    early = _early(c, early)
    up = lambda b: -(-int(b) // q)  # noqa: E731   bytes -> slots, rounded up
    kept = _kept(c)
    after = [up(c.grads_after(k) + kept) for k in range(n + 1)]
    slots = int(budget // q)
    table = _Table(c, slots, q)
    size = slots + 1
    inf = np.full(size, np.inf)
    base = {}
    for e in range(n + 1):
        for held in (False, True):
            for top in (False, True):
                arr = inf.copy()
                arr[min(up(c.grads_after(e) + kept + (_tail(c, held) if top and e == n
                                                      else 0)), size):] = 0.0
                base[(e, held, top)] = arr
    prefix = list(itertools.accumulate(c.flops, initial=0.0))

    def get(s, e, held, top=False):
        top = top and e == n     # the top level differs only by t[n] at its end
        return base[(e, held, top)] if s == e else table.cost[(s, e, held, top)]

    def shifted(arr, r, add):
        out = inf.copy()
        if r < size:
            out[r:] = arr[:size - r] + add
        return out

    for length in range(1, n + 1):
        for s in range(0, n - length + 1):
            e = s + length
            for held, top in itertools.product((True, False), (False, True) if e == n
                                               else (False,)):
                # (s, e, True, top) is used by (s, e, False, top)
                h = held or c.keep[s]
                if c.keep[s] and not held:
                    table.cost[(s, e, False, top)] = table.cost[(s, e, True, top)]
                    table.choice[(s, e, False, top)] = table.choice[(s, e, True, top)]
                    continue
                rows = np.empty((e - s + 1, size))
                r = up(_store_bytes(c, s, held))
                stops = e == s + 1 and not top      # a recompute stops in block s
                row = shifted(get(s + 1, e, c.saves_out[s], top), r,
                              c.flops[s] - (early[s] if stops else 0))
                row[:min(r + after[s + 1], size)] = np.inf
                rows[0] = row
                r = 0 if h else up(t[s])
                for j in range(s, e):
                    if j == e - 1 and h and not top:   # repeats (s, e): dominated
                        rows[j - s + 1] = np.inf
                        continue
                    both = get(s, j + 1, True) + get(j + 1, e, False, top)
                    # the last item of a recompute: stopped before its advance
                    advance = 0.0 if j == e - 1 and not top else prefix[j + 1] - prefix[s]
                    rows[j - s + 1] = shifted(both, r, advance)
                pick = rows.argmin(axis=0)
                table.cost[(s, e, held, top)] = rows[pick, np.arange(size)]
                table.choice[(s, e, held, top)] = pick.astype(np.int16)
    table.top = get(0, n, False, True)
    return table


def _read(table: _Table, s: int, e: int, held: bool, m: int, top: bool = False) -> tuple:
    """The schedule the table chose for (s, e, held, top) within m slots."""
    c = table.c
    items: list[int | tuple[int, int, tuple]] = []
    top = top and e == c.n
    while s < e:
        pick = int(table.choice[(s, e, held, top)][m])
        h = held or c.keep[s]
        if pick == 0:
            r = -(-_store_bytes(c, s, held) // table.q)
            items.append(s)
            held, s, m = c.saves_out[s], s + 1, m - r
        else:
            j = s + pick - 1
            m -= 0 if h else -(-c.t[s] // table.q)
            items.append((s, j, _read(table, s, j + 1, True, m)))
            held, s = False, j + 1
    return tuple(items)


def _quantum(c: ChainCosts, budget: float, slots: int) -> int:
    return max(1, math.ceil(budget / slots))


def solve_schedule(c: ChainCosts, budget: float, *, quantum: int | None = None,
                   slots: int = 1500, early=None):
    """(total forward cost, schedule) of the cheapest schedule whose need is within
    ``budget`` bytes, or None. Bytes are counted in slots of ``quantum`` bytes (default:
    budget / ``slots``), rounded up: exact with ``quantum=1``, never over the budget
    otherwise. The recompute is cost - Σ flops."""
    if budget < 0:
        return None
    q = quantum or _quantum(c, budget, slots)
    table = _solve_table(c, budget, q, early)
    if not np.isfinite(table.top[-1]):
        return None
    return float(table.top[-1]), _read(table, 0, c.n, False, table.slots, True)


def cost_curve(c: ChainCosts, budget: float, *, quantum: int | None = None,
               slots: int = 1500, early=None) -> list[tuple[int, float, tuple]]:
    """The Pareto curve (need bytes, total forward cost, schedule) of every schedule up
    to ``budget``, the needs exact (each schedule read back and run)."""
    q = quantum or _quantum(c, budget, slots)
    table = _solve_table(c, budget, q, early)
    points, last = [], math.inf
    for m in range(table.slots + 1):
        cost = table.top[m]
        if np.isfinite(cost) and cost < last:
            sched = _read(table, 0, c.n, False, m, True)
            need, exact = run_schedule(c, sched, early=early)
            points.append((need, exact, sched))
            last = cost
    return pareto(points)


def covering_budget(c: ChainCosts, *, slots: int = 1500) -> int:
    """A budget under which the all-stored schedule fits even with every byte term
    rounded up to slots of budget / ``slots`` (at most n + 2 terms per moment)."""
    everything = run_schedule(c, tuple(range(c.n)))[0]
    return math.ceil(everything / max(1 - (c.n + 2) / slots, 0.05)) + 1


def min_need(c: ChainCosts, *, slots: int = 1500, early=None) -> int:
    """The smallest need of any schedule (to a quantum of the budget / slots)."""
    return cost_curve(c, covering_budget(c, slots=slots), slots=slots, early=early)[0][0]


# -- the stored metric: bytes retained at the end of the forward ---------------------

def stored_fronts(c: ChainCosts, *, early=None, options=None):
    """Pareto front of (retained bytes at the end of forward, recompute cost, segments)
    over single-level placements: what a checkpoint's inside does later does not change
    what the forward stores, so one level is optimal for this metric. ``options[k]``:
    op-level alternatives for block k, (keys, kept bytes, recompute cost) each (NOTE
    [ Op-level options of a block ], memprop.checkpoint.planning.profile); a segment chosen with
    one is ``(k, k, keys)``."""
    n, t = c.n, c.t
    early = _early(c, early)
    # state (k, held): front of (retained, cost, segments-cons)
    fronts: dict[tuple[int | str, bool], list[tuple[int, float, tuple]]] = {
        (0, False): [(0, 0.0, ())]}
    for k in range(n + 1):
        for held in (False, True):
            cur = pareto(fronts.pop((k, held), []))
            if k == n:
                fronts[("end", held)] = cur
                continue
            h = held or c.keep[k]
            r_store = _store_bytes(c, k, held)
            for m, cost, segs in cur:
                fronts.setdefault((k + 1, c.saves_out[k]), []).append((m + r_store, cost, segs))
                for keys, kept_bytes, flops in (options[k] if options else ()):
                    fronts.setdefault((k + 1, False), []).append(
                        (m + (0 if h else t[k]) + kept_bytes, cost + flops + TIE,
                         ((k, k, keys), segs)))
                for j in range(k, n):
                    fronts.setdefault((j + 1, False), []).append(
                        (m + (0 if h else t[k]), cost + sum(c.flops[k:j + 1]) - early[j] + TIE,
                         ((k, j), segs)))
    kept = _kept(c)
    out = [(m + kept + _tail(c, held), cost, segs) for held in (False, True) for m, cost, segs in
           fronts[("end", held)]]
    result = []
    for m, cost, segs in pareto(out):
        flat = []
        while segs:
            seg, segs = segs
            flat.append(seg)
        result.append((m, cost, sorted(flat)))
    return result


# -- Revolve (Griewank & Walther 2000, Algorithm 799) ---------------------------------

def revolve_forwards(steps: int, snapshots: int) -> int:
    """The least number of forward steps, beyond the one taped forward of each step, that
    reverses ``steps`` steps with ``snapshots`` snapshot slots: r·l - β(s+1, r-1) with
    β(s, r) = C(s + r, s) and r the integer with β(s, r-1) < l <= β(s, r)."""
    if steps < 1 or snapshots < 1:
        raise ValueError("revolve needs steps >= 1 and snapshots >= 1")
    beta = lambda s, r: math.comb(s + r, s) if r >= 0 else 0  # noqa: E731
    r = 0
    while beta(snapshots, r) < steps:
        r += 1
    return r * steps - beta(snapshots + 1, r - 1)


def schedule_segments(schedule) -> list:
    """A schedule's checkpointed items as the tree ``parse_schedule`` returns."""
    return [(i, j, schedule_segments(inner)) for item in schedule
            if not isinstance(item, int) for i, j, inner in [item]]


def tree_schedule(tree, s: int, e: int) -> tuple:
    """The full schedule (stored blocks explicit) of a segments tree over s..e-1."""
    items: list[int | tuple[int, int, tuple]] = []
    k = s
    for i, j, children in tree:
        items.extend(range(k, i))
        items.append((i, j, tree_schedule(children, i, j + 1)))
        k = j + 1
    items.extend(range(k, e))
    return tuple(items)

