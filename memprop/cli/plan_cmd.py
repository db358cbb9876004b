"""``memprop plan``: the cheapest checkpointing plan that fits a memory budget, next to
``none``, ``sqrt`` and ``full``. Every row is predicted on fake tensors (nothing is
allocated), so budgets for configurations beyond this machine can be planned."""

from __future__ import annotations

import pandas as pd
from torch._subclasses.fake_tensor import FakeTensorMode

from memprop.checkpoint import parse_strategy
from memprop.checkpoint.chain import find_blocks
from memprop.checkpoint.planner import plan, simulate
from memprop.cli._common import parse_dtype, render_table
from memprop.cli.profile_cmd import config_from_args
from memprop.errors import BudgetError
from memprop.measure import OPTIMIZERS
from memprop.models import MODELS
from memprop.units import format_bytes, parse_size


def gather_plan(config, batch_size: int, budget, *, dtype, optimizer="sgd",
                compare=("none", "sqrt", "full")):
    """(Plan or BudgetError, comparison DataFrame): one row per strategy with predicted
    peak, stored bytes and recompute FLOPs; ``fits`` says whether it meets the budget."""
    budget_bytes = parse_size(budget)
    mode = FakeTensorMode()
    with mode:
        model = config.build(dtype=dtype)
        batch = config.example_batch(batch_size, dtype=dtype)
    n = len(find_blocks(model))
    rows, plain = [], None
    for spec in compare:
        m = simulate(model, batch, parse_strategy(spec).segments_for(model), optimizer=optimizer,
                     loss_fn=config.loss)
        plain = plain or m
        rows.append(dict(strategy=spec, peak_bytes=m.peak_bytes, saved_bytes=m.saved_bytes,
                         recompute_flops=m.backward_flops - plain.backward_flops))
    try:
        result = plan(model, batch, budget_bytes, optimizer=optimizer, loss_fn=config.loss)
        rows.append(dict(strategy=f"plan: {result.spec}", peak_bytes=result.predicted_peak_bytes,
                         saved_bytes=result.predicted_saved_bytes,
                         recompute_flops=result.recompute_flops))
    except BudgetError as exc:
        result = exc
    table = pd.DataFrame(rows)
    table["recompute_vs_forward"] = (table.recompute_flops / plain.forward_flops).round(3)
    table["fits"] = table.peak_bytes <= budget_bytes
    return result, table, n


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan checkpointing to fit a memory budget",
                       description=__doc__)
    p.add_argument("--model", default="mlp",
                   help=f"one of {', '.join(MODELS)}, or package.module:factory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a model size, repeatable")
    p.add_argument("--input-shape", help="factory models: one example's shape, e.g. 3,32,32")
    p.add_argument("--blocks-attr", help="factory models: attribute holding the block chain")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    p.add_argument("--budget", required=True, help="memory budget, e.g. 2GiB or 512MiB")
    p.set_defaults(func=plan_command)


def plan_command(args) -> int:
    config = config_from_args(args)
    result, table, n = gather_plan(config, args.batch, args.budget,
                                   dtype=parse_dtype(args.dtype), optimizer=args.optimizer)
    sizes = ", ".join(f"{k}={v}" for k, v in config.fields().items())
    print(f"{config.name} ({sizes}), batch {args.batch}, {args.dtype}, {n} blocks; "
          f"budget {format_bytes(parse_size(args.budget))}")
    print("predicted on fake tensors (tensor-level peak of a whole training step):")
    shown = table.assign(recompute_flops=(table.recompute_flops / 1e9).map("{:.3f} GFLOP".format))
    print(render_table(shown))
    print()
    if isinstance(result, BudgetError):
        print(f"error: {result}")
        return 2
    print(result.describe())
    print(f"\napply it: memprop profile --strategy {result.spec} ...  or in Python: "
          f"apply_strategy(model, {result.spec!r})")
    return 0
