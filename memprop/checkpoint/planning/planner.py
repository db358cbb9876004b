"""The checkpointing planner: the fastest step that fits a memory budget.

    p = plan(model, batch, "1.5GiB")     # profile, solve, check by simulation, price
    print(p.describe()); p.apply(model)

1. Profile the model once, on a fake twin (NOTE [ One trace ],
   memprop.checkpoint.planning.profile): per block the bytes of its input and output,
   which of them it saves, the other bytes it saves (parameters apart), its forward
   FLOPs and op calls; the whole forward's op calls. Nothing of the step is allocated.
2. Solve the chain cost model (NOTE [ The chain cost model ] in memprop.checkpoint.planning.dp)
   for the placement of checkpointed segments with the least recompute FLOPs whose
   modelled peak fits the budget, less the step's overhead (parameters, gradients,
   optimizer state, gradients in flight), which is calibrated from a simulated plain step.
3. Check the plan by simulating the whole step on fake tensors with the plan applied (the
   tracker's tensor-level peak: on CPU equal to the measured one to the byte); if it
   does not fit, tighten the model budget by the excess and solve again.

Each segment is recomputed once (optimal segmenting) while that fits. Below the
single-level floor, a multi-level schedule (Revolve; rotor, Beaumont et al. 2019:
checkpoints inside recomputed segments, memprop.checkpoint.planning.rotor) is searched the same
way and applied as nested checkpoints (memprop.checkpoint.forms.multilevel).
``metric="stored"`` plans for the bytes stored for backward instead of the peak
(NOTE [ The two metrics ], memprop.checkpoint.planning.searches). Forms spanning the whole forward
are weighed too (``whole=True``): ``remat:KEYS`` (each saved tensor rebuilt on its own
when backward needs it, memprop.checkpoint.forms.remat) for both metrics, ``forward:KEYS``
(one checkpoint around the forward, memprop.checkpoint.forms.whole) for stored bytes; their
keys come from an exact knapsack over the forward's matmul and attention calls, and
their peaks from simulation.

4. Among the plans that fit (the chain's, with checkpointed children too, ``remat:``'s,
   ``full``), choose the one of least predicted step time (NOTE [ Pricing a plan in
   seconds ], memprop.checkpoint.planning.timing), or of least recompute FLOPs with
   ``objective="flops"``; verify its replay on one real step at two rows (NOTE
   [ Verifying a replay ], memprop.checkpoint.forms.verify).
"""

from __future__ import annotations

import contextlib
import dataclasses

import pandas as pd
import torch
from torch import nn

from memprop.checkpoint.forms.cache import cache_off
from memprop.checkpoint.forms.chain import SegmentRefused, find_blocks
from memprop.checkpoint.forms.multilevel import Nested
from memprop.checkpoint.forms.oplevel import Ops, child_paths
from memprop.checkpoint.forms.patch import APPLIED
from memprop.checkpoint.forms.remat import Remat
from memprop.checkpoint.forms.strategies import (
    Blocks,
    Full,
    NoCheckpoint,
    Offload,
    Selective,
    Strategy,
    refuse_applied,
    remove_strategy,
)
from memprop.checkpoint.forms.verify import verify_replay
from memprop.checkpoint.forms.whole import Forward
from memprop.checkpoint.planning import searches as levels
from memprop.checkpoint.planning.dp import ChainCosts, min_peak, model_peak, segments_of, solve
from memprop.checkpoint.planning.levers import Lever, describe_levers, peak_composition
from memprop.checkpoint.planning.levers import levers as levers_of
from memprop.checkpoint.planning.profile import Profile, profile
from memprop.checkpoint.planning.rotor import stored_fronts
from memprop.checkpoint.planning.simulate import simulate
from memprop.checkpoint.planning.timing import (
    SMALL_ROWS,
    Rates,
    calibrate,
    checkpoint_flops,
    checkpoints_of,
    first_rows,
    predict_ms,
    python_ops_of,
    time_strategies,
)
from memprop.errors import BudgetError, ConfigError, StrategyError
from memprop.fake import fake_mode_of, is_fake
from memprop.measure import Measurement, values_needed
from memprop.models.user import step_loss as one_step_loss
from memprop.routing import Routing, has_experts, planned_under, record_routing, routing_read
from memprop.saved import batch_tensors
from memprop.units import format_bytes, format_flops, format_ms, format_ratio, parse_size

__all__ = ["Plan", "plan", "Budget", "short_spec"]

# a spec longer than this is shortened where people read it (tables, describe, errors);
# --json and the "apply it" line carry it whole
SHORT_SPEC = 64


def short_spec(spec: str, width: int = SHORT_SPEC) -> str:
    """``spec`` as people read it in a table or a sentence: whole when it is at most
    ``width`` characters, else cut at the last ``,`` or ``+`` that fits, with the
    number of characters left out: ``ops:0-22=mm#0-4,...(+41 chars)``."""
    if len(spec) <= width:
        return spec
    cut = max(spec.rfind(",", 0, width), spec.rfind("+", 0, width))
    kept = spec[:cut + 1] if cut > spec.find(":") else spec[:width]
    return f"{kept}...(+{len(spec) - len(kept)} chars)"


@dataclasses.dataclass
class Plan:
    """A checkpoint placement and its predicted cost. Peaks and FLOPs are predictions
    from a fake-tensor simulation of the whole step; step times are predictions of the
    time model (NOTE [ Pricing a plan in seconds ], memprop.checkpoint.planning.timing):
    ``predicted_step_ms`` of one forward and backward with the plan, ``plain_step_ms``
    without, ``recompute_ms`` their difference."""

    segments: list[tuple[int, int]]
    n_blocks: int
    budget_bytes: int
    predicted_peak_bytes: int
    predicted_saved_bytes: int
    none_peak_bytes: int
    none_saved_bytes: int
    recompute_flops: int                 # backward FLOPs beyond the plain step's
    forward_flops: int
    recompute_ms: float | None
    blocks: pd.DataFrame = dataclasses.field(repr=False)
    predicted_step_ms: float | None = None
    plain_step_ms: float | None = None
    # "measured": candidates timed at SMALL_ROWS rows of the real model; "rates": a fake
    # model, priced by the device's rates alone; None: not priced (objective="flops")
    time_basis: str | None = None
    objective: str = "time"              # what chose it among the plans that fit
    # the plans that fit and were priced: (spec, predicted peak bytes, predicted step ms)
    weighed: tuple = ()
    simulation: Measurement | None = dataclasses.field(default=None, repr=False)
    metric: str = "peak"                 # NOTE [ The two metrics ], planning.searches
    tree: tuple = ()                     # a multi-level schedule (segments: its top level)
    chosen: object = None                # a strategy beyond segments (op-level: Ops)
    # NOTE [ What sets the peak ], memprop.checkpoint.planning.levers: bytes by category at the
    # predicted peak, and the levers beyond checkpointing when those are not activations
    peak_parts: dict = dataclasses.field(default_factory=dict)
    levers: tuple[Lever, ...] = ()
    # remat:KEYS: op calls its rebuilds re-run per op call of the forward (time, no FLOPs)
    rebuild_ratio: float | None = None
    # NOTE [ Verifying a replay ]: whether the plan's replay was checked bitwise on one
    # real step of the model (None: nothing replays from recorded calls, or a fake model)
    verified: bool | None = None
    notes: tuple = ()                    # forms left out, and why
    # the other plans that fit, in the objective's order: what plan() falls back to when
    # this one's replay is not exact (NOTE [ Verifying a replay ])
    alternatives: tuple = dataclasses.field(default=(), repr=False)

    @property
    def strategy(self):
        if self.chosen is not None:
            return self.chosen
        if self.tree:
            return Nested(self.tree)
        return Blocks(tuple(self.segments)) if self.segments else NoCheckpoint()

    @property
    def spec(self) -> str:
        return self.strategy.spec

    def apply(self, model: nn.Module, *, blocks_attr=None, blocks=None,
              check_fn=None) -> nn.Module:
        return self.strategy.apply(model, blocks_attr=blocks_attr, blocks=blocks,
                                   check_fn=check_fn)

    def describe(self) -> str:
        # blocks checkpointing a part of themselves (ops:2=@mlp) are not segments
        parts = self.chosen.children(self.n_blocks) if isinstance(self.chosen, Ops) else []
        segments = self.segments
        n_ckpt = sum(b - a + 1 for a, b in segments)
        lines = [
            f"plan for a budget of {format_bytes(self.budget_bytes)} of "
            f"{'tensor peak' if self.metric == 'peak' else 'bytes stored for backward'}: "
            f"{short_spec(self.spec)}",
            "  " + "; ".join(
                ([f"{len(segments)} checkpointed segment(s) covering {n_ckpt} of "
                  f"{self.n_blocks} blocks"] if segments or not parts else [])
                + ([f"{len(parts)} of {self.n_blocks} blocks checkpoint a part of "
                    f"themselves alone ("
                    f"{', '.join(sorted({'+'.join('@' + c for c in cs) for _, cs in parts}))})"]
                   if parts else [])) if not isinstance(self.chosen, (Forward, Remat)) else
            "  one checkpoint around the whole forward, recomputed in one burst as backward "
            "begins (memprop.checkpoint.forms.whole)" if isinstance(self.chosen, Forward) else
            "  each saved tensor rebuilt on its own just before backward needs it "
            "(memprop.checkpoint.forms.remat)",
            f"  predicted peak {format_bytes(self.predicted_peak_bytes)} (plain step "
            f"{format_bytes(self.none_peak_bytes)}); stored for backward "
            f"{format_bytes(self.predicted_saved_bytes)} (plain "
            f"{format_bytes(self.none_saved_bytes)})",
            f"  recompute {format_flops(self.recompute_flops)} = "
            f"{format_ratio(self.recompute_flops / max(self.forward_flops, 1))} forward passes",
        ]
        if self.predicted_step_ms is not None and self.plain_step_ms:
            how = (f"timed at {SMALL_ROWS} rows, the rest of the batch priced at this "
                   "machine's rates" if self.time_basis == "measured" else
                   "a fake model, not timed: FLOPs, bytes and dispatches priced at this "
                   "machine's measured rates")
            lines.append(f"  predicted step {format_ms(self.predicted_step_ms)} = "
                         f"{self.predicted_step_ms / self.plain_step_ms:.2f}x the plain "
                         f"step's {format_ms(self.plain_step_ms)} (forward and backward; "
                         f"{how}; NOTE [ Pricing a plan in seconds ])")
            others = [f"{short_spec(spec, 40)} {format_bytes(peak)}, "
                      f"{ms / self.plain_step_ms:.2f}x" for spec, peak, ms in self.weighed
                      if spec != self.spec]
            if others:
                lines.append(f"  also fits (peak, step time): {'; '.join(others)}")
        if self.rebuild_ratio is not None:
            lines.append(f"  rebuilds re-run {self.rebuild_ratio:.2f}x the forward's op calls "
                         "(pointwise ops: step time, no FLOPs)")
        if self.verified:
            lines.append("  replay verified bitwise on one real step of the model "
                         f"({VERIFY_ROWS} rows; memprop.checkpoint.forms.verify)")
        lines += [f"  {note}" for note in self.notes]
        if self.peak_parts:
            lines += describe_levers(self.predicted_peak_bytes, self.peak_parts,
                                     list(self.levers))
        return "\n".join(lines)


def plan(model: nn.Module, batch, budget, *, blocks_attr=None, blocks=None, check_fn=None,
         optimizer="sgd", loss_fn=None, max_rounds: int = 8,
         metric: str = "peak", whole: bool = True, amp: str | None = None,
         objective: str = "time", routing: str | None = None) -> Plan:
    """The plan of least predicted step time (``objective``) whose simulated peak fits
    ``budget`` (bytes or a size string); with ``metric="stored"``, whose bytes stored
    for backward fit it. Below the single-level floor of the peak, a multi-level schedule. Raises
    ``BudgetError`` stating the smallest feasible budget when none fits.

    ``whole``: also weigh forms that span the whole forward: each saved tensor rebuilt
    on its own when backward needs it (``remat:KEYS``, NOTE [ Rebuilding each saved
    tensor when backward needs it ] in memprop.checkpoint.forms.remat; for ``metric="peak"``
    only when the chain's plan recomputes at all), on chains of at most
    ``levels.REMAT_MAX_BLOCKS`` blocks while its rebuilds re-run at most
    ``levels.REBUILD_LIMIT`` forwards' worth of ops; and for ``metric="stored"`` one
    checkpoint around it (``forward:KEYS``, NOTE [ One checkpoint around the forward ]
    in memprop.checkpoint.forms.whole), which recomputes in one burst as backward begins.
    False keeps to placements on the chain, recomputed a segment at a time.

    ``model`` and ``batch`` are any module and batch ``measure_step`` takes, and
    ``loss_fn`` means what it means there (NOTE [ One step of any module ],
    memprop.models.user): a torch loss ``fn(output, targets)``, any ``loss_fn(model,
    batch)``, or None for the output's ``.loss``, ``model.objective`` or the synthetic
    objective. The model's KV
    cache is off while planning, as under the plan (NOTE [ Checkpointing and KV caches ]).
    ``amp``: plan the step as ``measure_step(amp=amp)`` runs it (``bf16``, ``fp16``:
    forward under ``torch.autocast``, float32 master weights).

    ``objective``: among the plans that fit (the chain's, ``remat:``'s, ``full``), the
    one of least predicted step time (``"time"``: NOTE [ Pricing a plan in seconds ],
    memprop.checkpoint.planning.timing), or of least recompute FLOPs (``"flops"``).

    ``routing``: for experts run one by one, the routing planned for (NOTE [ Predicting
    experts that run one by one ], memprop.routing): "batch" (the default for a real
    model and batch), "uniform" (the default for a fake one) or "capacity"."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"memprop.checkpoint: unknown plan objective {objective!r}; "
                          f"choose one of: {', '.join(OBJECTIVES)} (time: least predicted "
                          "step time; flops: least recompute FLOPs)")
    if metric not in levels.METRICS:
        raise ConfigError(f"memprop.checkpoint: unknown plan metric {metric!r}; choose one "
                          f"of: {', '.join(levels.METRICS)} (peak: the step's tensor peak; "
                          "stored: bytes saved for backward at the end of forward)")
    loss_fn = one_step_loss(loss_fn)                   # (model, batch) -> scalar
    step_loss = levels.autocast_loss(loss_fn, amp)     # refuses an unknown amp
    restore_cache = cache_off(model, warn=False)
    options = dict(blocks_attr=blocks_attr, select=dict(blocks=blocks, check_fn=check_fn),
                   optimizer=optimizer, loss_fn=loss_fn, max_rounds=max_rounds,
                   metric=metric, amp=amp, objective=objective)
    refused: list[str] = []           # why segments of several blocks were left out
    # planning runs the model (candidates timed at a few rows, a verified replay): its buffers
    # (BatchNorm statistics) and the RNG are put back, so planning changes nothing
    buffers = [(b, b.detach().clone()) for b in model.buffers() if not is_fake(b)]
    devices = sorted({p.device.index for p in model.parameters()
                      if p.device.type == "cuda"} - {None})
    rng = contextlib.ExitStack()
    rng.enter_context(torch.random.fork_rng(devices=devices))
    # the profile and simulations run a fake twin: a forward that reads tensor values
    # (ibert's quantisation: .item()) cannot be planned; said in one line, not fake
    # tensors' own exception
    cannot = ("plan() profiles the model on fake tensors; choose a strategy by hand "
              "(full, sqrt, blocks:...) and check it with verify_replay")
    try:
        # experts run one by one: the fake steps are routed as the batch is (NOTE
        # [ Predicting experts that run one by one ], memprop.routing), a fake one evenly
        use = rng.enter_context(planned_under(_routing_of(model, batch, step_loss, routing)))
        with values_needed(model, cannot):
            found = _plan(model, batch, parse_size(budget), whole=whole, refused=refused,
                          **options)
        refusal = _replay_refusal(model, batch, found, blocks_attr, step_loss,
                                  **options["select"])
        if refusal is not None and whole and isinstance(found.chosen, (Forward, Remat)):
            left_out = found.chosen.form
            with values_needed(model, cannot):
                found = _plan(model, batch, parse_size(budget), whole=False,
                              refused=refused, **options)
            found.notes += (f"{left_out}: left out, its replay is not exact on this model "
                            f"({refusal})",)
            refusal = _replay_refusal(model, batch, found, blocks_attr, step_loss,
                                      **options["select"])
        while refusal is not None and found.alternatives:
            # the next plan that fits, in the objective's order (a selective plan whose
            # kept output the model changes in place: convbert; full replays it exactly)
            refused_plan, found = found, found.alternatives[0]
            found.alternatives = refused_plan.alternatives[1:]
            found.notes += refused_plan.notes + (
                f"{short_spec(refused_plan.spec)}: left out, its replay is not exact on this "
                f"model ({refusal})",)
            refusal = _replay_refusal(model, batch, found, blocks_attr, step_loss,
                                      **options["select"])
        if refusal is not None:
            raise StrategyError(f"memprop.checkpoint: the plan {short_spec(found.spec)} cannot "
                                f"replay this model exactly: {refusal}")
        if refused:
            found.notes += (f"segments of several blocks: left out ({refused[0]})",)
        if use is not None and use.read:
            found.notes += (f"experts run one by one: planned under {use.routing.describe()}; "
                            "op-level forms (ops:, forward:, remat:) left out, as the op "
                            "calls of a block depend on its routing",)
        return found
    except BudgetError as exc:
        # the plan the error carries is checked as a returned one is: a replay that is
        # not exact leaves the error without one (planning at the figure falls back)
        if exc.plan is not None and _replay_refusal(model, batch, exc.plan, blocks_attr,
                                                    step_loss, **options["select"]):
            exc.plan = None
        raise
    finally:
        rng.close()
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
        restore_cache()


def _routing_of(model: nn.Module, batch, step_loss, kind: str | None) -> Routing | None:
    """The routing the planner's fake steps run under (``plan``'s ``routing``): None
    without experts; by default the batch's own for a real model and batch (two
    forwards without gradients, memprop.routing), a uniform split for a fake one."""
    fake = is_fake(model) or any(is_fake(t) for t in batch_tensors(batch))
    if kind == "batch" and fake:
        raise ConfigError("memprop.checkpoint: routing='batch' reads the routing from one "
                          "real forward of a real batch, and this model or batch is fake; "
                          "choose routing='uniform' or 'capacity'")
    chosen = Routing(kind or ("uniform" if fake else "batch"))     # refuses an unknown one
    if not has_experts(model):
        return None
    return record_routing(model, batch, step_loss) if chosen.kind == "batch" else chosen


# what plan() minimises among the plans that fit (NOTE [ Pricing a plan in seconds ])
OBJECTIVES = ("time", "flops")


def _price(model, batch, plans: list[Plan], plain: Measurement, *, blocks_attr, select,
           optimizer, loss_fn, amp, block_ops: tuple[int, ...] = ()) -> None:
    """Set each plan's predicted step time and the plain step's (NOTE [ Pricing a plan
    in seconds ], memprop.checkpoint.planning.timing): on a real model each candidate
    and the plain step timed at ``SMALL_ROWS`` rows (interleaved, medians), the rest of
    the batch priced at the device's rates; a fake model priced by the rates alone
    (``block_ops``: each block's aten calls, which a selective policy sees twice)."""
    rates = _rates_of(model)
    strategies = {NoCheckpoint().spec: NoCheckpoint(), **{p.spec: p.strategy for p in plans}}
    full: dict[str, Measurement] = {NoCheckpoint().spec: plain}
    for p in plans:
        assert p.simulation is not None          # make_plan keeps its simulation
        full[p.spec] = p.simulation
    if fake_mode_of(model) is not None:
        ratios = {p.spec: p.rebuild_ratio for p in plans}
        ms = {spec: predict_ms(rates, m, python_ops=python_ops_of(
            strategies[spec], m, plain, ratios.get(spec), block_ops),
            checkpoints=checkpoints_of(strategies[spec], len(block_ops)))
            for spec, m in full.items()}
        basis = "rates"
    else:
        small = first_rows(batch)
        sims = {spec: simulate(model, small, strategy, blocks_attr=blocks_attr, **select,
                               optimizer=optimizer, loss_fn=loss_fn, amp=amp)
                for spec, strategy in strategies.items()}
        timed = time_strategies(model, small, levels.autocast_loss(loss_fn, amp), strategies,
                                rounds=TIME_ROUNDS, seconds=TIME_SECONDS,
                                max_rounds=TIME_MAX_ROUNDS,
                                apply_kwargs=dict(blocks_attr=blocks_attr, **select))
        ms = {spec: predict_ms(rates, full[spec], sims[spec], timed[spec]) for spec in full}
        basis = "measured"
    for p in plans:
        p.predicted_step_ms, p.plain_step_ms = ms[p.spec], ms[NoCheckpoint().spec]
        p.recompute_ms = p.predicted_step_ms - p.plain_step_ms
        p.time_basis = basis
    weighed = tuple((p.spec, p.predicted_peak_bytes, p.predicted_step_ms) for p in plans)
    for p in plans:
        p.weighed = weighed


def _rates_of(model: nn.Module) -> Rates:
    """The time model's rates for the device and dtype of the model's parameters."""
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    return calibrate(device, first.dtype if first is not None else torch.float32)


# rounds each candidate is timed at SMALL_ROWS rows, after one warm-up round; then more
# rounds while the timed steps add up to less than TIME_SECONDS, up to TIME_MAX_ROUNDS:
# at two rows a tiny decoder's step takes 15-40 ms, and on a shared 2-core machine the
# median of 5 rounds ordered two candidates 0.01-0.09x of the step apart (Mistral-class,
# blocks:0,1,2 and its child plan) wrongly in 5 of 16 tries, the median of 15 in none
# of 5 (session 17)
TIME_ROUNDS = 5
TIME_SECONDS = 3.0
TIME_MAX_ROUNDS = 30


# the peak, bytes and FLOPs of a candidate that cannot run (never within a budget)
_NEVER = 1 << 62

# the forms that run nothing again: every other plan recomputes, and its replay is
# verified before it is returned (a plain checkpoint replays too: a model drawing from
# its own generator recomputes other numbers under full as under remat:, measured)
_NOT_REPLAYING = (NoCheckpoint, Offload)

# rows of the batch a plan's replay is verified on (NOTE [ Verifying a replay ]): the
# rules it checks do not depend on the batch size, and the real batch may not fit
VERIFY_ROWS = 2


def _replay_refusal(model, batch, found: Plan, blocks_attr, loss_fn, **select) -> str | None:
    """None if ``found`` replays exactly on one real step of ``model`` at ``VERIFY_ROWS``
    rows (sets ``found.verified``), else what ``verify_replay`` said. Plans that
    recompute nothing, and fake models, are not run."""
    strategy = found.strategy
    if fake_mode_of(model) is not None or isinstance(strategy, _NOT_REPLAYING):
        return None
    small = first_rows(batch, VERIFY_ROWS)
    try:
        strategy.apply(model, blocks_attr=blocks_attr, **select)
        verify_replay(model, small, loss_fn=loss_fn)
    except StrategyError as exc:
        return str(exc).removeprefix("memprop.checkpoint: ")
    finally:
        remove_strategy(model)
    found.verified = True
    return None


def _plan(model, batch, budget_bytes, *, optimizer, loss_fn, amp, **options) -> Plan:
    """``_search``'s plan, with the levers beyond checkpointing when what sets its peak
    is not activations (NOTE [ What sets the peak ], memprop.checkpoint.planning.levers):
    weighed for the plan returned only, not for every candidate."""
    found = _search(model, batch, budget_bytes, optimizer=optimizer, loss_fn=loss_fn,
                    amp=amp, **options)
    static = sum(found.peak_parts.get(c, 0) for c in ("parameter", "gradient", "optimizer"))
    if found.peak_parts and static * 2 >= found.predicted_peak_bytes:
        found.levers = tuple(levers_of(model, batch, found.strategy, optimizer=optimizer,
                                       loss_fn=loss_fn, amp=amp)[1])
    return found


@dataclasses.dataclass
class _Search:
    """One planning run: what every search reads (the model's ``Profile``, the plain
    step, the budget) and the simulations they share, one per strategy. The searches
    (``_plan_peak``, ``_plan_stored``, ``levels.*``) take it and return candidates;
    ``choose`` picks among the ones that fit by the objective."""

    model: nn.Module
    batch: object
    budget_bytes: int
    prof: Profile
    metric: str
    objective: str
    max_rounds: int
    blocks_attr: str | None
    select: dict
    optimizer: str
    step_loss: object           # the plain loss, as measure_step runs it under amp
    loss_fn: object             # the forward profiles and traces run (autocast under amp)
    amp: str | None
    warm: bool                  # a fake model just profiled: no first step (measure_step)
    refused: list[str]          # why segments of several blocks were left out
    simulations: dict = dataclasses.field(default_factory=dict)
    plain: Measurement = dataclasses.field(init=False)

    def __post_init__(self):
        self.plain = self.simulated(NoCheckpoint())

    @property
    def costs(self) -> ChainCosts | None:
        return self.prof.costs

    @property
    def n(self) -> int:
        return self.prof.costs.n if self.prof.costs is not None else 0

    def simulated(self, strategy: Strategy) -> Measurement:
        """The simulated step with ``strategy``, once per strategy; a strategy that
        refuses this model (a segment its loop cannot replay: ``SegmentRefused``; any
        other ``StrategyError``) never fits (``_NEVER``)."""
        if strategy.spec not in self.simulations:
            try:
                self.simulations[strategy.spec] = simulate(
                    self.model, self.batch, strategy, blocks_attr=self.blocks_attr,
                    **self.select, optimizer=self.optimizer, loss_fn=self.step_loss,
                    amp=self.amp, warm=self.warm)
            except StrategyError as exc:
                # a segment of several blocks this model's loop cannot replay (gemma4:
                # each layer gets its own per_layer_input): never chosen, and said why;
                # any other candidate that refuses to run (selective keeping an op output
                # the model changes in place) is never chosen either
                if isinstance(exc, SegmentRefused) and not self.refused:
                    self.refused.append(str(exc).removeprefix("memprop.checkpoint: "))
                self.simulations[strategy.spec] = dataclasses.replace(
                    self.plain, peak_bytes=_NEVER, saved_bytes=_NEVER,
                    budget_peak_bytes=_NEVER, forward_flops=_NEVER, backward_flops=_NEVER)
        return self.simulations[strategy.spec]

    def make_plan(self, segments, result: Measurement, tree=(), chosen=None) -> Plan:
        n, plain = self.n, self.plain
        # NOTE [ Checkpointing a part of a block ]: such a block is not a segment
        segments = [tuple(seg[:2]) for seg in segments
                    if len(seg) < 3 or not child_paths(seg[2])]
        parts = dict(chosen.children(n)) if isinstance(chosen, Ops) else {}
        blocks_table = self.prof.table.assign(
            checkpointed=[any(a <= k <= b for a, b in segments) for k in range(n)],
            checkpointed_part=["+".join("@" + c for c in parts.get(k, ())) for k in range(n)])
        found = Plan(segments=segments, n_blocks=n, budget_bytes=self.budget_bytes,
                     metric=self.metric, tree=tree, chosen=chosen,
                     predicted_peak_bytes=result.peak_bytes,
                     predicted_saved_bytes=result.saved_bytes,
                     none_peak_bytes=plain.peak_bytes, none_saved_bytes=plain.saved_bytes,
                     recompute_flops=result.backward_flops - plain.backward_flops,
                     forward_flops=plain.forward_flops,
                     recompute_ms=None, blocks=blocks_table,
                     peak_parts=peak_composition(result), simulation=result,
                     objective=self.objective)
        if isinstance(chosen, Remat):
            found.rebuild_ratio = levels.rebuild_ratio(self.model, self.batch, chosen.keys,
                                                       loss_fn=self.loss_fn)
        return found

    def plan_of(self, strategy: Strategy, result: Measurement) -> Plan:
        """make_plan for any strategy a search or the smallest's candidates chose."""
        return self.make_plan(strategy.segments(self.n), result, getattr(strategy, "tree", ()),
                              chosen=None if isinstance(strategy, (Blocks, Nested, NoCheckpoint))
                              else strategy)

    def reaching(self, strategy: Strategy, result: Measurement) -> Plan:
        """``plan_of`` for the candidate that reaches the smallest feasible budget,
        planned for that budget (its peak, or its stored bytes under ``metric="stored"``):
        the plan a ``BudgetError`` carries."""
        figure = result.peak_bytes if self.metric == "peak" else result.saved_bytes
        return dataclasses.replace(self.plan_of(strategy, result), budget_bytes=figure)

    def choose(self, fits: list[Plan], *, full: bool = False) -> Plan:
        """The plan the objective prefers among plans that fit (first among equals);
        ``full``: weigh ``full`` too when it fits, under the time objective (a plan is
        never slower than full unless it peaks lower)."""
        if full and self.objective == "time" and self.costs is not None:
            result = self.simulated(Full())
            value = result.peak_bytes if self.metric == "peak" else result.saved_bytes
            fits = fits + ([self.plan_of(Full(), result)] if value <= self.budget_bytes else [])
        fits = [p for i, p in enumerate(fits) if p.spec not in {q.spec for q in fits[:i]}]
        if self.objective == "flops" or len(fits) == 1 and fits[0].spec == "none":
            ranked = sorted(fits, key=lambda p: p.recompute_flops)
        else:
            _price(self.model, self.batch, fits, self.plain, blocks_attr=self.blocks_attr,
                   select=self.select, optimizer=self.optimizer, loss_fn=self.step_loss,
                   amp=self.amp, block_ops=tuple(map(len, self.prof.block_calls)))
            ranked = sorted(fits, key=lambda p: (p.predicted_step_ms, p.recompute_flops))
        ranked[0].alternatives = tuple(ranked[1:])
        return ranked[0]


def _search(model, batch, budget_bytes, *, blocks_attr, select, optimizer, loss_fn,
            max_rounds, metric, whole, amp, objective: str = "time",
            refused: list[str] | None = None) -> Plan:
    """The plan (see ``plan``); ``refused`` gets why segments of several blocks were left
    out, if they were (``SegmentRefused``)."""
    # the step's forward as the simulations run it (autocast under amp): what profiles
    # and traces run; the simulations take the plain loss and measure_step's amp
    step_loss, loss_fn = loss_fn, levels.autocast_loss(loss_fn, amp)
    # no chain of blocks to find: forms spanning the whole forward need none
    chainless = (whole and blocks_attr is None and all(v is None for v in select.values())
                 and not _finds_chain(model))
    # NOTE [ One trace ]: everything the searches read, from one forward on a fake twin
    prof = profile(model, batch, blocks_attr=blocks_attr, **select, loss_fn=loss_fn,
                   chain=not chainless, whole=whole)
    # experts run one by one (memprop.routing): which op calls a block makes depends on
    # its routing (an expert with no token is skipped), so op keys (ops:, forward:,
    # remat:), which count calls, would name other calls in another step: blocks only
    by_op = not routing_read()
    whole = whole and by_op
    # a fake model just profiled (its forward has run): its simulations need no first
    # step when the optimizer keeps no state (measure_step's warm)
    s = _Search(model, batch, budget_bytes, prof, metric, objective, max_rounds, blocks_attr,
                select, optimizer, step_loss, loss_fn, amp,
                warm=fake_mode_of(model) is not None and not chainless,
                refused=refused if refused is not None else [])
    costs, plain, n = s.costs, s.plain, s.n
    if chainless and metric == "stored":
        return _plan_stored(s, None, None, _whole_forms(model, batch, loss_fn, prof))
    chain_plans: list[Plan]                         # least FLOPs first
    error: StrategyError | None                     # why no plan, without a chain
    lowest: list[tuple[Strategy, Measurement]]      # candidates of the smallest budget
    if chainless or costs is None:                  # costs: profiled when not chainless
        if plain.peak_bytes <= budget_bytes:        # fits as it is
            return s.make_plan([], plain)
        chain_plans, error, lowest = [], _chainless_error(model), []
    else:
        early = prof.early
        stops = levels.segment_stops(costs, early, prof.tail)   # plain segments' discount
        options = levels.op_options(prof) if by_op else None
        if metric == "stored":
            return _plan_stored(s, stops, options, _whole_forms(model, batch, loss_fn, prof, n)
                                if whole else [], full=True)
        chain_plans, lowest = _plan_peak(s, options, stops, early)
        error = None
    chained = chain_plans[0] if chain_plans else None
    # each saved tensor rebuilt on its own when backward needs it (remat:KEYS): weighed
    # when the chain's plan recomputes at all; equal FLOPs: the chain's plan, whose
    # rebuilds re-run fewer ops
    remat = whole and n <= levels.REMAT_MAX_BLOCKS
    front = levels.remat_front(model, batch, prof, loss_fn=loss_fn) if remat and (
        chained is None or chained.recompute_flops > 0) else None
    fits = list(chain_plans)
    if front is not None:
        found = levels.remat_fit(front, budget_bytes, s.simulated, max_rounds=max_rounds)
        if found is not None and (objective == "time" or chained is None or found[1].backward_flops
                                  - plain.backward_flops < chained.recompute_flops):
            fits.insert(0, s.make_plan([], found[1], chosen=found[0]))
    if fits:
        # full is weighed against any plan that checkpoints: one that recomputes no
        # FLOPs still re-runs pointwise ops, through a Python policy for ops: keys
        # (hf:gpt2, ops:... keeping every matmul: 2.09x the plain step, full 1.33x)
        return s.choose(fits, full=chained is None or chained.spec != "none")
    # NOTE [ The smallest feasible budget ]
    if front is not None:
        lowest += levels.remat_lowest(model, s.simulated, front)
    if not lowest:
        if error is None:       # a chain always leaves candidates (_plan_peak)
            raise RuntimeError("memprop.checkpoint: no plan fits and no candidate bounds "
                               "the smallest feasible budget, though the chain was searched")
        raise error
    lowest.append((NoCheckpoint(), plain))
    fitting = [(st, r) for st, r in lowest if r.peak_bytes <= budget_bytes]
    if fitting:
        return s.choose([s.plan_of(*sr) for sr in sorted(
            fitting, key=lambda sr: (sr[1].backward_flops, sr[1].peak_bytes))])
    strategy, result = min(lowest, key=lambda sr: (sr[1].peak_bytes, sr[1].backward_flops))
    raise _peak_budget_error(budget_bytes, plain, s.reaching(strategy, result))


# NOTE [ The smallest feasible budget ]
#   A peak budget no search meets raises BudgetError with the smallest feasible budget
#   (``smallest_feasible_bytes``). It must not depend on the budget asked, planning at
#   it must return a plan whose simulated peak is at most it, and no budget's search
#   should find a lower one. The searches (the chain's tightening solves, remat's fit
#   and scan) simulate different candidates at different budgets, so their least peak
#   is not that figure (hf:gpt2 said 27.1 MiB at 3 MiB and 21.5 MiB at 20 MiB, and found
#   25.8 MiB at 26 MiB). The figure is the least simulated peak of a fixed set of
#   candidates, each at its family's lowest: the chain placement of least modelled
#   peak, full, selective, the deepest multi-level schedule, the plain step, and
#   remat's ``levels.remat_lowest``: its front in order of kept bytes until the kept
#   bytes plus the parameters (a lower bound on a peak) reach the least peak found, so
#   that no remat plan peaks lower, or, where a plateau of equal peaks keeps that bound
#   from stopping it (a sized hf:mixtral: 48 simulations, all at one peak, 234 s), an
#   even sample of the rest of the front refined around its best (up to
#   ``levels.REMAT_LOWEST`` simulations; the mixtral's figure 3,766,472 -> 3,651,784 B,
#   the least any budget's search had simulated, in 30 simulations). When the
#   searches find nothing, the cheapest of those that fits is the plan; at the figure,
#   its candidate fits. The chain's searches could in principle simulate a placement
#   below its family's lowest modelled one, so the figure is the smallest found, not
#   proven (tests/test_plan_smallest.py checks budgets just below it on two models).


def _peak_budget_error(budget_bytes: int, plain, reaching: Plan):
    """No plan fits a peak budget: the smallest feasible one found (NOTE [ The smallest
    feasible budget ]), reached by the plan ``reaching``, which the error carries."""
    smallest, reached_by = reaching.predicted_peak_bytes, reaching.spec
    return BudgetError(
        f"memprop.checkpoint: no checkpointing plan fits a budget of "
        f"{format_bytes(budget_bytes)} ({budget_bytes} bytes); the smallest feasible "
        f"budget found is about {format_bytes(smallest)} ({smallest} bytes, with "
        f"{short_spec(reached_by)}; planning at it finds a plan) - the plain step "
        f"needs {format_bytes(plain.peak_bytes)}. Raise the budget or shrink the batch",
        smallest_feasible_bytes=smallest, plan=reaching)


def _chainless_error(model) -> StrategyError:
    """The chain search's own error, for a model without a chain whose whole-forward
    forms (remat) found nothing either."""
    try:
        find_blocks(model)
    except StrategyError as exc:
        return exc
    return StrategyError(f"memprop.checkpoint: no chain of blocks in {type(model).__name__}")


def _placement(s: _Search, options, stops, excess: int = 0) -> tuple[Plan | None, int]:
    """The single-level placement of least recompute (segments, and op-level blocks when
    ``options``) whose simulated peak fits, and the bytes its model budget was tightened
    by: the DP solved at the budget less the calibrated overhead (less ``excess``, a
    tightening another placement needed: each round simulates a whole step); a plan
    whose simulated peak overshoots tightens the model budget by the excess (``max_rounds``
    solves, then up to as many more that at least double the tightening)."""
    costs, plain, budget_bytes = s.costs, s.plain, s.budget_bytes
    assert costs is not None                        # a chain was profiled
    overhead = plain.peak_bytes - model_peak(costs, ("S",) * costs.n)[0]
    target = budget_bytes - overhead - excess
    start = excess
    for round_ in range(2 * s.max_rounds):
        solution = solve(costs, target, options, stops) if target > 0 else None
        if solution is None:
            return None, excess
        segments = segments_of(solution[1])
        strategy = levels.placement_strategy(segments)
        result = s.simulated(strategy) if segments else plain
        if result.peak_bytes <= budget_bytes:
            return s.make_plan(segments, result,
                               chosen=strategy if isinstance(strategy, Ops) else None), excess
        # after max_rounds tightenings by the overshoot, at least double the tightening
        # each round: small overshoots round after round had used up the rounds, so a
        # budget found no placement where a smaller one did (tiny Mistral, 24 MiB:
        # 78,912 B tightened in 8 rounds; at 23.8 MiB an ops: placement, measured)
        over = result.peak_bytes - budget_bytes
        step = over if round_ < s.max_rounds else max(over, excess - start)
        excess += step
        target -= step
    return None, excess


def _plan_peak(s: _Search, options, stops, early) -> tuple[list[Plan], list]:
    """``plan(metric="peak")`` on the chain: (single-level placements (segments and
    op-level blocks), else multi-level schedules, else the fallbacks; []), or, when
    none fits, ([], the chain's candidates for the smallest feasible budget: NOTE
    [ The smallest feasible budget ]). The first plan is the one of least recompute
    FLOPs; under the time objective the plan of plain segments only follows when the
    first keeps op outputs (NOTE [ Pricing a plan in seconds ]: an ``ops:`` block
    re-runs its pointwise ops, and runs its forward, through a Python policy)."""
    costs, plain, budget_bytes, max_rounds = s.costs, s.plain, s.budget_bytes, s.max_rounds
    assert costs is not None                        # a chain was profiled
    simulated, make_plan, plan_of = s.simulated, s.make_plan, s.plan_of
    found, excess = _placement(s, options, stops)
    if found is not None:
        if s.objective != "time" or not found.recompute_flops and not isinstance(
                found.chosen, Ops):
            return [found], []
        # priced too: plain segments only, and plain segments with blocks that
        # checkpoint a part of themselves (NOTE [ Checkpointing a part of a block ],
        # forms.oplevel): neither runs a selective policy. The latter starts from the
        # tightening the former needed (their peaks fall at the same moments: a 48-block
        # chain re-simulated the same three rounds)
        others = []
        if isinstance(found.chosen, Ops):
            segments_only, tightened = _placement(s, None, stops)
            others.append(segments_only)
            excess = tightened if segments_only is not None else 0
        if any(s.prof.block_children):
            # a block's second and later children priced at a checkpoint's own cost
            # too: a norm's recomputes no FLOPs, yet costs what a checkpoint costs
            per = checkpoint_flops(_rates_of(s.model))
            others.append(_placement(s, levels.child_options(s.prof, per_checkpoint=per),
                                     stops, excess)[0])
        return [found] + [p for p in others if p is not None], []
    # below the single-level floor: checkpoints inside recomputed segments (blocks
    # called with one tensor only: multilevel.NestedChain refuses others)
    try:
        found = levels.fit(levels.nested_solver(costs, early=early), simulated,
                           levels.metric_of("peak"),
                           budget_bytes, plain.peak_bytes - levels.nested_model_need(
                               costs, NoCheckpoint()), max_rounds=max_rounds)
        deepest = levels.lowest_nested(costs, early=early)
    except StrategyError:
        found = deepest = None
    if found is not None:
        strategy, result = found
        return [make_plan(strategy.segments(costs.n), result, getattr(strategy, "tree", ()))], []
    # fallbacks, which also bound what is feasible: the placement of least modelled
    # peak, and the fixed strategies the model may misjudge (full, selective)
    least = levels.placement_strategy(segments_of(
        solve(costs, min_peak(costs, options, stops), options, stops)[1]))
    candidates = [(least, simulated(least)), *((s, simulated(s)) for s in (Full(), Selective()))]
    fits = [(s, r) for s, r in candidates if r.peak_bytes <= budget_bytes]
    if fits:
        return [plan_of(*min(fits, key=lambda sr: (sr[1].backward_flops, sr[1].peak_bytes)))], []
    return [], candidates + ([(deepest, simulated(deepest))] if deepest is not None else [])


def _finds_chain(model) -> bool:
    try:
        find_blocks(model)
    except StrategyError:
        return False
    return True


def _whole_forms(model, batch, loss_fn, prof: Profile, n_blocks: int = 0) -> list:
    """(form, solver) of the forms spanning the whole forward that ``plan(metric=
    "stored")`` weighs: ``forward:KEYS``, and ``remat:KEYS`` on chains of at most
    ``levels.REMAT_MAX_BLOCKS`` blocks while its rebuilds stay within
    ``levels.REBUILD_LIMIT``; none when the loss calls the model twice."""
    calls = prof.forward_calls
    if calls is None:
        return []
    front = levels.whole_front(prof=prof)
    forms: list[type[Forward] | type[Remat]] = [Forward]
    if n_blocks <= levels.REMAT_MAX_BLOCKS and levels.rebuilds_within_limit(
            model, batch, calls, loss_fn=loss_fn):
        forms.append(Remat)
    return [(form, levels.whole_solver(front, form=form)) for form in forms]


def _plan_stored(s: _Search, stops, options, wholes, *, full: bool = False) -> Plan:
    """``plan(metric="stored")``: the cheapest of the single-level placements on the
    chain and the ``wholes`` forms (memprop.checkpoint.forms.whole, .remat), on the bytes the
    forward stores (NOTE [ The two metrics ], memprop.checkpoint.planning.searches). Equal FLOPs:
    the lower peak. None fits: the cheapest that fits of the candidates that bound the
    smallest feasible budget (each form keeping nothing, the chain's placement of least
    stored bytes), else a ``BudgetError`` with the least of them (as NOTE [ The smallest
    feasible budget ] for the peak)."""
    costs, plain, budget_bytes, max_rounds = s.costs, s.plain, s.budget_bytes, s.max_rounds
    simulated, plan_of = s.simulated, s.plan_of

    def choose(fits: list) -> Plan:
        return s.choose(fits, full=full)
    stored = levels.metric_of("stored")
    found = []
    if costs is not None:            # None: no chain (the whole forward only)
        overhead = plain.saved_bytes - levels.stored_model_bytes(costs, [])
        found.append(levels.fit(levels.stored_solver(costs, early=stops, options=options),
                                simulated, stored, budget_bytes, overhead,
                                max_rounds=max_rounds))
    lowest = []
    for form, solver in wholes:
        try:
            nothing_kept = simulated(form())
            found.append(levels.fit(solver, simulated, stored, budget_bytes,
                                    nothing_kept.saved_bytes, max_rounds=max_rounds))
        except StrategyError:        # a form this model cannot run (remat: NOTE there)
            continue
        lowest.append((form(), nothing_kept))
    cheapest = lambda f: (f[1].backward_flops, f[1].peak_bytes)  # noqa: E731
    fits = [f for f in found if f is not None]
    if fits:          # the objective's choice; first among equals: the cheapest
        return choose([plan_of(*f) for f in sorted(fits, key=cheapest)])
    if costs is not None:
        least = levels.placement_strategy(stored_fronts(costs, early=stops,
                                                        options=options)[0][2])
        lowest.append((least, simulated(least)))
    fits = [f for f in lowest if f[1].saved_bytes <= budget_bytes]
    if fits:
        return choose([plan_of(*f) for f in sorted(fits, key=cheapest)])
    reached_by, result = min(lowest, key=lambda f: (f[1].saved_bytes, f[0].spec))
    smallest = result.saved_bytes
    raise BudgetError(
        f"memprop.checkpoint: no checkpointing plan stores at most "
        f"{format_bytes(budget_bytes)} ({budget_bytes} bytes) for backward; the smallest "
        f"feasible is about {format_bytes(smallest)} ({smallest} bytes, with "
        f"{short_spec(reached_by.spec)}) - the plain step stores "
        f"{format_bytes(plain.saved_bytes)}. Raise the budget or shrink the batch",
        smallest_feasible_bytes=smallest, plan=s.reaching(reached_by, result))


@dataclasses.dataclass(frozen=True)
class Budget(Strategy):
    """``budget:SIZE``: the planner's cheapest plan whose predicted peak fits SIZE,
    planned from a profile of the example batch when applied."""

    syntax = "budget:SIZE"
    keeps_case = True
    budget_bytes: int = 0

    @classmethod
    def parse(cls, text):
        return cls(parse_size(text, positive=True))

    @property
    def spec(self):
        return f"budget:{format_bytes(self.budget_bytes).replace(' ', '')}"

    def apply(self, model: nn.Module, *, blocks_attr: str | None = None, blocks=None,
              check_fn=None, example_batch=None, loss_fn=None) -> nn.Module:
        """Plan from a profile of ``example_batch`` and apply the plan (segments,
        op-level blocks or a multi-level schedule); ``applied_strategy`` says budget."""
        if example_batch is None:
            raise StrategyError("memprop.checkpoint: budget:SIZE plans from a profile of one "
                                "step; pass example_batch= (and loss_fn= for a batch that is "
                                "not the zoo's (inputs, targets)) to apply()")
        refuse_applied(model)
        kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
        with torch.enable_grad():     # planning profiles a training step, also when
            # the model is set up under no_grad
            found = plan(model, example_batch, self.budget_bytes, blocks_attr=blocks_attr,
                         blocks=blocks, check_fn=check_fn, **kwargs)
        found.strategy.apply(model, blocks_attr=blocks_attr, blocks=blocks, check_fn=check_fn)
        model.__dict__[APPLIED].strategy = self
        return model
