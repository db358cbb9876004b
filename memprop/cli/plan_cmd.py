"""``memprop plan``: the checkpointing plan that fits a memory budget at the least predicted
step time (--objective flops: the least recompute), next to
``none``, ``sqrt`` and ``full``. Every row is predicted on fake tensors (nothing is
allocated), so budgets for configurations beyond this machine can be planned."""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import TYPE_CHECKING

from memprop.cli._common import (
    add_command,
    parse_dtype,
    positive_int,
    render_table,
    size,
    table_rows,
)
from memprop.cli._progress import Spinner
from memprop.cli.profile_cmd import (
    add_layers_argument,
    add_model_options,
    config_from_args,
    factory_errors,
    parallel_config,
)
from memprop.errors import ConfigError
from memprop.units import format_bytes

if TYPE_CHECKING:
    from memprop.checkpoint.planning.planner import Plan


def gather_plan(config, batch_size: int, budget, *, dtype, optimizer="sgd",
                compare=("none", "sqrt", "full"), metric: str = "peak", whole: bool = True,
                amp: str | None = None, objective: str = "time", routing: str = "uniform"):
    """(Plan or BudgetError, comparison DataFrame, number of blocks): one row per strategy
    with predicted peak, stored bytes and recompute FLOPs; ``fits`` says whether it meets
    the budget (on the step's peak, or with ``metric="stored"`` on the bytes stored).
    The plan's row holds its whole spec (``plan: SPEC``); ``amp``: every row's step
    under autocast (``bf16``, ``fp16``), as ``memprop profile --amp``; ``objective``:
    what the plan minimises among the plans that fit (``time``, ``flops``); ``routing``:
    for experts run one by one, the routing planned for (``uniform``, ``capacity``)."""
    import pandas as pd
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprop.checkpoint import find_blocks, parse_strategy
    from memprop.checkpoint.forms.cache import cache_off
    from memprop.checkpoint.planning.planner import plan
    from memprop.checkpoint.planning.simulate import simulate
    from memprop.errors import BudgetError, ConfigError
    from memprop.routing import Routing, has_experts, planned_under
    from memprop.units import parse_size

    budget_bytes = parse_size(budget)
    with FakeTensorMode():
        model = config.build(dtype=dtype)
        batch = config.example_batch(batch_size, dtype=dtype)
    n = len(find_blocks(model))
    # experts run one by one: every fake step routed alike (memprop.routing)
    with planned_under(Routing(routing) if has_experts(model) else None):
        rows, plain = [], None
        # as plan() does, the comparison runs with the KV cache off (NOTE [ Checkpointing and
        # KV caches ]), without warning once per strategy
        restore_cache = cache_off(model, warn=False)
        try:
            for spec in compare:
                m = simulate(model, batch, parse_strategy(spec), optimizer=optimizer,
                             loss_fn=config.loss, amp=amp)
                plain = plain or m
                rows.append(dict(strategy=spec, peak_bytes=m.peak_bytes,
                                 saved_bytes=m.saved_bytes,
                                 recompute_flops=m.backward_flops - plain.backward_flops))
        finally:
            restore_cache()
        if plain is None:
            raise ConfigError("memprop plan: compare names no strategy; the first it names "
                              "(e.g. 'none') is the baseline of the recompute columns")
        result: Plan | BudgetError
        try:
            result = plan(model, batch, budget_bytes, optimizer=optimizer, loss_fn=config.loss,
                          metric=metric, whole=whole, amp=amp, objective=objective,
                          routing=routing)
            rows.append(dict(strategy=f"plan: {result.spec}",
                             peak_bytes=result.predicted_peak_bytes,
                             saved_bytes=result.predicted_saved_bytes,
                             recompute_flops=result.recompute_flops))
        except BudgetError as exc:
            result = exc
    table = pd.DataFrame(rows)
    table["recompute_vs_forward"] = table.recompute_flops / plain.forward_flops
    table["fits"] = table["saved_bytes" if metric == "stored" else "peak_bytes"] <= budget_bytes
    return result, table, n


def add_parser(sub) -> None:
    p = add_command(sub, "plan", help="plan checkpointing to fit a memory budget", doc=__doc__)
    add_model_options(p)
    p.add_argument("--budget", required=True, type=size,
                   help="memory budget (required), e.g. 2GiB or 512MiB (powers of 2) or 500MB")
    p.add_argument("--metric", choices=("peak", "stored"), default="peak",
                   help="what the budget limits: the whole step's tensor peak, or the bytes "
                        "stored for backward at the end of forward")
    p.add_argument("--no-whole-forward", dest="whole", action="store_false",
                   help="plan only checkpoints on the block chain (recomputed a segment at "
                        "a time), not forms spanning the whole forward: each saved tensor "
                        "rebuilt when backward needs it (remat:KEYS, both metrics) and one "
                        "checkpoint around it (forward:KEYS, --metric stored); without it "
                        "all are weighed")
    # the same option as memprop profile --amp (profile_cmd.add_parser)
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision: plan the step with its forward under "
                        "torch.autocast and float32 master weights (fp16 adds a "
                        "GradScaler), as memprop profile --amp measures it (default: off)")
    p.add_argument("--routing", choices=("uniform", "capacity"), default="uniform",
                   help="mixture-of-experts layers whose experts run one by one: plan for "
                        "an even split of the tokens (uniform) or every token routed to "
                        "the same k experts (capacity) (default: uniform)")
    p.add_argument("--objective", choices=("time", "flops"), default=None,
                   help="among the plans that fit: the least predicted step time (time; "
                        "on fake tensors priced at this machine's measured rates) or the "
                        "least recompute FLOPs (flops) (default: time; with --fsdp always "
                        "flops)")
    p.add_argument("--fsdp", type=positive_int, default=None, metavar="N",
                   help="plan each rank of FSDP2 over N ranks (N in all with --tp and "
                        "--replicate), against a per-rank budget; predicted on a fake "
                        "process group (memprop.sharded.plan); --batch is per rank")
    p.add_argument("--tp", type=positive_int, default=None, metavar="M",
                   help="with --fsdp N: tensor parallelism over M of the N ranks (a 2-D "
                        "mesh); alone: M ranks of tensor parallelism")
    p.add_argument("--replicate", type=positive_int, default=None, metavar="R",
                   help="with --fsdp N: HSDP, R replicas of N/R shards")
    p.add_argument("--fsdp-reshard", choices=("on", "off"), default="on",
                   help="with --fsdp: free each block's gathered parameters after forward "
                        "(on, ZeRO-3) or keep them to backward (off, ZeRO-2)")
    p.set_defaults(fsdp_mixed_precision=None, fsdp_offload=False)
    add_layers_argument(p)
    p.add_argument("--json", action="store_true", help="print the plan and the table as JSON")
    p.set_defaults(func=plan_command)


def shown_table(table):
    """The comparison table for people: a long plan spec shortened (planner.short_spec),
    so the strategy column is as wide as its content; the whole spec is printed once
    below it, and kept whole in --json."""
    from memprop.checkpoint.planning.planner import short_spec

    return table.assign(strategy=[f"plan: {short_spec(s.removeprefix('plan: '))}"
                                  if s.startswith("plan: ") else s for s in table.strategy])


def apply_line(spec: str, amp: str | None = None) -> str:
    """How to apply ``spec``, with the spec written once when it is long (a 7B plan's
    runs to hundreds of characters), twice (CLI and Python) when it is short."""
    from memprop.checkpoint.planning.planner import SHORT_SPEC

    cli = f"memprop profile --strategy {shlex.quote(spec)}{f' --amp {amp}' if amp else ''} ..."
    if len(spec) <= SHORT_SPEC:
        return f"apply it: {cli}  or in Python: apply_strategy(model, {spec!r})"
    return (f"apply it: {cli}\n  (in Python: apply_strategy(model, SPEC) with the "
            f"{len(spec)}-character spec above)")


def plan_command(args) -> int:
    from memprop.errors import BudgetError

    if args.fsdp is not None or args.tp is not None or args.replicate is not None:
        return rank_plan_command(args)
    with Spinner("planning on fake tensors"):
        config = config_from_args(args)
        with factory_errors(args, "plan"):
            result, table, n = gather_plan(config, args.batch, args.budget,
                                           dtype=parse_dtype(args.dtype), optimizer=args.optimizer,
                                           metric=args.metric, whole=args.whole, amp=args.amp,
                                           objective=args.objective or "time",
                                           routing=args.routing)
    failed = isinstance(result, BudgetError)
    if args.json:
        print(json.dumps({
            "model": config.name, "fields": config.fields(), "batch": args.batch,
            "dtype": args.dtype, "amp": args.amp, "blocks": n, "budget_bytes": args.budget,
            "metric": args.metric, "objective": args.objective or "time",
            "plan": None if failed else {
                "spec": result.spec, "predicted_peak_bytes": result.predicted_peak_bytes,
                "predicted_saved_bytes": result.predicted_saved_bytes,
                "recompute_flops": result.recompute_flops,
                "rebuild_ratio": result.rebuild_ratio, "objective": result.objective,
                "predicted_step_ms": result.predicted_step_ms,
                "plain_step_ms": result.plain_step_ms, "time_basis": result.time_basis},
            "error": str(result) if failed else None,
            "strategies": table_rows(table)}, indent=2, default=str))
        return 2 if failed else 0
    sizes = ", ".join(f"{k}={v}" for k, v in config.fields().items())
    print(f"{config.name} ({sizes}), batch {args.batch}, {args.dtype}"
          f"{f' (autocast {args.amp})' if args.amp else ''}, {n} blocks; "
          f"budget {format_bytes(args.budget)} on the "
          f"{'bytes stored for backward' if args.metric == 'stored' else 'step peak'}")
    print("predicted on fake tensors (tensor-level peak of a whole training step):")
    print(render_table(shown_table(table)))
    print()
    if failed:
        raise result
    print(result.describe())
    print()
    print(apply_line(result.spec, args.amp))
    return 0


def gather_rank_plan(config, args):
    """(RankPlan, comparison DataFrame, ClosedForms) for ``plan --fsdp``: the per-rank plan
    (memprop.sharded.plan.plan_rank) and ``none`` and ``full`` per rank, each predicted
    on a fake process group, with the closed forms at the batch."""
    import pandas as pd

    from memprop.sharded.closed_forms import closed_forms
    from memprop.sharded.plan import plan_rank
    from memprop.sharded.predictions import RankPredictions, RecomputeFlops

    refused = [opt for opt, on in (("--amp", args.amp), ("--metric stored",
                                   args.metric == "stored"),
                                   ("--objective time", args.objective == "time")) if on]
    if refused:
        raise ConfigError(f"memprop plan: --fsdp does not take {', '.join(refused)}; a "
                          "per-rank plan limits the step's peak and minimises recompute "
                          "FLOPs (leave those options out)")
    fsdp = parallel_config(args)
    dtype = parse_dtype(args.dtype)
    runs = RankPredictions(config, fsdp, optimizer=args.optimizer, dtype=dtype,
                           layers=args.layers)
    flops = RecomputeFlops(config, optimizer=args.optimizer, dtype=dtype)
    with factory_errors(args, "plan"):
        found = plan_rank(config, args.batch, fsdp, args.budget, optimizer=args.optimizer,
                          dtype=dtype, predictions=runs)
        rows = []
        for name, spec, recompute in (
                ("none", "none", 0),
                ("full", "full", flops.flops(args.batch, "full", tp=fsdp.tp)),
                (f"plan: {found.spec}", found.spec, found.recompute_flops)):
            s = runs.get(args.batch, spec)
            rows.append(dict(strategy=name, peak_bytes=s.peak_bytes,
                             saved_bytes=s.rank(s.largest_rank).saved_bytes,
                             recompute_flops=recompute))
    table = pd.DataFrame(rows)
    table["recompute_vs_forward"] = table.recompute_flops / max(found.forward_flops, 1)
    table["fits"] = table.peak_bytes <= args.budget
    closed = closed_forms(config, args.batch, fsdp, optimizer=args.optimizer, dtype=dtype)
    return found, table, closed


def rank_plan_command(args) -> int:
    """``plan --fsdp N``: the per-rank plan, none and full per rank, the closed forms."""
    from memprop.errors import BudgetError

    with Spinner("planning each rank on fake process groups"):
        config = config_from_args(args)
        found, table, closed = gather_rank_plan(config, args)
    failed = not found.fits
    message = (f"memprop plan: no checkpointing plan fits {format_bytes(args.budget)} per "
               f"rank at batch {args.batch} per rank ({found.fsdp.describe()}); the smallest "
               f"per-rank peak found is {format_bytes(found.predicted_peak_bytes)} "
               f"({found.predicted_peak_bytes} bytes, with {found.spec}): raise the budget, "
               "add shards or shrink the micro-batch")
    if args.json:
        print(json.dumps({
            "model": config.name, "fields": config.fields(), "batch_per_rank": args.batch,
            "dtype": args.dtype, "budget_bytes": args.budget, "fsdp": found.fsdp.describe(),
            "world_size": found.fsdp.world_size, "tp": found.fsdp.tp,
            "replicate": found.fsdp.replicate, "shard": found.fsdp.shard,
            "plan": {"spec": found.spec, "fits": found.fits,
                     "predicted_peak_bytes": found.predicted_peak_bytes,
                     "rank_peak_bytes": found.predicted.rank_peak_bytes,
                     "recompute_flops": found.recompute_flops,
                     "peak_parts_bytes": found.peak_parts, "rounds": found.rounds},
            "error": message if failed else None,
            "closed_forms": dataclasses.asdict(closed),
            "strategies": table_rows(table)}, indent=2, default=str))
        return 2 if failed else 0
    sizes = ", ".join(f"{k}={v}" for k, v in config.fields().items())
    print(f"{config.name} ({sizes}), batch {args.batch} per rank, {args.dtype}, optimizer "
          f"{args.optimizer}; {found.fsdp.describe()}; budget {format_bytes(args.budget)} "
          "per rank on the step's tensor peak (largest rank)")
    print("PREDICTED on a fake process group and fake tensors (per rank; recompute per "
          "rank, the unsharded model's / tp):")
    print(render_table(shown_table(table)))
    print()
    zero = (f"closed form (by formula, not memprop): ZeRO-3 model states "
            f"{format_bytes(closed.zero3_bytes)} per rank at this run's "
            f"{closed.bytes_per_param:g} B/parameter ({format_bytes(closed.zero3_paper_bytes)} "
            f"at the paper's 2+2+12)")
    print(zero)
    if closed.megatron_none_bytes is not None:
        print(f"  + Megatron activations {format_bytes(closed.megatron_none_bytes)} (no "
              f"recompute, 34sbh per layer; {format_bytes(closed.megatron_scores_bytes)} "
              f"with attention's s x s scores), {format_bytes(closed.megatron_full_bytes)} "
              "(full recompute) "
              "(Korthikanti et al. 2022; no logits, loss, gathered parameters or "
              "temporaries: memprop.sharded.closed_forms)")
    print()
    print(found.describe())
    if failed:
        raise BudgetError(message)
    print()
    how = f"--fsdp {args.fsdp}" if args.fsdp else f"--tp {args.tp}"
    print(apply_line(found.spec).replace(" ...", f" {how} --estimate ...", 1))
    return 0
