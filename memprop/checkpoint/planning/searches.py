"""The planner's searches beyond one level and beyond the peak: multi-level schedules
below the single-level floor, and plans for the bytes stored for backward.

``memprop.checkpoint.planning.planner.plan`` calls these with its profile
(``ChainCosts``) and its calibrated overhead; each candidate is checked by simulating
the whole step on fake tensors (``memprop.checkpoint.planning.simulate``), and a
candidate that overshoots tightens the model budget by the excess, as the single-level
search does.

NOTE [ The two metrics ]
  ``peak``: the step's tensor peak (``Measurement.peak_bytes``): parameters, gradients,
  optimizer state and every activation alive at the worst moment, recomputes included.
  ``stored``: the bytes autograd holds for backward at the end of the forward
  (``Measurement.saved_bytes``, NOTE [ What counts as a stored intermediate ]): what
  ``torch._functorch.config.activation_memory_budget`` trades against recompute. Only
  the top level of a schedule decides what the forward stores, so single-level
  placements are optimal for ``stored`` (``rotor.stored_fronts``); multi-level
  schedules pay off only for ``peak``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Callable

import torch

from memprop.checkpoint.forms.multilevel import Nested
from memprop.checkpoint.forms.oplevel import Ops
from memprop.checkpoint.forms.remat import Remat
from memprop.checkpoint.forms.strategies import Blocks, NoCheckpoint, Strategy
from memprop.checkpoint.forms.whole import Forward
from memprop.checkpoint.planning import rotor
from memprop.checkpoint.planning.dp import ChainCosts
from memprop.checkpoint.planning.fronts import forward_front, pareto
from memprop.checkpoint.planning.profile import (
    Profile,
    block_options,
    profile,
    rebuild_ratio,
)
from memprop.errors import ConfigError, StrategyError
from memprop.measure import (
    _AMP_DTYPES,  # one table of autocast dtypes, measure's
    AMP_MODES,
    Measurement,
)
from memprop.models import training_loss
from memprop.saved import storage_key

__all__ = ["METRICS", "metric_of", "fit", "nested_solver",
           "segment_stops", "op_options", "child_options",
           "placement_strategy", "lowest_nested", "stored_solver", "stored_model_bytes",
           "strategy_of", "whole_solver", "whole_front", "remat_fit",
           "REMAT_SCAN", "REMAT_MAX_BLOCKS", "rebuilds_within_limit", "remat_front",
           "remat_lowest", "REMAT_LOWEST", "REMAT_PATIENCE", "REMAT_SPREAD", "autocast_loss",
           "REBUILD_LIMIT"]

METRICS = ("peak", "stored")


def metric_of(metric: str) -> Callable[[Measurement], int]:
    return {"peak": lambda m: m.peak_bytes, "stored": lambda m: m.saved_bytes}[metric]


def autocast_loss(loss_fn, amp: str | None):
    """``loss_fn`` run under ``torch.autocast`` in ``amp``'s dtype (``bf16``, ``fp16``;
    None: ``loss_fn`` itself): the forward the planner profiles and traces is the one
    ``measure_step(amp=amp)`` runs, so op outputs have the bytes the step saves. A
    partial of a module-level function: no closure."""
    if amp is None:
        return loss_fn
    if amp not in AMP_MODES:
        raise ConfigError(f"memprop.checkpoint: amp {amp!r} is not allowed; choose one of: "
                          f"{', '.join(AMP_MODES)}, or None for full precision")
    return functools.partial(_autocast_step, loss_fn, amp)


def _autocast_step(loss_fn, amp: str, model, batch):
    device = next((p.device.type for p in model.parameters()), "cpu")
    with torch.autocast(device, dtype=_AMP_DTYPES[amp]):
        return loss_fn(model, batch)


def fit(solve: Callable[[int], Strategy | None], simulate: Callable, value: Callable,
        budget_bytes: int, overhead: int, *, max_rounds: int = 8):
    """(strategy, simulated Measurement) of ``solve``'s choice at the budget less the
    overhead, tightened by the excess until ``value(simulation)`` fits; None if none."""
    target = budget_bytes - overhead
    for _ in range(max_rounds):
        strategy = solve(target) if target >= 0 else None
        if strategy is None:
            return None
        result = simulate(strategy)
        if value(result) <= budget_bytes:
            return strategy, result
        target -= value(result) - budget_bytes
    return None


def strategy_of(schedule) -> Strategy:
    """``Blocks`` for a one-level schedule (what ``plan`` has always returned), else
    ``Nested``."""
    tree = rotor.schedule_segments(schedule)
    if not tree:
        return NoCheckpoint()
    if all(not children for _, _, children in tree):
        return Blocks(tuple((i, j) for i, j, _ in tree))
    return Nested(tuple(tree))


def segment_stops(costs: ChainCosts, early, tail) -> tuple:
    """What a plain segment ending with block j skips in its recompute: early stop, or
    the ops producing its held output when that output is kept anyway (the next block
    saves its input, or it is kept outside the chain: NOTE [ A segment's output needs
    no recompute ], memprop.checkpoint.forms.tail)."""
    n = costs.n
    return tuple(max(early[j], tail[j] if costs.keep[j + 1] or (
        j + 1 < n and costs.saves_in[j + 1]) else 0.0) for j in range(n))


def nested_solver(costs: ChainCosts, *, slots: int = 1500,
                  early=None) -> Callable[[int], Strategy | None]:
    """Model budget -> the cheapest multi-level schedule within it (rotor DP)."""
    def solve(target: int):
        found = rotor.solve_schedule(costs, target, slots=slots, early=early)
        return None if found is None else strategy_of(found[1])
    return solve


def nested_model_need(costs: ChainCosts, strategy: Strategy) -> int:
    tree = getattr(strategy, "tree", None)
    if tree is None:
        tree = [(i, j, []) for i, j in strategy.segments(costs.n)]
    return rotor.run_schedule(costs, rotor.tree_schedule(tree, 0, costs.n))[0]


def lowest_nested(costs: ChainCosts, *, early=None) -> Strategy:
    """The schedule of least modelled need (it recomputes as much as it takes)."""
    return strategy_of(rotor.cost_curve(costs, rotor.covering_budget(costs),
                                        early=early)[0][2])


def stored_model_bytes(costs: ChainCosts, segments) -> int:
    """Bytes the cost model says the forward retains with ``segments`` checkpointed."""
    tree: list[tuple[int, int, list]] = [(i, j, []) for i, j in segments]
    items = rotor.tree_schedule(tree, 0, costs.n)
    t, total, held = costs.t, 0, False
    for item in items:
        if isinstance(item, int):
            total += rotor._store_bytes(costs, item, held)
            held = costs.saves_out[item]
        else:
            i = item[0]
            total += 0 if (held or costs.keep[i]) else t[i]
            held = False
    return total + rotor._kept(costs) + rotor._tail(costs, held)


def placement_strategy(segments) -> Strategy:
    """``Blocks`` for plain segments, ``Ops`` when some block has an op-level policy."""
    if not segments:
        return NoCheckpoint()
    if all(len(seg) == 2 for seg in segments):
        return Blocks(tuple(segments))
    return Ops(tuple(seg if len(seg) == 3 else (*seg, frozenset()) for seg in segments))


def stored_solver(costs: ChainCosts, *, early=None,
                  options=None) -> Callable[[int], Strategy | None]:
    """Model budget on stored bytes -> the placement of least recompute within it
    (with op-level ``options`` per block, NOTE [ Op-level options of a block ])."""
    front = rotor.stored_fronts(costs, early=early, options=options)
    return lambda target: _cheapest_within(front, target, placement_strategy)


def _cheapest_within(front, target: int, strategy: Callable) -> Strategy | None:
    """``strategy(choice)`` of the least-cost entry of a (bytes, cost, choice) front
    within ``target`` bytes (the fewer bytes among equal costs), None if none fits."""
    fits = [entry for entry in front if entry[0] <= target]
    return strategy(min(fits, key=lambda e: (e[1], e[0]))[2]) if fits else None


def whole_front(model=None, batch=None, *, loss_fn=training_loss,
                prof: Profile | None = None) -> list | None:
    """``forward_front`` of the model's whole forward (memprop.checkpoint.forms.whole): the
    cheapest keys per kept bytes; None when the loss calls the model more than once.
    From ``prof`` when given (``plan``'s one trace), else from a trace of the whole
    forward alone."""
    if prof is None:
        prof = profile(model, batch, loss_fn=loss_fn, chain=False, whole=True)
    if prof.forward_calls is None:
        return None
    return forward_front(prof.forward_calls, early=prof.forward_early)


def whole_solver(front: list | None, form=Forward) -> Callable[[int], Strategy | None]:
    """Model budget on kept bytes (beyond what ``form`` stores with no keys) -> the
    keys of least recompute within it, as ``form`` (``Forward``: NOTE [ One checkpoint
    around the forward ], memprop.checkpoint.forms.whole; ``Remat``: NOTE [ Rebuilding each
    saved tensor when backward needs it ], memprop.checkpoint.forms.remat)."""
    return lambda target: None if front is None else _cheapest_within(front, target, form)


def op_options(prof: Profile, *, max_calls: int = 6) -> list:
    """Per block, its op-level options (NOTE [ Op-level options of a block ]), from the
    profile's op calls and early stops."""
    early = prof.early or (0.0,) * len(prof.block_calls)
    return [block_options(calls, early=e, max_calls=max_calls)
            for calls, e in zip(prof.block_calls, early)]


def child_options(prof: Profile, *, max_children: int = 4, per_checkpoint: float = 0.0) -> list:
    """Per block, the options of checkpointing some of its children alone (NOTE
    [ Checkpointing a part of a block ], memprop.checkpoint.forms.oplevel), as the chain's
    DP takes op-level options: (``{"@path", ...}``, bytes the block still stores, the
    children's forward FLOPs and ``per_checkpoint`` for each child past the first: the
    first stands in for the block's own checkpoint, which a segment's cost does not
    count either; the DP adds ``TIE`` per option), the Pareto set. The bytes freed by several
    children are summed; each plan is checked by simulating the step."""
    assert prof.costs is not None                   # a chain was profiled
    out = []
    for inner, children in zip(prof.costs.inner, prof.block_children):
        heavy = sorted(children, key=lambda c: -c.freed)[:max_children]
        options = [(frozenset("@" + c.path for c in subset),
                    max(inner - sum(c.freed for c in subset), 0),
                    float(sum(c.flops for c in subset)) + per_checkpoint * (r - 1))
                   for r in range(1, len(heavy) + 1)
                   for subset in itertools.combinations(heavy, r)]
        out.append(pareto(options, need=lambda o: o[1], cost=lambda o: o[2],
                          tie=lambda o: len(o[0])))
    return out


# remat:KEYS is weighed by plan(metric="peak") only while its rebuilds re-run at most this
# many forwards' worth of op calls (memprop.checkpoint.forms.remat.rebuild_ratio): a deep chain
# rebuilds its residual stream quadratically, in step time and in planning time
REBUILD_LIMIT = 4.0
# ... and, before that is measured, only on chains of at most this many blocks (its
# rebuilds grow with the chain: 1.6x the forward's op calls at 8 zoo blocks, 7.1x at
# 48): measuring the ratio takes two forwards, which a deep chain's plan would not use
REMAT_MAX_BLOCKS = 24


def rebuilds_within_limit(model, batch, calls, *, loss_fn=training_loss) -> bool:
    """Whether ``remat:`` keeping every FLOP-carrying output among ``calls`` (the
    fewest rebuilds) re-runs at most ``REBUILD_LIMIT`` forwards' worth of op calls."""
    every = frozenset(c.key for c in calls if c.flops > 0 and not c.mutated)
    try:
        return rebuild_ratio(model, batch, every, loss_fn=loss_fn) <= REBUILD_LIMIT
    except StrategyError:           # remat cannot replay this model: not weighed
        return False


# simulations remat_fit spends beyond fit()'s rounds when the peak is not monotone in
# the kept bytes (fewer kept outputs can mean more rebuilt ones held at once)
REMAT_SCAN = 24


def remat_front(model, batch, prof: Profile, *, loss_fn=training_loss) -> list | None:
    """The whole forward's front (kept bytes, recompute FLOPs, keys) that ``remat:``'s
    searches draw from; None when ``remat:`` is not weighed: the loss calls the model
    more than once, or its rebuilds exceed ``REBUILD_LIMIT``."""
    calls = prof.forward_calls
    if calls is None or not rebuilds_within_limit(model, batch, calls, loss_fn=loss_fn):
        return None
    return whole_front(prof=prof)


def remat_fit(front: list | None, budget_bytes: int, simulate: Callable, *,
              max_rounds: int = 8):
    """(``Remat`` strategy, simulated Measurement) of least recompute FLOPs whose
    simulated peak fits ``budget_bytes``; None if none does, or ``remat:`` is not
    weighed (``front``: ``remat_front``'s answer, None when not weighed). The keys come
    from the whole forward's front (the cheapest per kept bytes). First ``fit``: the
    model budget is the peak budget less the simulated peak of keeping every kept-able
    output, less those outputs, tightened by each overshoot. The peak is not monotone in
    the kept bytes, so if that finds nothing, the front's entries that could fit (kept
    bytes within the budget less the least overhead simulated) are simulated in order
    of FLOPs, up to ``REMAT_SCAN``. What it finds depends on the budget: the smallest
    feasible budget comes from ``remat_lowest``."""
    if front is None:
        return None
    seen: list = []
    overheads, kept_of = [], {keys: kept for kept, _, keys in front}

    def simulated(strategy):
        result = simulate(strategy)
        seen.append((result.peak_bytes, strategy.spec))
        overheads.append(result.peak_bytes - kept_of.get(strategy.keys, 0))
        return result
    most, _, every = front[-1]
    try:
        found = fit(whole_solver(front, form=Remat), simulated,
                    metric_of("peak"), budget_bytes, simulated(Remat(every)).peak_bytes - most,
                    max_rounds=max_rounds)
        if found is not None:
            return found
        tried = {spec for _, spec in seen}
        least = min(overheads)
        for _, _, keys in sorted((e for e in front if e[0] <= budget_bytes - least),
                                    key=lambda e: (e[1], e[0]))[:REMAT_SCAN]:
            if Remat(keys).spec in tried:
                continue
            result = simulated(Remat(keys))
            if result.peak_bytes <= budget_bytes:
                return Remat(keys), result
        return None
    except StrategyError:           # remat cannot replay this model: not weighed
        return None


# simulations remat_lowest spends at most. In order of kept bytes first, until the bound
# stops it: hf:gpt2 (batch 32) reaches its lowest peak at the 4th of 31 entries, a 4-block
# zoo transformer at the 13th of 45. A sized hf:mixtral's 404 entries peak alike for the
# first 66 (rebuilds held at once in backward) and lowest at the 71st, out of that order's
# reach: after REMAT_PATIENCE simulations in a row that lower nothing, where the cap would
# stop the scan before the bound does, the rest of the front is sampled evenly
# (REMAT_SPREAD) and the best sample refined by halving steps
REMAT_LOWEST = 48
REMAT_PATIENCE = 6
REMAT_SPREAD = 12


def remat_lowest(model, simulate: Callable, front: list | None) -> list:
    """(``Remat``, simulated Measurement) of the candidates that bound ``remat:``'s
    smallest feasible peak, the same whatever the budget (NOTE [ The smallest feasible
    budget ], memprop.checkpoint.planning.planner), at most ``REMAT_LOWEST`` simulations:
    the front's entries in order of kept bytes while their kept bytes plus the parameters
    (both alive at the end of the forward, distinct storages: a lower bound on the peak)
    stay below the least peak simulated. When that bound stops it, the least is the least
    over the whole front, so no budget's search (``remat_fit``) finds a lower peak. When
    ``REMAT_PATIENCE`` entries in a row lower nothing and more entries are left than the
    cap leaves simulations for (the bound could not stop the scan in time), the entries
    left that the bound does not rule out are sampled evenly (``REMAT_SPREAD``) and the
    best (the fewest kept bytes among equals: hf:mixtral's dip lies at its plateau's
    edge) refined: its neighbours at half the sampling stride, then half that, down to
    adjacent entries.
    Last, keeping every kept-able output (the fewest rebuilds). [] when ``remat:`` is not
    weighed (``remat_front``) or cannot replay this model."""
    if not front:
        return []
    params = sum({storage_key(p): p.untyped_storage().nbytes()
                  for p in model.parameters()}.values())
    entries = sorted(front, key=lambda e: (e[0], e[1]))
    found: dict[int, tuple] = {}            # entry index -> (Remat, Measurement)
    _NONE = float("inf")                    # not simulated: the cap was reached

    def peak(i: int) -> float:
        if i not in found and len(found) < REMAT_LOWEST:
            found[i] = (Remat(entries[i][2]), simulate(Remat(entries[i][2])))
        return found[i][1].peak_bytes if i in found else _NONE

    def least() -> float:
        return min((r.peak_bytes for _, r in found.values()), default=_NONE)

    def open_below() -> int:
        """The first entry the bound rules out (it and every later one)."""
        return next((i for i, e in enumerate(entries) if params + e[0] >= least()),
                    len(entries))
    try:
        stale, i = 0, 0
        while i < open_below() and stale < REMAT_PATIENCE and len(found) < REMAT_LOWEST:
            before = least()
            stale = 0 if peak(i) < before else stale + 1
            i += 1
            # patience only where the scan in order could not reach the bound's stop
            if stale >= REMAT_PATIENCE and open_below() - i <= REMAT_LOWEST - len(found):
                stale = 0
        rest = range(i, open_below())
        if stale >= REMAT_PATIENCE and rest:
            stride = max(1, len(rest) / REMAT_SPREAD)
            for k in range(REMAT_SPREAD):
                j = rest[min(len(rest) - 1, round(k * stride))]
                if j < open_below():            # the bound may have moved meanwhile
                    peak(j)
            step = max(1, round(stride / 2))
            while True:     # among equal peaks, the one of fewest kept bytes
                best = min(found, key=lambda j: (found[j][1].peak_bytes, j))
                for j in (best - step, best + step):
                    if 0 <= j < open_below():
                        peak(j)
                if step == 1 or len(found) >= REMAT_LOWEST:
                    break
                step = max(1, step // 2)
        out = [found[i] for i in sorted(found)]
        out.append((Remat(entries[-1][2]), simulate(Remat(entries[-1][2]))))
    except StrategyError:           # remat cannot replay this model: not weighed
        return []
    return out
