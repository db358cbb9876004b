"""A checkpointing plan whose per-rank peak fits a per-rank budget, predicted.

    p = plan_rank(cfg, 4, FSDPConfig(world_size=64), "80GiB", optimizer="adam")
    p.spec, p.fits, p.predicted_peak_bytes     # the plan; predict(..., strategy=p.spec)'s peak
    print(p.describe())                         # what sets the rank's peak, and the levers

NOTE [ Planning a rank with the single-device planner ]
  memprop's planner (memprop.checkpoint.plan) chooses a strategy on one device. A rank
  under FSDP2 runs the same blocks on its own micro-batch, so the same strategies apply;
  what differs is what else is live: sharded parameters, gradients and optimizer state
  instead of whole ones, FSDP2's all-gathered parameters and reduce-scatter buffers, and
  under tensor parallelism activations split inside attention and the MLP. So the rank
  is planned by the single-device planner on a fake model of the rank's micro-batch
  (``objective="flops"``: the least recompute; ``whole=False``: only checkpoints on
  the block chain, which FSDP2's per-block sharding allows), with the budget shifted by the
  difference between the rank's non-activation bytes at its plain peak and the single
  device's (``shift``); each plan found is then predicted on the fake process group
  (``predict(..., strategy=spec)``), and only that prediction decides whether it fits.
  The shift is first-order (the peak can fall elsewhere under sharding, and TP's
  activations are smaller than the single device's), so the shifted budget is then
  searched: lowered by the excess when the sharded prediction does not fit, raised by
  the slack when it fits with room (TP) so a plan with less recompute is tried, within
  ``rounds`` plans. The plan returned is the fitting one of least recompute found;
  when none fits, the smallest per-rank peak found, and ``fits`` is False. Not proven
  optimal for the rank: the single-device planner's choice at the shifted budget.
"""

from __future__ import annotations

import dataclasses

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.checkpoint import NoCheckpoint, find_blocks, plan
from memprop.checkpoint.forms.cache import cache_off
from memprop.checkpoint.planning.levers import peak_composition
from memprop.checkpoint.planning.planner import short_spec
from memprop.checkpoint.planning.simulate import simulate
from memprop.errors import BudgetError
from memprop.measure import Measurement
from memprop.sharded.config import FSDPConfig
from memprop.sharded.predictions import RankPredictions, RecomputeFlops
from memprop.sharded.result import ShardedMeasurement
from memprop.units import format_bytes, format_flops, parse_size

__all__ = ["plan_rank", "RankPlan", "rank_peak_parts"]

ROUNDS = 4              # single-device plans at most per rank plan
ENOUGH_SLACK = 0.02     # a fitting plan within 2 % of the budget is not loosened further


@dataclasses.dataclass
class RankPlan:
    """A per-rank checkpointing plan (NOTE [ Planning a rank with the single-device
    planner ]). ``predicted``: ``predict(config, batch_size, fsdp=fsdp,
    strategy=spec)``, whose largest rank's peak is ``predicted_peak_bytes``; ``plain``:
    the same without checkpointing. ``recompute_flops``: backward FLOPs beyond the plain
    step's per rank, counted on the unsharded model at the rank's micro-batch and
    divided by the TP degree (TP splits the blocks' matmuls and attention; the norms it
    repeats on every rank are under-counted). ``rounds``: each single-device plan tried
    (shifted budget, spec, the rank's predicted peak)."""

    spec: str
    fits: bool
    budget_bytes: int
    batch_size: int
    fsdp: FSDPConfig
    predicted: ShardedMeasurement
    plain: ShardedMeasurement
    recompute_flops: int
    forward_flops: int
    n_blocks: int
    rounds: list[dict] = dataclasses.field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> int:
        return self.predicted.peak_bytes

    @property
    def peak_parts(self) -> dict[str, int]:
        return rank_peak_parts(self.predicted.rank(self.predicted.largest_rank))

    def describe(self) -> str:
        head = "plan" if self.fits else "NOTHING FITS; the smallest per-rank peak found"
        lines = [f"{head} for a per-rank budget of {format_bytes(self.budget_bytes)} "
                 f"(tensor peak of the largest rank), batch {self.batch_size} per rank, "
                 f"{self.fsdp.describe()}: {short_spec(self.spec)}",
                 f"  predicted peak per rank {format_bytes(self.predicted_peak_bytes)} "
                 f"(plain step {format_bytes(self.plain.peak_bytes)}; largest rank "
                 f"{self.predicted.largest_rank}; predicted on a fake process group)",
                 f"  recompute {format_flops(self.recompute_flops)} per rank = "
                 f"{self.recompute_flops / max(self.forward_flops, 1):.3f} forward passes",
                 f"  {len(self.rounds)} single-device plan(s) tried at shifted budgets "
                 "(NOTE [ Planning a rank with the single-device planner ])"]
        parts = self.peak_parts
        shown = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
        lines.append(f"  what sets the rank's peak: {shown}")
        lines += [f"  {line}" for line in levers(parts, self.fsdp, self.spec)]
        return "\n".join(lines)


def rank_peak_parts(m: Measurement) -> dict[str, int]:
    """A rank's bytes at its peak by what they are (NOTE [ What sets the peak ],
    memprop.checkpoint.planning.levers; NOTE [ Gathered parameters ],
    memprop.sharded.resizes): sharded parameters, all-gathered (unsharded) parameters,
    gradients, optimizer state, activations, other temporaries (reduce-scatter buffers
    and scratch), the batch. The gathered parameters are counted out of the temporaries
    first, then out of the activations (autograd holds them for backward)."""
    parts = peak_composition(m)
    gathered = int(m.meta.get("gathered_bytes_at_peak") or 0)
    from_temp = min(gathered, parts.get("temporary", 0))
    return {"sharded parameters": parts.get("parameter", 0),
            "all-gathered parameters": gathered,
            "gradients": parts.get("gradient", 0),
            "optimizer state": parts.get("optimizer", 0),
            "activations": parts.get("activation", 0) - (gathered - from_temp),
            "other temporaries": parts.get("temporary", 0) - from_temp,
            "batch and buffers": parts.get("input", 0) + parts.get("buffer", 0)}


def levers(parts: dict[str, int], fsdp: FSDPConfig, spec: str) -> list[str]:
    """What would lower the rank's peak, with the bytes each acts on at the peak (by
    arithmetic on ``parts``, not predicted)."""
    state = parts["sharded parameters"] + parts["gradients"] + parts["optimizer state"]
    lines = ["levers (bytes at the peak each acts on; by arithmetic, not predicted):"]
    if not fsdp.fsdp:                 # tensor parallelism alone: nothing FSDP2 does yet
        lines.append(f"  FSDP2 (--fsdp): would shard the parameters, gradients and optimizer "
                     f"state {format_bytes(state)} (tensor-parallel slices now) over its ranks")
    else:
        lines.append(f"  more shards (--fsdp): sharded parameters, gradients and optimizer "
                     f"state {format_bytes(state)} divide by the shard degree "
                     f"({fsdp.shard} now)")
    if fsdp.fsdp and fsdp.reshard_after_forward:
        lines.append(f"  reshard after forward: on already; all-gathered parameters "
                     f"{format_bytes(parts['all-gathered parameters'])} at the peak")
    elif fsdp.fsdp:
        lines.append(f"  reshard after forward (--fsdp-reshard on): frees each block's "
                     f"gathered parameters after its forward "
                     f"({format_bytes(parts['all-gathered parameters'])} at the peak)")
    lines.append(f"  checkpointing: activations {format_bytes(parts['activations'])} at the "
                 f"peak{' with ' + short_spec(spec, 40) if spec != 'none' else ''}")
    lines.append(f"  smaller micro-batch: activations and the batch "
                 f"{format_bytes(parts['activations'] + parts['batch and buffers'])} scale "
                 "with it")
    return lines


def plan_rank(config, batch_size: int, fsdp: FSDPConfig, budget, *, optimizer: str = "sgd",
              dtype: torch.dtype = torch.float32, rounds: int = ROUNDS,
              predictions: RankPredictions | None = None) -> RankPlan:
    """The checkpointing plan of least recompute found whose per-rank predicted peak (the
    largest rank's) fits ``budget`` (bytes or a size string) at ``batch_size`` examples
    per rank under ``fsdp`` (NOTE [ Planning a rank with the single-device planner ]).
    Returns a ``RankPlan``; ``fits`` is False when none fits (the smallest found).
    ``predictions``: a ``RankPredictions`` of the same workload to reuse."""
    budget_bytes = parse_size(budget)
    runs = predictions or RankPredictions(config, fsdp, optimizer=optimizer, dtype=dtype)
    plain = runs.get(batch_size, "none")
    with FakeTensorMode():
        model = config.build(dtype=dtype)
        batch = config.example_batch(batch_size, dtype=dtype)
    n_blocks = len(find_blocks(model))
    restore_cache = cache_off(model, warn=False)      # as plan() runs it
    try:
        single = simulate(model, batch, NoCheckpoint(), optimizer=optimizer,
                          loss_fn=config.loss)
    finally:
        restore_cache()
    unplanned = RankPlan(spec="none", fits=plain.peak_bytes <= budget_bytes,
                         budget_bytes=budget_bytes, batch_size=batch_size, fsdp=fsdp,
                         predicted=plain, plain=plain, recompute_flops=0,
                         forward_flops=single.forward_flops // fsdp.tp, n_blocks=n_blocks)
    if unplanned.fits:
        return unplanned
    shift = _non_activation(plain.rank(plain.largest_rank)) - _non_activation(single)
    tried = _search(model, batch, config, budget_bytes, budget_bytes - shift, runs,
                    batch_size, optimizer=optimizer, rounds=rounds)
    if not any(t["peak_bytes"] <= budget_bytes for t in tried):
        # the shifted searches found nothing that fits the rank (70B over 64 ranks: the
        # single-device step holds 70B parameters' states, the rank a 64th, so the shift
        # is hundreds of GiB): full is weighed as it is, predicted on the rank
        tried.append(dict(target_bytes=None, spec="full",
                          peak_bytes=runs.peak(batch_size, "full"),
                          recompute_flops=RecomputeFlops(config, optimizer=optimizer,
                                                         dtype=dtype).flops(batch_size,
                                                                            "full")))
    fitting = [t for t in tried if t["peak_bytes"] <= budget_bytes]
    if fitting:
        best = min(fitting, key=lambda t: t["recompute_flops"])
    elif tried:
        best = min(tried, key=lambda t: t["peak_bytes"])
    else:                       # the planner found nothing at any budget: say full's peak
        best = dict(spec="full", recompute_flops=RecomputeFlops(
            config, optimizer=optimizer, dtype=dtype).flops(batch_size, "full"))
    predicted = runs.get(batch_size, best["spec"])
    return dataclasses.replace(
        unplanned, spec=best["spec"], fits=predicted.peak_bytes <= budget_bytes,
        predicted=predicted, recompute_flops=best["recompute_flops"] // fsdp.tp,
        rounds=[{k: t[k] for k in ("target_bytes", "spec", "peak_bytes")} for t in tried])


def _non_activation(m: Measurement) -> int:
    """Bytes at the peak that are not activations (held for backward)."""
    return m.peak_bytes - peak_composition(m).get("activation", 0)


def _search(model, batch, config, budget: int, target: int, runs: RankPredictions,
            batch_size: int, *, optimizer: str, rounds: int) -> list[dict]:
    """Single-device plans at shifted budgets, each predicted on the rank (NOTE [
    Planning a rank with the single-device planner ]): ``target`` lowered by the excess
    of a plan that does not fit, raised by the slack of one that fits with room; the
    bracket (highest target that fits, lowest that does not) halves when a step would
    leave it. Stops after ``rounds`` plans, a spec seen before, or a fit within
    ``ENOUGH_SLACK`` of the budget."""
    tried: list[dict] = []
    low, high = None, None            # shifted budgets known to fit / not to fit
    floor = 0                         # below it the single-device planner finds nothing
    for _ in range(rounds):
        target = max(target, floor)
        try:
            # whole=False: forms spanning the whole forward (remat:, forward:) cross
            # FSDP2's blocks, which they refuse (memprop.checkpoint.forms.patch)
            found = plan(model, batch, target, optimizer=optimizer, loss_fn=config.loss,
                         objective="flops", whole=False)
        except BudgetError as exc:
            if exc.smallest_feasible_bytes is None or exc.smallest_feasible_bytes <= floor:
                break
            floor = target = exc.smallest_feasible_bytes
            continue
        if any(t["spec"] == found.spec for t in tried):
            break
        peak = runs.peak(batch_size, found.spec)
        tried.append(dict(target_bytes=target, spec=found.spec, peak_bytes=peak,
                          recompute_flops=found.recompute_flops))
        if peak <= budget:
            low = target
            if budget - peak <= ENOUGH_SLACK * budget:
                break
            target += budget - peak
        else:
            if low is None and target == floor:
                break                 # the planner's smallest does not fit the rank
            high = target
            target -= peak - budget
        if low is not None and high is not None and not low < target < high:
            target = (low + high) // 2
    return tried
