"""``memprop fit``: which cluster configurations a model trains on. Per world size and
TP degree, the largest micro-batch per rank whose per-rank peak fits the device's memory
with no checkpointing, with ``full`` and with the per-rank plan, and the recompute each
costs. PREDICTED on a fake process group under fake tensors (nothing allocated), beside
the closed forms (ZeRO-3's model states plus Megatron's activations: predictions by
formula). The memory is the tensor-level peak of the largest rank (no allocator
rounding or fragmentation)."""

from __future__ import annotations

import argparse
import json
import time

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
)
from memprop.errors import ConfigError
from memprop.units import format_bytes


def int_list(text: str) -> tuple[int, ...]:
    """``8,64,512`` -> (8, 64, 512): whole numbers of 1 or more, comma-separated."""
    try:
        return tuple(positive_int(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} in the comma-separated list {text!r}") from None


def add_parser(sub) -> None:
    p = add_command(sub, "fit", help="the largest micro-batch per rank that fits a device, "
                    "per world size", doc=__doc__)
    add_model_options(p)
    for action in p._actions:                  # fit searches the batch: no --batch
        if "--batch" in action.option_strings:
            action.help = argparse.SUPPRESS
    p.set_defaults(batch=None, dtype="bfloat16", optimizer="adam")
    p.add_argument("--device-memory", required=True, type=size,
                   help="each rank's memory (required), e.g. 80GiB: the budget on the "
                        "tensor-level peak of the largest rank")
    p.add_argument("--world-sizes", type=int_list, default=(8, 64, 512), metavar="N,N,...",
                   help="ranks in all, comma-separated (default: 8,64,512)")
    p.add_argument("--tp", type=int_list, default=(1,), metavar="M,M,...",
                   help="tensor-parallel degrees, comma-separated; each divides every world "
                        "size (default: 1)")
    p.add_argument("--seq", type=positive_int, default=None, metavar="TOKENS",
                   help="tokens per example (the model's seq_len; same as --set seq_len=...)")
    p.add_argument("--no-plan", dest="plan", action="store_false",
                   help="leave out the per-rank plan's rows (each costs single-device plans)")
    p.add_argument("--max-batch", type=positive_int, default=4096,
                   help="largest micro-batch per rank searched")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    add_layers_argument(p)
    p.set_defaults(func=fit_command)


SHOWN = ["world_size", "tp", "strategy", "batch_size", "peak_bytes", "above_peak_bytes",
         "recompute_flops", "closed_form_batch_size", "closed_form_peak_bytes", "cell_s"]


def gather_fit(args):
    """(config, the fit table of memprop.sharded.fit.fit_cluster, seconds)."""
    from memprop.sharded.fit import fit_cluster

    if args.batch is not None:
        raise ConfigError(f"memprop fit: --batch {args.batch} is not allowed; fit searches "
                          "the micro-batch per rank itself (leave --batch out)")
    if args.seq is not None:
        args.set = [*(args.set or []), f"seq_len={args.seq}"]
    config = config_from_args(args)
    start = time.perf_counter()
    with Spinner("predicting every world size on fake process groups") as spinner:
        with factory_errors(args, "fit"):
            table = fit_cluster(config, args.device_memory, world_sizes=args.world_sizes,
                                tps=args.tp, optimizer=args.optimizer,
                                dtype=parse_dtype(args.dtype), plan=args.plan,
                                limit=args.max_batch, progress=spinner.say,
                                layers=args.layers)
    return config, table, time.perf_counter() - start


def fit_command(args) -> int:
    from memprop.checkpoint.planning.planner import short_spec

    config, table, seconds = gather_fit(args)
    if args.json:
        print(json.dumps({"model": config.name, "fields": config.fields(),
                          "dtype": args.dtype, "optimizer": args.optimizer,
                          "device_memory_bytes": args.device_memory, "seconds": seconds,
                          "rows": table_rows(table)}, indent=2, default=str))
        return 0
    sizes = ", ".join(f"{k}={v}" for k, v in config.fields().items())
    cells = table.drop_duplicates(["world_size", "tp"])
    predictions, extrapolated = int(cells.predictions.sum()), int(cells.extrapolated.sum())
    shown = table[SHOWN].assign(
        strategy=[s if s != "plan" else f"plan: {short_spec(spec or '-', 30)}"
                  for s, spec in zip(table.strategy, table.spec)])
    print(f"{config.name} ({sizes}), {args.dtype}, optimizer {args.optimizer}; "
          f"{format_bytes(args.device_memory)} per rank (tensor-level peak of the largest "
          "rank)")
    print(f"PREDICTED on fake process groups and fake tensors, FSDP2 on every block, "
          f"reshard after forward; {predictions} predictions in {seconds:.1f} s"
          + (f", {extrapolated} of them from the model at 3, 4 and 5 layers, extrapolated "
             "(every figure linear in depth, checked; --layers all runs every layer)"
             if extrapolated else ""))
    print(render_table(shown))
    print()
    print("  batch_size: the largest micro-batch per rank that fits (0: not even one); "
          "above_peak_bytes: the peak at one more")
    print("  recompute_flops: per rank, backward FLOPs beyond the plain step's (the "
          "unsharded model at that batch, / tp)")
    print("  cell_s: wall time of the world size's predictions (and plans), on this machine")
    print("  closed_form_*: a prediction by formula, not by memprop: ZeRO-3 model states "
          "(this run's bytes per parameter) + Megatron's activations (Korthikanti et al. "
          "2022: 34sbh per layer, attention storing no s x s scores; full and the plan: "
          "2sbh); they leave out the logits, the loss, all-gather buffers and temporaries "
          "(memprop.sharded.closed_forms)")
    return 0
